"""The Grafana dashboard parses and asks only for series the monitor really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.monitor.control import MemoryControlPlane
from services.monitor.core import MonitorCore
from services.monitor.entities import Generation, QualitySample, Report, Request
from services.monitor.prom import PrometheusExport
from services.monitor.settings import MonitorSettings
from services.monitor.windows import MemoryWindowStore

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "aiaas-monitor.json"


async def _exported_names() -> set[str]:
    registry = CollectorRegistry()
    prom = PrometheusExport(registry)
    core = MonitorCore(MonitorSettings(registry_url=None), MemoryWindowStore(), MemoryControlPlane(), prom=prom)
    generation = Generation(prompt_tokens=8, completion_tokens=16, ttft_us=50_000, itl_mean_us=9_000, preemptions=1,
                            kv_cache_usage=0.25, finish_reason="length")
    await core.ingest(Report("inference", [Request("inference", "m", 1, "", "OK", 900, queue_us=100, compute_us=700,
                                                   batch_size=2),
                                           Request("inference", "lm", 1, "", "OK", 200_000, generation=generation)],
                             dropped=3))
    await core.ingest(Report("gateway", [], quality=[QualitySample("m", 1, "production", class_labels=2, correct=1)]))
    await core.evaluate()
    prom.drift_psi.labels("m", "1", "x").set(0.1)
    prom.canary_rollbacks.labels("m").inc()
    return {sample.name for family in registry.collect() for sample in family.samples}


async def test_dashboard_queries_only_exported_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "aiaas-monitor"
    panels = dashboard["panels"]
    assert len(panels) >= 10 and len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert all(p["targets"] for p in panels)
    wanted = {name for e in exprs for name in re.findall(r"\baiaas_[a-z0-9_]+", e)}
    exported = await _exported_names()
    assert wanted <= exported, sorted(wanted - exported)
    for variable in ("$model", "$source"):
        assert any(variable in e for e in exprs)
