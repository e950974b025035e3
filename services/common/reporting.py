"""Per-request telemetry from gateway and inference to the monitor, off the serving path.

`TelemetryReporter.record` appends to a bounded in-memory buffer (O(1), no I/O, never raises);
a background task sends the buffer in batches over `aiaas.monitor.v1.Monitor/Report` with a
short deadline. When the monitor is slow or down, batches are dropped and counted rather than
queued: reporting never slows or fails a request, and memory stays bounded by `max_buffer`.

Usage (inside the service's event loop):

    reporter = TelemetryReporter(settings.monitor_url, source="gateway")
    await reporter.start()
    ...
    reporter.record(RequestRecord(source="gateway", model=m, version=v, alias=a, status="OK",
                                  latency_us=latency_us))
    ...
    await reporter.close()
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from aiaas.identity import ClientIdentity
from services.common.model_metrics import ModelMetrics
from services.common.outages import OutageLog

log = logging.getLogger("aiaas.reporting")

# Drift samples: how many rows of a tensor, how many columns per row, and how many samples
# per model per second at most (a token bucket), so sampling costs a bounded amount of CPU.
SAMPLE_MAX_ROWS = 32
SAMPLE_MAX_COLS = 64
SAMPLES_PER_SECOND = 20.0
_MAX_SIDE_BUFFER = 1_000
# The one model label of requests whose model was refused or unknown: a name a caller chose never
# becomes a metric series (the monitor keeps its own cap on model names besides).
UNKNOWN_MODEL = "_unknown"


@dataclass(slots=True)
class RequestRecord:
    source: str  # "gateway" | "inference"
    model: str
    version: int
    alias: str
    status: str  # gRPC status code name, "OK" on success
    latency_us: int
    queue_us: int = 0
    compute_us: int = 0
    batch_size: int = 0
    key_id: str = ""
    time_ns: int = 0  # 0 -> now
    generation: GenerationStats | None = None  # requests to a generative model only


@dataclass(slots=True, frozen=True)
class GenerationStats:
    """A generative request's tokens and timings (monitor.proto `GenerationStats`)."""

    prompt_tokens: int
    completion_tokens: int
    ttft_us: int = 0
    itl_mean_us: int = 0
    itl_max_us: int = 0
    generation_us: int = 0
    preemptions: int = 0
    kv_cache_usage: float = 0.0
    finish_reason: str = ""

    def to_pb(self) -> Any:
        from aiaas.monitor.v1 import monitor_pb2

        return monitor_pb2.GenerationStats(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, ttft_us=self.ttft_us,
            itl_mean_us=self.itl_mean_us, itl_max_us=self.itl_max_us, generation_us=self.generation_us,
            preemptions=self.preemptions, kv_cache_usage=self.kv_cache_usage, finish_reason=self.finish_reason)


@dataclass(slots=True, frozen=True)
class QualitySample:
    """One Feedback call's labels joined to a sampled prediction (monitor.proto `QualitySample`)."""

    model: str
    version: int
    alias: str
    class_labels: int = 0
    correct: int = 0
    value_labels: int = 0
    abs_error_sum: float = 0.0
    squared_error_sum: float = 0.0
    score: float | None = None

    def to_pb(self, time_ns: int) -> Any:
        from aiaas.monitor.v1 import monitor_pb2

        return monitor_pb2.QualitySample(
            model=self.model, version=self.version, alias=self.alias, class_labels=self.class_labels,
            correct=self.correct, value_labels=self.value_labels, abs_error_sum=self.abs_error_sum,
            squared_error_sum=self.squared_error_sum, score=self.score, time_ns=time_ns)


