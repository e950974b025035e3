"""The domain of the inference service: what a loaded version is and how a request runs on it.

No grpc here. A `LoadedVersion` owns an `Executor` (a dynamic batcher over a worker pool, or a
remote Triton server), its signature, its statistics and its lifecycle state. It counts its
in-flight requests itself so that a swap can drain it without failing any of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from aiaas.formats import platform_of
from aiaas.serving import ServingConfig
from aiaas.tensors import TensorSpec
from services.common.errors import AiaasError, DeadlineExceeded, Internal, Unavailable
from services.inference.statistics import VersionStatistics


@dataclasses.dataclass(frozen=True)
class VersionSpec:
    """One immutable version as the registry describes it (or as a Triton backend reports it)."""

    model: str
    version: int
    # An `aiaas.formats` name, or "triton" for a model delegated to a remote Triton server.
    format: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    serving: ServingConfig = dataclasses.field(default_factory=ServingConfig)
    sha256: str = ""
    size: int = 0
    # Platform reported by a remote Triton server; derived from the format otherwise.
    remote_platform: str = ""

    @property
    def platform(self) -> str:
        return self.remote_platform or platform_of(self.format)

    @property
    def key(self) -> tuple[str, int]:
        return (self.model, self.version)


class VersionState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    DRAINING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclasses.dataclass
class Outcome:
    """What an executor returns for one request (the batcher's InferOutcome has this shape)."""

    outputs: dict[str, np.ndarray]
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    batch_size: int = 1


class Executor(Protocol):
    """Runs requests for one version: `DynamicBatcher` + `WorkerPool`, or a remote Triton model."""

    async def start(self) -> None: ...

    async def infer(self, inputs: dict[str, np.ndarray], *, priority: int, timeout_us: int | None) -> Any: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """A finished request, as telemetry wants it (the monitor's reporter hooks in here)."""

    model: str
    version: int
    status: str
    latency_ns: int
    queue_ns: int = 0
    compute_ns: int = 0
    batch_size: int = 0
    # The request's inputs (not copied), for drift sampling; None for failed requests.
    inputs: Mapping[str, np.ndarray] | None = None


RequestObserver = Callable[[RequestRecord], None]


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

