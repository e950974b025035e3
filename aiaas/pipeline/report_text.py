"""A parity report for people: what the step cost in accuracy and what it bought in size and speed."""

from __future__ import annotations

from typing import Any


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _num(value: Any, fmt: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(float(value), fmt)


def format_report(report: dict[str, Any]) -> list[str]:
    tol = report.get("tolerances") or {}
    verdict = "passed" if report.get("passed") else ("FAILED (forced)" if report.get("forced") else "FAILED")
    samples = int(float(report.get("samples") or 0))
    lines = [f"parity: {verdict} on {samples} {report.get('sample_source', '')} samples"]
    bound = (f"(atol {_num(tol.get('atol'), 'g')}, rtol {_num(tol.get('rtol'), 'g')})"
             if tol.get("atol") is not None or tol.get("rtol") is not None else "(not gated)")
    lines.append(f"  max abs err   {_num(report.get('max_abs_err')):<12} {bound}")
    lines.append(f"  max rel err   {_num(report.get('max_rel_err'))}")
    lines.append(f"  cosine        {_num(report.get('cosine'), '.6f'):<12} (min {_num(tol.get('min_cosine'), 'g')})")
    if report.get("top1_agreement") is not None:
        lines.append(f"  top-1 agree   {float(report['top1_agreement']):<12.1%} (min {float(tol.get('min_top1', 0)):.0%})")
    size = report.get("size_bytes") or {}
    if size:
        ratio = size.get("ratio")
        lines.append(f"  size          {_size(size.get('parent'))} -> {_size(size.get('candidate'))}"
                     + (f" ({float(ratio):.2f}x)" if isinstance(ratio, (int, float)) else ""))
    for batch, entry in sorted((report.get("latency_ms") or {}).items(), key=lambda kv: int(float(kv[0]))):
        speedup = entry.get("speedup")
        lines.append(f"  latency b={batch:<4} {_num(entry.get('parent'))} ms -> {_num(entry.get('candidate'))} ms"
                     + (f" ({float(speedup):.2f}x)" if isinstance(speedup, (int, float)) else ""))
    for failure in report.get("failures") or []:
        lines.append(f"  ! {failure}")
    return lines
