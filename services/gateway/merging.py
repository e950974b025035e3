"""Merging ModelInfer requests for one model version into one upstream call while the replicas are busy.

On a few cores, what a request through the gateway costs is mostly gRPC's own per-call work, paid
twice (the gateway's outgoing call and the replica's incoming one) on top of the caller's. A replica
batches what it receives anyway, so while enough calls to a target are already running, the gateway
holds compatible requests back for a moment and, when a call comes back, sends every request that
waited in one call: their tensors' bytes concatenated along the batch dimension (up to the version's
max batch size), the answer's outputs cut back into one answer per request, each with its own id.
The replica batches the merged request as it batches any other. A request never waits while fewer
than `max_in_flight` calls per replica to its target run (a lone request goes at once, as it came),
and merging stops at the version's max batch size. The same rule as the delegating backend's
(`services/inference/triton_backend.py`).

A request merges only when its answer is what the replica would have sent it alone: a tensor model
(not decoupled) that batches, with no queue timeout or sequence batching in its config, every
input with its bytes in `raw_input_contents`, fixed-size rows
(no BYTES, no variable dimension besides the batch), no parameters (priority, timeout, sequence,
shared memory...) and no requested outputs. Everything the gateway does per request (keys, quotas,
routing, validation, shadows, drift samples, feedback, telemetry) still happens per request; only
the forwarding is shared. A merged call carries the first request's forwarded metadata (trace
context, request id); it is retried across replicas like any call, and an error it ends with is
every one of its requests' error (as a failed batch is on the replica). Each request's own deadline
still ends its wait. A version with a queue bound (`max_queue_size`) keeps it: once that many of its
requests run or wait here, a further one goes as it came, for the replica to queue or refuse
(RESOURCE_EXHAUSTED), so load is still shed where it was.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import metrics
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from services.common import merged_requests
from services.common.errors import Unavailable
from services.gateway.limits import ELEMENT_BYTES

# Requests waiting to merge, per target; past it a request is forwarded on its own (never refused here).
MAX_WAITING = 4096
# How an expired waiting request is told: "the request's deadline passed <this>".
_WAITED = "while it waited to be forwarded"

# Forwards serialized ModelInfer bytes with (timeout seconds, metadata); answers the response bytes.
Forward = Callable[[bytes, float, tuple[tuple[str, str], ...]], Awaitable[bytes]]


@dataclasses.dataclass(frozen=True, slots=True)
class MergePlan:
    """What a version's ModelConfig says about merging: its max batch rows and each input's row."""

    max_rows: int
    # input name -> (datatype, dims after the batch dimension, bytes per row)
    inputs: dict[str, tuple[str, tuple[int, ...], int]]
    # The version's queue bound (0: none): with this many of its requests running or waiting here,
    # a further one is forwarded as it came, for the replica's queue to take or refuse.
    max_queue: int = 0
    # What must agree for requests to go in one call (while an alias moves, the same target may take
    # requests checked against two versions' configs).
    key: tuple[Any, ...] = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.max_rows, tuple(self.inputs.items())))

    @classmethod
    def from_config(cls, config: Any) -> MergePlan | None:
        """A plan for a ModelConfig (`inference.ModelConfig`), or None when its requests never merge."""
        if config.max_batch_size < 2 or config.model_transaction_policy.decoupled or not config.input:
            return None
        policy = config.dynamic_batching.default_queue_policy
        if policy.default_timeout_microseconds or config.HasField("sequence_batching"):
            return None  # a queue that times requests out must see each one as it came
        inputs: dict[str, tuple[str, tuple[int, ...], int]] = {}
        for tensor in config.input:
            datatype = mc.DataType.Name(tensor.data_type).removeprefix("TYPE_")
            element = ELEMENT_BYTES.get(datatype)  # None for STRING (BYTES): rows of any size
            dims = tuple(int(d) for d in tensor.dims)
            if element is None or any(d < 0 for d in dims) or tensor.HasField("reshape"):
                return None
            inputs[tensor.name] = (datatype, dims, element * math.prod(dims))
        return cls(int(config.max_batch_size), inputs, int(policy.max_queue_size))

    def rows(self, request: Any) -> int:
        """The request's batch rows when it may merge under this plan, else 0."""
        if request.parameters or request.outputs:
            return 0
        inputs = request.inputs
        raw = request.raw_input_contents
        if len(inputs) != len(self.inputs) or len(raw) != len(inputs):
            return 0
        rows = 0
        for tensor, data in zip(inputs, raw, strict=True):
            spec = self.inputs.get(tensor.name)
            if spec is None or tensor.datatype != spec[0] or tensor.parameters or tensor.HasField("contents"):
                return 0
            shape = tensor.shape
            if len(shape) != len(spec[1]) + 1 or tuple(shape[1:]) != spec[1]:
                return 0
            if rows == 0:
                rows = shape[0]
            if shape[0] != rows or rows < 1 or len(data) != rows * spec[2]:
                return 0
        return rows if rows < self.max_rows else 0


class _Waiting:
    __slots__ = ("future", "max_rows", "metadata", "raw", "request", "rows", "timer")

    def __init__(self, request: Any, raw: bytes, rows: int, max_rows: int, future: asyncio.Future[bytes],
                 metadata: tuple[tuple[str, str], ...]) -> None:
        self.request = request
        self.raw = raw
        self.rows = rows
        self.max_rows = max_rows
        self.future = future
        self.metadata = metadata
        self.timer: asyncio.TimerHandle | None = None


