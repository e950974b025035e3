"""The inference service's core: a loaded version and how a request runs on it (its types in `entities`).

No grpc here. A `LoadedVersion` owns an `Executor` (a dynamic batcher over a worker pool, or a
remote Triton server), its signature, its statistics and its lifecycle state. It counts its
in-flight requests itself so that a swap can drain it without failing any of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from services.common.errors import AiaasError, DeadlineExceeded, FailedPrecondition, Internal, Unavailable
from services.common.reporting import GenerationStats
from services.inference.entities import Executor, RequestObserver, RequestRecord, VersionSpec, VersionState
from services.inference.statistics import VersionStatistics

_R = TypeVar("_R")


def status_of(exc: BaseException) -> str:
    if isinstance(exc, AiaasError):
        return exc.code.name
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


class LoadedVersion:
    """A version the service holds: executor, signature, statistics and state."""

    def __init__(self, spec: VersionSpec, observer: RequestObserver | None = None) -> None:
        self.spec = spec
        self.model = spec.model
        self.version = spec.version
        self.version_str = str(spec.version)
        self.state = VersionState.LOADING
        self.reason = ""
        self.executor: Executor | None = None
        self.stats = VersionStatistics()
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self._observer = observer
        # A generative version streams `generate` instead of answering `infer` (checked once per request).
        self.generative = spec.generative
        # Filled by convert.py once, so the hot path never rebuilds signature checks.
        self.input_plan: Any = None
        self.output_plan: Mapping[str, Any] | None = None

    @property
    def ready(self) -> bool:
        return self.state is VersionState.READY

    async def infer(self, inputs: dict[str, np.ndarray], rows: int, *, priority: int = 0,
                    timeout_us: int | None = None, deadline_bound: bool = False) -> Any:
        """Run one request. `deadline_bound`: the timeout is the caller's gRPC deadline.

        The in-flight count goes up before the first await, so a request that resolved this
        version before a swap is always counted by the drain that follows.
        """
        self.in_flight += 1
        started = time.perf_counter_ns()
        executor = self.executor
        try:
            if executor is None:
                raise Unavailable(f"model '{self.model}' version {self.version} is not ready")
            outcome = await executor.infer(inputs, priority=priority, timeout_us=timeout_us)
        except DeadlineExceeded as exc:
            self._finish_failed(started, exc)
            if deadline_bound:
                raise
            # Triton reports an expired queue timeout (the `timeout` parameter) as UNAVAILABLE.
            raise Unavailable("Request timeout expired") from None
        except BaseException as exc:
            self._finish_failed(started, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, AiaasError):
                raise
            raise Internal(f"model '{self.model}' version {self.version} failed: {exc}") from exc
        total = time.perf_counter_ns() - started
        self.stats.record_success(rows, total, outcome.queue_ns, outcome.compute_input_ns,
                                  outcome.compute_infer_ns, outcome.compute_output_ns)
        if self._observer is not None:
            self._observer(RequestRecord(
                self.model, self.version, "OK", total, outcome.queue_ns,
                outcome.compute_input_ns + outcome.compute_infer_ns + outcome.compute_output_ns,
                outcome.batch_size, inputs))
        self._leave()
        return outcome

    async def generate(self, message: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """Run one generation on a generative version: its chunks (`generative_workers.Chunk`), the last finished.

        Counted in flight from before the first await to the end (a drain waits for it), recorded in
        the statistics, and reported with its `GenerationStats` once it ends. A last chunk that
        carries an error is yielded too; the caller turns it into the request's status.
        """
        self.in_flight += 1
        started = time.perf_counter_ns()
        executor = self.executor
        last = None
        try:
            if executor is None:
                raise Unavailable(f"model '{self.model}' version {self.version} is not ready")
            generate = getattr(executor, "generate", None)
            if generate is None:
                raise FailedPrecondition(f"model '{self.model}' version {self.version} is not a generative model")
            stream = generate(message)
            try:
                async for chunk in stream:
                    if chunk.finished:
                        last = chunk
                    yield chunk
            finally:
                await stream.aclose()
        except BaseException as exc:
            if last is None:
                self._finish_failed(started, asyncio.CancelledError() if isinstance(exc, GeneratorExit) else exc)
                raise
        if last is None:  # pragma: no cover - the worker always ends a generation with a last chunk
            self._finish_failed(started, Internal("the generation ended without a last chunk"))
            return
        self._finish_generation(started, last)

    def _finish_generation(self, started: int, last: Any) -> None:
        total = time.perf_counter_ns() - started
        generation = GenerationStats(
            prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens, ttft_us=last.ttft_us,
            itl_mean_us=last.itl_mean_us, itl_max_us=last.itl_max_us,
            generation_us=max(0, last.e2e_us - last.queue_us), preemptions=last.preemptions,
            kv_cache_usage=last.kv_used / last.kv_total if last.kv_total else 0.0, finish_reason=last.finish_reason)
        queue_ns = min(total, last.queue_us * 1000)
        if last.error is None:
            status = "OK"
            self.stats.record_success(1, total, queue_ns, 0, total - queue_ns, 0)
            self.stats.record_execution(1, 0, total - queue_ns, 0)
        else:
            status = status_of(last.error)
            self.stats.record_failure(total)
        if self._observer is not None:
            self._observer(RequestRecord(self.model, self.version, status, total, queue_ns, total - queue_ns, 1,
                                         generation=generation))
        self._leave()

    async def run_whole(self, send: Callable[[], Awaitable[tuple[_R, int]]], rows: int,
                        inputs: Mapping[str, np.ndarray] | None = None) -> _R:
        """Run one request that the executor forwards whole (the Triton-delegating raw path).

        The same in-flight count, statistics and telemetry as `infer`, for a request whose tensors
        are never decoded here: `send()` returns the answer and its compute time in ns; `inputs`
        (read only if telemetry samples them) stands for the request's tensors.
        """
        self.in_flight += 1
        started = time.perf_counter_ns()
        try:
            if self.executor is None:
                raise Unavailable(f"model '{self.model}' version {self.version} is not ready")
            answer, compute_ns = await send()
        except BaseException as exc:
            self._finish_failed(started, exc)
            if isinstance(exc, (asyncio.CancelledError, AiaasError)):
                raise
            raise Internal(f"model '{self.model}' version {self.version} failed: {exc}") from exc
        total = time.perf_counter_ns() - started
        self.stats.record_success(rows, total, 0, 0, compute_ns, 0)
        if self._observer is not None:
            self._observer(RequestRecord(self.model, self.version, "OK", total, 0, compute_ns, rows, inputs))
        self._leave()
        return answer

    def record_rejected(self, exc: BaseException) -> None:
        """A request refused before it reached the executor (bad input) still counts as a failure."""
        self.stats.record_failure(0)
        if self._observer is not None:
            self._observer(RequestRecord(self.model, self.version, status_of(exc), 0))

    def _finish_failed(self, started: int, exc: BaseException) -> None:
        elapsed = time.perf_counter_ns() - started
        self.stats.record_failure(elapsed)
        if self._observer is not None:
            self._observer(RequestRecord(self.model, self.version, status_of(exc), elapsed))
        self._leave()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False when `timeout_s` passed first."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def drain_and_close(self, timeout_s: float) -> bool:
        """Stop taking requests (the caller has already unrouted it), finish in-flight ones, free it."""
        self.state = VersionState.DRAINING
        drained = await self.wait_idle(timeout_s)
        executor, self.executor = self.executor, None
        if executor is not None:
            if drained:
                await executor.drain()
            await executor.close()
        return drained

