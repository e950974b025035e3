"""An EvaluationResult for people: slices x metrics, the change vs the baseline, failed thresholds marked."""

from __future__ import annotations

from collections.abc import Iterator

from aiaas.eval.spec import LATENCY_METRICS
from aiaas.registry.v1 import evaluation_pb2 as epb

FAILED = epb.THRESHOLD_OUTCOME_FAILED
# Left out of the slice table (the latency figures belong to the whole run: shown in the heading).
_NOT_PER_SLICE = {"example_count", *LATENCY_METRICS}


def metric_columns(result: epb.EvaluationResult) -> list[str]:
    names: dict[str, None] = {}
    for found in result.slices:
        for name in found.metrics:
            if name not in _NOT_PER_SLICE:
                names[name] = None
    return sorted(names)


def _cell(found: epb.SliceResult, metric: str, failed: set[tuple[str, str]]) -> str:
    if metric not in found.metrics:
        text = "-"
    else:
        text = f"{found.metrics[metric]:.4f}"
        if metric in found.baseline_metrics:
            text += f" ({found.metrics[metric] - found.baseline_metrics[metric]:+.4f})"
    return text + (" !" if (found.slice, metric) in failed else "")


def table_rows(result: epb.EvaluationResult) -> tuple[list[str], list[list[str]]]:
    failed = {(t.slice, t.metric) for t in result.thresholds if t.outcome == FAILED}
    columns = metric_columns(result)
    rows = [[found.slice, str(found.example_count), *(_cell(found, m, failed) for m in columns)]
            for found in result.slices]
    return ["slice", "examples", *columns], rows


def format_result(result: epb.EvaluationResult) -> Iterator[str]:
    verdict = "PASSED" if result.passed else "FAILED"
    subject = f"{result.model} version {result.version}" if result.version else f"the {result.model} candidate"
    total = result.slices[0].example_count if result.slices else 0
    yield (f"evaluation {result.name!r} of {subject} on data set {result.dataset!r}: {total} examples, "
           f"{result.path}, {result.rows_per_s:,.0f} rows/s: {verdict}")
    if result.baseline_version:
        yield f"baseline: version {result.baseline_version} ({result.baseline}); changes in parentheses"
    overall = result.slices[0].metrics if result.slices else {}
    latency = [f"{m.removeprefix('latency_ms_')} {overall[m]:.1f} ms" for m in LATENCY_METRICS if m in overall]
    if latency:
        yield "batch latency: " + ", ".join(latency)
    header, rows = table_rows(result)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    yield "  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()
    for row in rows:
        yield "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
    failed = [t for t in result.thresholds if t.outcome == FAILED]
    checked = [t for t in result.thresholds if t.outcome != epb.THRESHOLD_OUTCOME_SKIPPED]
    yield f"thresholds: {len(checked) - len(failed)} passed, {len(failed)} failed, " \
          f"{len(result.thresholds) - len(checked)} skipped (! marks a failed one)"
    for threshold in failed:
        yield f"  FAILED {threshold.message}"
    for note in result.notes:
        yield f"note: {note}"