class _Target:
    """Requests forwarded to one (model name, version) target: calls running and requests waiting."""

    __slots__ = ("in_flight", "waiting")

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting: collections.deque[_Waiting] = collections.deque()


class Merger:
    """Forwards ModelInfer requests, merging those to one target while `max_in_flight` calls to it run."""

    def __init__(self, forward: Forward, *, max_in_flight: int = 1, replicas: Callable[[], int] = lambda: 1,
                 max_targets: int = 10_000) -> None:
        self._forward = forward
        # Calls per target per replica (the replicas that take traffic, from `replicas`).
        self.max_in_flight = max_in_flight
        self._replicas = replicas
        self._max_targets = max_targets
        self._targets: dict[tuple[tuple[str, str], tuple[Any, ...]], _Target] = {}
        self._calls: set[asyncio.Task[None]] = set()
        # Calls that carried more than one request, and their requests (also exported as metrics).
        self.merged_calls = 0
        self.merged_requests = 0
        meter = metrics.get_meter("aiaas.gateway")
        self._calls_counter = meter.create_counter(
            "gateway.merge.calls", description="ModelInfer calls forwarded with several requests merged in them")
        self._requests_counter = meter.create_counter(
            "gateway.merge.requests", description="ModelInfer requests forwarded merged with others")

    async def forward(self, request: Any, raw: bytes, target: tuple[str, str], plan: MergePlan | None,
                      timeout: float, metadata: tuple[tuple[str, str], ...]) -> bytes:
        """Forward `raw` (the parsed `request`, already retargeted) alone, or merged with others when
        `plan` says it may merge and `target` is busy; answers the response bytes for this request."""
        if plan is None or self.max_in_flight <= 0:
            return await self._forward(raw, timeout, metadata)
        rows = plan.rows(request)
        if rows <= 0:
            return await self._forward(raw, timeout, metadata)
        key = (target, plan.key)
        state = self._targets.get(key)
        if state is None:
            if len(self._targets) >= self._max_targets:
                self._prune()
            state = self._targets[key] = _Target()
        queued = state.in_flight + len(state.waiting)
        if (state.in_flight < self._limit(state) or len(state.waiting) >= MAX_WAITING
                or (plan.max_queue and queued >= plan.max_queue)):
            state.in_flight += 1
            try:
                return await self._forward(raw, timeout, metadata)
            finally:
                state.in_flight -= 1
                self._dispatch(target, state)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        waiting = _Waiting(request, raw, rows, plan.max_rows, future, metadata)
        waiting.timer = loop.call_later(timeout, merged_requests.expire, future, _WAITED)
        state.waiting.append(waiting)
        try:
            return await future
        finally:
            waiting.timer.cancel()

    def _limit(self, state: _Target) -> int:
        """Calls to one target that may run before requests to it wait: `max_in_flight` per replica."""
        if state.in_flight < self.max_in_flight:
            return self.max_in_flight  # below the least limit there is: no need to count replicas
        return self.max_in_flight * max(1, self._replicas())

    def _prune(self) -> None:
        for key in [k for k, s in self._targets.items() if not s.in_flight and not s.waiting]:
            del self._targets[key]

    def _dispatch(self, target: tuple[str, str], state: _Target) -> None:
        waiting = state.waiting
        while waiting and state.in_flight < self._limit(state):
            group: list[_Waiting] = []
            rows = 0
            while waiting:
                head = waiting[0]
                if head.future.done():  # its deadline passed or its caller went away while it waited
                    waiting.popleft()
                    continue
                if group and rows + head.rows > group[0].max_rows:
                    break
                group.append(waiting.popleft())
                rows += head.rows
            if not group:
                return
            state.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._call(target, state, group, rows))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _call(self, target: tuple[str, str], state: _Target, group: list[_Waiting], rows: int) -> None:
        freed = False

        def free() -> None:
            # The next group goes before this one's callers resume (they build and write their
            # responses), so the replica is not left idle for that fan-out.
            nonlocal freed
            freed = True
            state.in_flight -= 1
            self._dispatch(target, state)

        try:
            loop = asyncio.get_running_loop()
            remaining = [w.timer.when() - loop.time() for w in group if w.timer is not None]
            timeout = max(0.001, max(remaining)) if remaining else 30.0
            if len(group) == 1:
                only = group[0]
                answer = await self._forward(only.raw, timeout, only.metadata)
                free()
                merged_requests.settle(only.future, answer)
                return
            requests = [w.request for w in group]
            merged = merged_requests.merge(requests, rows, *target).SerializeToString()
            self.merged_calls += 1
            self.merged_requests += len(group)
            labels = {"model": target[0].partition(":")[0]}
            self._calls_counter.add(1, labels)
            self._requests_counter.add(len(group), labels)
            raw = await self._forward(merged, timeout, group[0].metadata)
            free()
            reply = pb.ModelInferResponse.FromString(raw)
            answers = merged_requests.split(reply, requests, [w.rows for w in group], rows, reply.model_name,
                                            reply.model_version, f"model '{reply.model_name}'")
            for waiting, answer in zip(group, answers, strict=True):
                merged_requests.settle(waiting.future, answer.SerializeToString())
        except BaseException as exc:
            for waiting in group:
                if not waiting.future.done():
                    waiting.future.set_exception(exc if isinstance(exc, Exception) else Unavailable(
                        f"the call to model '{target[0]}' was cancelled (the gateway is stopping); retry"))
            if not isinstance(exc, Exception):
                raise
        finally:
            if not freed:
                free()

