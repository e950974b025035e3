"""Request windows: ingest request counters and model loads, answer window queries.

`RequestWindows` owns the request namespace of the window store and the load figures kept
beside it (when a version loaded, how long that took, when it first answered).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

from services.common.errors import InvalidArgument
from services.monitor.entities import MetricsFilter, ModelLoad, Report, SeriesKey, SeriesMetrics
from services.monitor.prom import PrometheusExport
from services.monitor.settings import MonitorSettings
from services.monitor.windows import NS_REQUESTS, WindowStore, add_request, bucket_of, summarize

_NS = 1_000_000_000


def window_range(now_ns: int, bucket_s: float, window_s: float, since_ns: int = 0) -> tuple[int, int]:
    """First and last bucket of the window ending now, starting no earlier than `since_ns`."""
    now_b = bucket_of(now_ns, bucket_s)
    first = now_b - max(1, math.ceil(window_s / bucket_s)) + 1
    if since_ns:
        first = max(first, bucket_of(since_ns, bucket_s))
    return first, now_b


class RequestWindows:
    def __init__(self, settings: MonitorSettings, store: WindowStore, prom: PrometheusExport | None,
                 clock: Callable[[], int]) -> None:
        self.settings = settings
        self.store = store
        self.prom = prom
        self.clock = clock
        # Versions whose first successful answer since their last load is already recorded.
        self._first_known: set[tuple[str, int]] = set()

    def range(self, window_s: float, since_ns: int = 0) -> tuple[int, int]:
        return window_range(self.clock(), self.store.bucket_s, window_s, since_ns)

    # ---- ingest ---------------------------------------------------------------------------

    async def ingest(self, report: Report, now: int) -> int:
        """Count the report's requests and record its loads; return how many requests it held."""
        bucket_s = self.store.bucket_s
        increments: dict[tuple[str, int], Counter[str]] = {}
        first_ok: dict[tuple[str, int], int] = {}
        for req in report.requests:
            if not req.model:
                continue
            req.source = req.source or report.source
            req.time_ns = req.time_ns or now
            add_request(increments, req, bucket_s)
            key = (req.model, req.version)
            if req.status == "OK" and req.version and key not in self._first_known:
                first_ok[key] = min(req.time_ns, first_ok.get(key, req.time_ns))
        await self.store.add(NS_REQUESTS, increments)
        if self.prom is not None:
            self.prom.add(increments)
        await self._record_loads(report.loads, first_ok, now)
        return len(report.requests)

    async def _record_loads(self, loads: list[ModelLoad], first_ok: dict[tuple[str, int], int], now: int) -> None:
        for load in loads:
            await self.store.put_meta(f"load:{load.model}|{load.version}",
                                      {"loaded_ns": load.time_ns or now, "load_us": load.load_us})
            await self.store.delete_meta_field(f"load:{load.model}|{load.version}", "first_ns")
            self._first_known.discard((load.model, load.version))
        for (model, version), t in first_ok.items():
            await self.store.put_meta(f"load:{model}|{version}", {"first_ns": t}, only_if_absent=True)
            self._first_known.add((model, version))

    def count_report(self, report: Report) -> None:
        if self.prom is not None:
            self.prom.reports.labels(report.source or "unknown").inc()
            if report.dropped:
                self.prom.telemetry_dropped.labels(report.source or "unknown").inc(report.dropped)

    # ---- queries --------------------------------------------------------------------------

    async def series_names(self, window_s: float) -> list[str]:
        """Names of the request series with data in the window."""
        return await self.store.series(NS_REQUESTS, self.range(window_s)[0])

    async def query(self, flt: MetricsFilter, since_ns: int = 0) -> list[SeriesMetrics]:
        window_s = flt.window_s or self.settings.default_window_s
        if window_s < 0 or window_s > self.settings.retention_s:
            raise InvalidArgument(f"window must be 0..{self.settings.retention_s:g} seconds, got {window_s:g}")
        first, last = self.range(window_s, since_ns)
        names = [n for n in await self.store.series(NS_REQUESTS, first) if flt.matches(SeriesKey.decode(n))]
        sums = await self.store.read(NS_REQUESTS, names, first, last)
        now = self.clock()
        bucket_ns = int(self.store.bucket_s * _NS)

        def span(first_bucket: int) -> float:
            if first_bucket < 0:
                return window_s
            return min(window_s, max(self.store.bucket_s, (now - first_bucket * bucket_ns) / _NS))

        if flt.merge:
            total: Counter[str] = Counter()
            earliest = -1
            for fields, first_bucket in sums.values():
                total.update(fields)
                if first_bucket >= 0:
                    earliest = first_bucket if earliest < 0 else min(earliest, first_bucket)
            key = SeriesKey(model=flt.model, version=flt.version, alias=flt.alias, source=flt.source)
            out = [summarize(key, total, window_s, span(earliest))]
        else:
            out = [summarize(SeriesKey.decode(n), fields, window_s, span(fb))
                   for n, (fields, fb) in sums.items() if fields.get("n")]
            out.sort(key=lambda m: m.key)
        await self._add_load_figures(out)
        return out

    async def _add_load_figures(self, series: list[SeriesMetrics]) -> None:
        wanted = sorted({f"load:{m.key.model}|{m.key.version}" for m in series if m.key.model and m.key.version})
        if not wanted:
            return
        meta = await self.store.get_meta(wanted)
        for m in series:
            fields = meta.get(f"load:{m.key.model}|{m.key.version}", {})
            loaded, first = fields.get("loaded_ns", 0), fields.get("first_ns", 0)
            if loaded and first >= loaded:
                m.first_response_ms = (first - loaded) / 1e6
            m.load_ms = fields.get("load_us", 0) / 1000.0

    async def export_gauges(self) -> None:
        """Set the Prometheus window gauges of every series over the default window."""
        if self.prom is None:
            return
        for m in await self.query(MetricsFilter()):
            self.prom.window(m)