class _TokenBucket:
    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class TelemetryReporter:
    """Buffers telemetry and ships it to the monitor in batches; see the module docstring."""

    def __init__(
        self,
        target: str | None,
        *,
        source: str,
        max_buffer: int = 10_000,
        flush_interval_s: float = 0.25,
        max_batch: int = 2_000,
        timeout_s: float = 1.0,
        samples_per_second: float = SAMPLES_PER_SECOND,
        channel_credentials: Any = None,
        identity: ClientIdentity | None = None,
        model_metrics: bool = True,
    ) -> None:
        self.target = target or None
        # Per-model OpenTelemetry metrics are kept whether or not a monitor is configured.
        self._model_metrics = ModelMetrics(source) if model_metrics else None
        self.source = source
        self.max_buffer = max(1, max_buffer)
        self.flush_interval_s = flush_interval_s
        self.max_batch = max(1, max_batch)
        self.timeout_s = timeout_s
        self.samples_per_second = samples_per_second
        self._credentials = channel_credentials
        self._identity = identity
        self.dropped = 0
        self.sent = 0
        self.failed_batches = 0
        self.samples_sent = 0
        # One line when the monitor stops answering, at most one a minute while it stays down.
        self.outage = OutageLog(log, "monitor", target or "", user=f"{source} telemetry")
        self._dropped_before_outage = 0
        self._records: list[RequestRecord] = []
        self._samples: list[Any] = []
        self._diffs: list[Any] = []
        self._loads: list[Any] = []
        self._quality: list[Any] = []
        self._buckets: dict[str, _TokenBucket] = {}
        self._dropped_unreported = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._channel: Any = None
        self._stub: Any = None
        self._closing = False

    # ---- serving path: cheap, never blocks, never raises -------------------------------------

    def record(self, rec: RequestRecord) -> None:
        """Queue one request record; drop (and count) it when the buffer is full or no monitor."""
        if self._model_metrics is not None:
            self._model_metrics.observe(rec.model, rec.version, rec.alias, rec.status, rec.latency_us, rec.batch_size)
        records = self._records
        if self.target is None or len(records) >= self.max_buffer:
            self.dropped += 1
            self._dropped_unreported += 1
            return
        if not rec.time_ns:
            rec.time_ns = time.time_ns()
        records.append(rec)
        if len(records) == self.max_batch:
            self._nudge()

    def sample_inputs(self, model: str, version: int, inputs: dict[str, np.ndarray]) -> None:
        """Offer a request's inputs for drift; keeps at most `samples_per_second` per model."""
        if self.target is None or len(self._samples) >= _MAX_SIDE_BUFFER:
            return
        try:
            bucket = self._buckets.get(model)
            if bucket is None:
                bucket = self._buckets[model] = _TokenBucket(self.samples_per_second)
            if not bucket.take():
                return
            import numpy as np

            from aiaas.monitor.v1 import monitor_pb2

            now = time.time_ns()
            for name, array in inputs.items():
                arr = np.asarray(array)
                if arr.dtype.kind not in "biuf" or arr.size == 0:
                    continue
                # Rows are the batch dimension; a 1-D input is a batch of scalars (one feature).
                rows = arr.reshape(arr.shape[0], -1) if arr.ndim >= 2 else arr.reshape(-1, 1)
                block = np.ascontiguousarray(rows[:SAMPLE_MAX_ROWS, :SAMPLE_MAX_COLS], dtype="<f4")
                self._samples.append(
                    monitor_pb2.InputSample(
                        model=model, version=version, input=name, rows=block.shape[0], cols=block.shape[1],
                        values_f32=block.tobytes(), time_ns=now,
                    )
                )
        except Exception:  # telemetry must never fail a request
            log.debug("input sample skipped", exc_info=True)

    def report_shadow_diff(
        self, model: str, live_version: int, shadow_version: int, max_abs_diff: float, mismatched: bool
    ) -> None:
        """Record how a shadow version's output compared with the live one."""
        if self.target is None or len(self._diffs) >= _MAX_SIDE_BUFFER:
            return
        try:
            from aiaas.monitor.v1 import monitor_pb2

            self._diffs.append(
                monitor_pb2.ShadowDiff(
                    model=model, live_version=live_version, shadow_version=shadow_version,
                    max_abs_diff=float(max_abs_diff), mismatched=bool(mismatched), time_ns=time.time_ns(),
                )
            )
        except Exception:  # telemetry must never fail a request
            log.debug("shadow diff skipped", exc_info=True)

    def report_load(self, model: str, version: int, load_us: int = 0) -> None:
        """Say a version just became ready (the monitor measures time to first response from it)."""
        if self.target is None or len(self._loads) >= _MAX_SIDE_BUFFER:
            return
        try:
            from aiaas.monitor.v1 import monitor_pb2

            self._loads.append(
                monitor_pb2.ModelLoad(model=model, version=version, load_us=int(load_us), time_ns=time.time_ns())
            )
        except Exception:  # telemetry must never fail a request
            log.debug("load report skipped", exc_info=True)

    def report_quality(self, sample: QualitySample) -> None:
        """Send what a Feedback call said of a prediction (a no-op without a monitor)."""
        if self.target is None or len(self._quality) >= _MAX_SIDE_BUFFER:
            return
        try:
            self._quality.append(sample.to_pb(time.time_ns()))
        except Exception:  # telemetry must never fail a request
            log.debug("quality sample skipped", exc_info=True)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background sender (no-op without a target, or when already started)."""
        if self.target is None or self._task is not None:
            return
        import grpc

        from aiaas.monitor.v1 import monitor_pb2_grpc

        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                   ("grpc.max_send_message_length", 64 * 1024 * 1024),
                   ("grpc.enable_retries", 0)]
        if self._identity is not None:
            self._channel = self._identity.aio_channel(self.target, options)
        elif self._credentials is not None:
            self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        self._stub = monitor_pb2_grpc.MonitorStub(self._channel)
        self._task = asyncio.create_task(self._run(), name=f"telemetry-reporter-{self.source}")
        self._export_counters()

    def _export_counters(self) -> None:
        from opentelemetry import metrics
        from opentelemetry.metrics import CallbackOptions, Observation

        meter = metrics.get_meter("aiaas.telemetry")
        attrs = {"source": self.source}

        def sent(_: CallbackOptions) -> list[Observation]:
            return [Observation(self.sent, attrs)]

        def dropped(_: CallbackOptions) -> list[Observation]:
            return [Observation(self.dropped, attrs)]

        meter.create_observable_counter("aiaas.telemetry.records_sent", [sent],
                                        description="Telemetry records delivered to the monitor")
        meter.create_observable_counter("aiaas.telemetry.records_dropped", [dropped],
                                        description="Telemetry records dropped (buffer full or monitor down)")

    async def close(self) -> None:
        """Send what is buffered (one last try, bounded by the deadline), then stop."""
        if self._task is None:
            return
        self._closing = True
        self._nudge()
        try:
            await asyncio.wait_for(self._task, timeout=self.timeout_s + 1.0)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def flush(self) -> None:
        """Send everything buffered now (for tests and shutdown)."""
        if self._stub is not None:
            await self._send_all()

    # ---- internals ----------------------------------------------------------------------------

    def _nudge(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # loop closed
            pass

    async def _run(self) -> None:
        wake = self._wake
        if wake is None:
            return
        while not self._closing:
            try:
                await asyncio.wait_for(wake.wait(), timeout=self.flush_interval_s)
            except TimeoutError:
                pass
            wake.clear()
            try:
                await self.flush()
            except Exception:  # the sender must outlive any one bad batch
                log.warning("telemetry flush failed", exc_info=True)
        try:
            await self.flush()
        except Exception:  # shutting down anyway
            log.warning("final telemetry flush failed", exc_info=True)

    async def _send_all(self) -> None:
        # Swap the buffers first: records offered while we send go to fresh lists.
        records, self._records = self._records, []
        samples, self._samples = self._samples, []
        diffs, self._diffs = self._diffs, []
        loads, self._loads = self._loads, []
        quality, self._quality = self._quality, []
        if not (records or samples or diffs or loads or quality):
            return
        if self._known_down():
            # Between reconnect attempts a call would fail at once: skip building it.
            self.dropped += len(records)
            self._dropped_unreported += len(records)
            return
        for start in range(0, max(len(records), 1), self.max_batch):
            chunk = records[start:start + self.max_batch]
            ok = await self._send(chunk, samples, diffs, loads, quality)
            samples, diffs, loads, quality = [], [], [], []
            if not ok:
                # The monitor is down or slow: drop the rest of this flush rather than wait.
                lost = len(records) - start - len(chunk)
                self.dropped += lost
                self._dropped_unreported += lost
                return

    def _known_down(self) -> bool:
        import grpc

        channel = self._channel
        if channel is None or self._closing:
            return False
        return bool(channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.TRANSIENT_FAILURE)

    async def _send(self, batch: list[RequestRecord], samples: list[Any], diffs: list[Any],
                    loads: list[Any], quality: list[Any]) -> bool:
        import grpc

        from aiaas.monitor.v1 import monitor_pb2

        make = monitor_pb2.RequestRecord
        request = monitor_pb2.ReportRequest(
            source=self.source,
            records=[
                make(source=r.source, model=r.model, version=r.version, alias=r.alias, status=r.status,
                     latency_us=r.latency_us, queue_us=r.queue_us, compute_us=r.compute_us,
                     batch_size=r.batch_size, key_id=r.key_id, time_ns=r.time_ns,
                     generation=None if r.generation is None else r.generation.to_pb())
                for r in batch
            ],
            samples=samples, shadow_diffs=diffs, loads=loads, quality=quality, dropped=self._dropped_unreported,
        )
        try:
            await self._stub.Report(request, timeout=self.timeout_s)
        except (TimeoutError, grpc.RpcError) as exc:
            if not self.outage.down:
                self._dropped_before_outage = self.dropped
            self.dropped += len(batch)
            self._dropped_unreported += len(batch)
            self.failed_batches += 1
            self.outage.failed(exc, consequence="dropping telemetry (counted) until it answers")
            return False
        if self.outage.down:
            self.outage.recovered(f"{self.dropped - self._dropped_before_outage} records dropped meanwhile")
        self._dropped_unreported = 0
        self.sent += len(batch)
        self.samples_sent += len(samples)
        return True
