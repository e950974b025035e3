"""A self-contained HTML report of an EvaluationResult: the table, per-slice bar charts of each metric
(with the baseline's beside), and the confusion matrix, drawn by matplotlib as PNGs inlined in the page."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from aiaas.eval.report_text import FAILED, format_result, table_rows
from aiaas.registry.v1 import evaluation_pb2 as epb

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #f2f2f2; }
.failed { background: #fde2e2; }
.passed { color: #11772d; } .verdict-failed { color: #b00020; }
figure { display: inline-block; margin: 0.5em; }
"""


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _metric_chart(result: epb.EvaluationResult, metric: str) -> str:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    slices = [s for s in result.slices if metric in s.metrics]
    names = [s.slice for s in slices]
    values = [s.metrics[metric] for s in slices]
    baseline = [s.baseline_metrics.get(metric, np.nan) for s in slices]
    figure = Figure(figsize=(6.4, 0.35 * len(names) + 1.2))
    axes = figure.subplots()
    rows = np.arange(len(names))
    height = 0.4 if result.baseline_version else 0.8
    failed = {t.slice for t in result.thresholds if t.outcome == FAILED and t.metric == metric}
    colors = ["#c62828" if n in failed else "#1565c0" for n in names]
    axes.barh(rows, values, height=height, color=colors)
    handles = [Patch(color="#1565c0", label=f"version {result.version}")]
    if failed:
        handles.append(Patch(color="#c62828", label="a threshold failed"))
    if result.baseline_version:
        axes.barh(rows + height, baseline, height=height, color="#9e9e9e")
        handles.append(Patch(color="#9e9e9e", label=f"baseline (version {result.baseline_version})"))
    axes.legend(handles=handles, loc="lower right", fontsize="small")
    axes.set_yticks(rows + (height / 2 if result.baseline_version else 0), names)
    axes.invert_yaxis()
    axes.set_title(metric)
    return _png(figure)


def _confusion_chart(matrix: epb.ConfusionMatrix) -> str:
    from matplotlib.figure import Figure

    size = len(matrix.labels)
    counts = np.asarray(matrix.counts, dtype=np.int64).reshape(size, size)
    figure = Figure(figsize=(max(4.0, 1.0 + 0.45 * size), max(3.5, 0.8 + 0.45 * size)))
    axes = figure.subplots()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(size), list(matrix.labels), rotation=90)
    axes.set_yticks(range(size), list(matrix.labels))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if size <= 20:
        for i in range(size):
            for j in range(size):
                axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize="small",
                          color="white" if counts[i, j] > counts.max() / 2 else "black")
    axes.set_title("confusion matrix (overall)")
    return _png(figure)


def render(result: epb.EvaluationResult) -> str:
    escape = html.escape
    verdict = "PASSED" if result.passed else "FAILED"
    header, rows = table_rows(result)
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(result.name)}: "
             f"{escape(result.model)} {result.version}</title><style>{_STYLE}</style></head><body>"),
             (f"<h1>{escape(result.name)}: {escape(result.model)} version {result.version} "
             f"<span class='{'passed' if result.passed else 'verdict-failed'}'>{verdict}</span></h1>"),
             "<pre>" + escape("\n".join(list(format_result(result))[:3])) + "</pre>",
             "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = "".join(f"<td class='failed'>{escape(c)}</td>" if c.endswith(" !") else f"<td>{escape(c)}</td>"
                        for c in row)
        parts.append(f"<tr>{cells}</tr>")
    parts.append("</table><h2>Thresholds</h2><ul>")
    for threshold in result.thresholds:
        if threshold.outcome != epb.THRESHOLD_OUTCOME_PASSED:
            parts.append(f"<li>{escape(threshold.message)}</li>")
    passed = sum(t.outcome == epb.THRESHOLD_OUTCOME_PASSED for t in result.thresholds)
    parts.append(f"<li>{passed} passed</li></ul><h2>Metrics by slice</h2>")
    for metric in header[2:]:
        parts.append(f"<figure><img alt='{escape(metric)} by slice' src='data:image/png;base64,"
                     f"{_metric_chart(result, metric)}'></figure>")
    overall = result.slices[0] if result.slices else None
    if overall is not None and overall.HasField("confusion_matrix"):
        parts.append("<h2>Confusion matrix</h2><figure><img alt='confusion matrix' src='data:image/png;base64,"
                     f"{_confusion_chart(overall.confusion_matrix)}'></figure>")
    for note in result.notes:
        parts.append(f"<p>note: {escape(note)}</p>")
    parts.append(f"<p><small>data set {escape(result.dataset)} sha256 {escape(result.dataset_sha256)}; spec sha256 "
                 f"{escape(result.spec_sha256)}</small></p></body></html>")
    return "\n".join(parts)


def write(result: epb.EvaluationResult, path: str | Path) -> Path:
    target = Path(path)
    target.write_text(render(result), encoding="utf-8")
    return target
