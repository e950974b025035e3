"""Request windows: ingest request counters and model loads, answer window queries.

`RequestWindows` owns the request namespace of the window store and the load figures kept
beside it (when a version loaded, how long that took, when it first answered). `SeriesCap`
bounds what a reporter can make it keep: at most `max_models` model names and
`max_series_per_model` series (version, alias, source) per name, each forgotten once it has
had no request for `retention_s`; records beyond the caps are dropped and counted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable

from services.common.errors import InvalidArgument
from services.common.reporting import UNKNOWN_MODEL
from services.monitor.entities import MetricsFilter, ModelLoad, Report, SeriesKey, SeriesMetrics
from services.monitor.prom import PrometheusExport
from services.monitor.settings import MonitorSettings
from services.monitor.windows import (
    NS_REQUESTS,
    QUALITY_COUNTS,
    WindowStore,
    add_quality,
    add_request,
    bucket_of,
    quality_sample_ok,
    summarize,
)

_NS = 1_000_000_000


def window_range(now_ns: int, bucket_s: float, window_s: float, since_ns: int = 0) -> tuple[int, int]:
    """First and last bucket of the window ending now, starting no earlier than `since_ns`."""
    now_b = bucket_of(now_ns, bucket_s)
    first = now_b - max(1, math.ceil(window_s / bucket_s)) + 1
    if since_ns:
        first = max(first, bucket_of(since_ns, bucket_s))
    return first, now_b


# Why a record was not kept (the `reason` label of aiaas_monitor_records_refused_total).
OVER_MODEL_CAP = "model_cap"
OVER_SERIES_CAP = "series_cap"
BAD_NAME = "bad_name"
BAD_QUALITY = "bad_quality"


class SeriesCap:
    """Which request series the monitor keeps: model names and series per name are capped.

    A new name (or a new series of a known name) past its cap is refused; names and series with no
    request for `retention_s` are forgotten, at most once a second, when a cap is reached.
    `UNKNOWN_MODEL`, the one label of refused names, is always kept."""

    def __init__(self, max_models: int, max_series_per_model: int, retention_s: float) -> None:
        self.max_models = max_models
        self.max_series_per_model = max_series_per_model
        self.retention_ns = int(retention_s * _NS)
        # model -> encoded series -> when it last had a request (ns).
        self._seen: dict[str, dict[str, int]] = {}
        self._pruned_ns = 0
        self.refused: Counter[str] = Counter()

    @property
    def models(self) -> int:
        return len(self._seen)

    def seed(self, series: Iterable[str], now: int) -> None:
        """Count the series already in the windows (a restart, or another replica's) as seen now."""
        for name in series:
            try:
                model = SeriesKey.decode(name).model
            except ValueError:  # written before names were checked; it ages out of the windows
                continue
            self._seen.setdefault(model, {})[name] = now

    def admit(self, model: str, source: str, series: str, now: int) -> str | None:
        """None when the record may be kept, else the reason it may not."""
        if "|" in model or "|" in source:
            return BAD_NAME  # the separator of encoded series keys
        known = self._seen.get(model)
        if known is None:
            if len(self._seen) >= self.max_models and model != UNKNOWN_MODEL and not self._prune(now):
                return OVER_MODEL_CAP
            known = self._seen[model] = {}
        if series not in known and len(known) >= self.max_series_per_model:
            self._prune(now)
            if len(known) >= self.max_series_per_model:
                return OVER_SERIES_CAP
        known[series] = now
        return None

    def _prune(self, now: int) -> bool:
        """Forget what had no request within the retention; True when there is room for a new name."""
        if now - self._pruned_ns >= _NS:
            self._pruned_ns = now
            oldest = now - self.retention_ns
            for model in list(self._seen):
                known = self._seen[model]
                for series in [s for s, seen in known.items() if seen < oldest]:
                    del known[series]
                if not known:
                    del self._seen[model]
        return len(self._seen) < self.max_models


class RequestWindows:
    def __init__(self, settings: MonitorSettings, store: WindowStore, prom: PrometheusExport | None,
                 clock: Callable[[], int]) -> None:
        self.settings = settings
        self.store = store
        self.prom = prom
        self.clock = clock
        # Versions whose first successful answer since their last load is already recorded.
        self._first_known: set[tuple[str, int]] = set()
        self.cap = SeriesCap(settings.max_models, settings.max_series_per_model, settings.retention_s)
        self._cap_seeded = False

    def range(self, window_s: float, since_ns: int = 0) -> tuple[int, int]:
        return window_range(self.clock(), self.store.bucket_s, window_s, since_ns)

    # ---- ingest ---------------------------------------------------------------------------

    async def ingest(self, report: Report, now: int) -> int:
        """Count the report's requests and record its loads; return how many requests it held."""
        bucket_s = self.store.bucket_s
        if not self._cap_seeded:
            self._cap_seeded = True
            self.cap.seed(await self.store.series(NS_REQUESTS, self.range(self.settings.retention_s)[0]), now)
        increments: dict[tuple[str, int], Counter[str]] = {}
        first_ok: dict[tuple[str, int], int] = {}
        refused: Counter[str] = Counter()
        for req in report.requests:
            if not req.model:
                continue
            req.source = req.source or report.source
            req.time_ns = req.time_ns or now
            series = SeriesKey(model=req.model, version=req.version, alias=req.alias, source=req.source).encode()
            reason = self.cap.admit(req.model, req.source, series, now)
            if reason is not None:
                refused[reason] += 1
                continue
            add_request(increments, req, bucket_s)
            key = (req.model, req.version)
            if req.status == "OK" and req.version and key not in self._first_known:
                first_ok[key] = min(req.time_ns, first_ok.get(key, req.time_ns))
        for sample in report.quality:
            # Feedback reaches the monitor through the gateway (the only reporter whose verified
            # identity may send source "gateway"): its figures join the gateway's series.
            if report.source != "gateway" or not sample.model or not quality_sample_ok(sample):
                refused[BAD_QUALITY] += 1
                continue
            sample.time_ns = sample.time_ns or now
            series = SeriesKey(model=sample.model, version=sample.version, alias=sample.alias,
                               source="gateway").encode()
            reason = self.cap.admit(sample.model, "gateway", series, now)
            if reason is not None:
                refused[reason] += 1
                continue
            add_quality(increments, sample, bucket_s)
        await self.store.add(NS_REQUESTS, increments)
        if self.prom is not None:
            self.prom.add(increments)
        if refused:
            self._count_refused(refused)
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

    def _count_refused(self, refused: Counter[str]) -> None:
        self.cap.refused.update(refused)
        if self.prom is not None:
            for reason, n in refused.items():
                self.prom.records_refused.labels(reason).inc(n)

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
                   for n, (fields, fb) in sums.items() if fields.get("n") or any(fields.get(f) for f in QUALITY_COUNTS)]
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
