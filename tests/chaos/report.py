"""The chaos run's report: one entry per scenario, printed as it ends and appended to a markdown
file (`$AIAAS_CHAOS_REPORT`, else chaos-report.md in pytest's temp dir) and to a JSON-lines file
beside it (same name, `.jsonl`)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from tests.chaos.load import LoadStats


@dataclasses.dataclass(frozen=True)
class ScenarioResult:
    scenario: str
    seconds: float
    sent: int
    ok: int
    failed: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    by_gateway: dict[int, int]
    versions: dict[str, int]
    notes: dict[str, Any]

    @classmethod
    def of(cls, scenario: str, stats: LoadStats, **notes: Any) -> ScenarioResult:
        return cls(scenario, round(stats.seconds, 1), stats.sent, stats.ok, stats.failed_by_status(),
                   round(stats.latency_ms(50), 1), round(stats.latency_ms(99), 1), round(stats.latency_ms(100), 1),
                   stats.by_gateway(), stats.versions(), notes)

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def line(self) -> str:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "none"
        notes = "; ".join(f"{k}: {v}" for k, v in self.notes.items())
        return (f"[chaos] {self.scenario}: {self.sent} sent in {self.seconds}s "
                f"(gateways {self.by_gateway}), failed {self.failed_total} ({failed}), "
                f"p50 {self.p50_ms} ms, p99 {self.p99_ms} ms, max {self.max_ms} ms" + (f"; {notes}" if notes else ""))

    def row(self) -> str:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "0"
        notes = "; ".join(f"{k}: {v}" for k, v in self.notes.items())
        return (f"| {self.scenario} | {self.sent} | {failed} | {self.p50_ms} | {self.p99_ms} | {self.max_ms} "
                f"| {notes} |")


class ChaosReport:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.json_path = path.with_suffix(".jsonl")
        self.results: list[ScenarioResult] = []
        self._headed = False

    def _head(self) -> None:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(f"\n## Chaos run {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()} "
                      f"({os.cpu_count()} cores, load average at start {load})\n\n"
                      "| scenario | sent | failed | p50 ms | p99 ms | max ms | notes |\n"
                      "|---|---|---|---|---|---|---|\n")
        self._headed = True

    def add(self, result: ScenarioResult) -> None:
        if not self._headed:
            self._head()
        self.results.append(result)
        print("\n" + result.line(), flush=True)
        with self.path.open("a") as out:
            out.write(result.row() + "\n")
        with self.json_path.open("a") as out:
            out.write(json.dumps({"time": time.time(), "loadavg": os.getloadavg(),
                                  **dataclasses.asdict(result)}) + "\n")
