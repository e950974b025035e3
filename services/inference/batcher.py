"""Dynamic batching with Triton's knobs, for one loaded version.

Each queued request carries its own future. Requests wait in one FIFO per priority level; a batch
is formed when a concurrency slot is free and either the rows of compatible requests reach
`max_batch_size` or a preferred size, or the oldest request has waited `max_queue_delay_us`
(the wait starts when it arrived), or (idle dispatch, on by default) the batch holds every queued
request: an instance is free and waiting would only leave it idle. Requests are compatible when their inputs agree on names,
dtypes and every non-batch dimension, so only those are concatenated along dim 0.

Nothing here polls: the scheduler runs when a request arrives, a batch finishes, a request
expires or is cancelled, or the one queue-delay timer fires. Expired and cancelled requests are
dropped before the model runs. Tensor merge and split live in `services.inference.batching`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import numpy as np

from services.common.errors import (
    AiaasError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from services.inference.batching import merge, rows_and_key, split

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int  # 0 = no batching: each request runs alone
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024  # total queued requests; 0 = unlimited
    default_timeout_us: int = 0  # 0 = none
    priority_levels: int = 1  # 1..N, 1 highest
    default_priority_level: int = 1
    max_concurrent_batches: int = 1
    # A batch goes at once when an instance is free and it holds every queued request: waiting
    # could only delay it. The queue delay applies only while every instance is busy, when more
    # requests can arrive before one is free. False: Triton's strict wait.
    idle_dispatch: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise InvalidArgument(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        for size in self.preferred_batch_sizes:
            if size < 1 or (self.max_batch_size and size > self.max_batch_size):
                raise InvalidArgument(
                    f"preferred batch size {size} must be in [1, max_batch_size={self.max_batch_size}]"
                )
        if self.max_queue_delay_us < 0 or self.default_timeout_us < 0 or self.max_queue_size < 0:
            raise InvalidArgument("max_queue_delay_us, default_timeout_us and max_queue_size must be >= 0")
        if self.priority_levels < 1:
            raise InvalidArgument(f"priority_levels must be >= 1, got {self.priority_levels}")
        if not 1 <= self.default_priority_level <= self.priority_levels:
            raise InvalidArgument(
                f"default_priority_level {self.default_priority_level} must be in [1, {self.priority_levels}]"
            )
        if self.max_concurrent_batches < 1:
            raise InvalidArgument(f"max_concurrent_batches must be >= 1, got {self.max_concurrent_batches}")


@dataclasses.dataclass
class InferOutcome:
    outputs: dict[str, np.ndarray]
    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int
    batch_size: int  # rows in the batch this request ran in


@dataclasses.dataclass
class BatchResult:
    """What a runner returns for one batch: outputs with the batch's rows, and where time went."""

    outputs: dict[str, np.ndarray]
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0


@dataclasses.dataclass(frozen=True)
class BatchExecution:
    """One successfully executed batch, for Triton's per-batch-size execution statistics."""

    batch_size: int  # rows (1 per request without batching)
    request_count: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int


RunBatch = Callable[[dict[str, np.ndarray]], Awaitable[BatchResult]]

_QUEUED, _TAKEN, _DONE = 0, 1, 2


class _Request:
    __slots__ = ("deadline_ns", "enqueued_ns", "expiry", "future", "inputs", "key", "rows", "state")

    def __init__(
        self, inputs: dict[str, np.ndarray], rows: int, key: Hashable, future: asyncio.Future[Any], now: int
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.future = future
        self.enqueued_ns = now
        self.deadline_ns = 0
        self.state = _QUEUED
        self.expiry: asyncio.TimerHandle | None = None


class DynamicBatcher:
    """Queues requests, forms batches, runs them through `run_batch`, answers each request."""

    def __init__(
        self,
        run_batch: RunBatch,
        config: BatchingConfig,
        on_batch: Callable[[BatchExecution], None] | None = None,
        *,
        name: str = "model",
    ) -> None:
        self._run_batch = run_batch
        self.config = config
        self._on_batch = on_batch
        self._name = name
        self._batching = config.max_batch_size > 0
        self._preferred = frozenset(config.preferred_batch_sizes)
        self._delay_ns = config.max_queue_delay_us * 1000
        self._levels: list[deque[_Request]] = [deque() for _ in range(config.priority_levels)]
        self._queued = 0
        self._running_batches = 0
        self._in_flight = 0
        self._accepting = True
        self._closing_reason = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at_ns = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Callers' tasks running their own single-request batch inline, and those close() cancelled.
        self._inline: set[asyncio.Task[Any] | None] = set()
        self._aborted: set[asyncio.Task[Any] | None] = set()
        self._idle: asyncio.Event | None = None

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        """Requests inside batches that are executing now."""
        return self._in_flight

    async def submit(
        self, inputs: dict[str, np.ndarray], *, priority: int = 0, timeout_us: int | None = None
    ) -> InferOutcome:
        if not self._accepting:
            raise Unavailable(f"model '{self._name}' is {self._closing_reason}; retry")
        config = self.config
        rows, key = rows_and_key(inputs, self._batching)
        if self._batching and rows > config.max_batch_size:
            raise InvalidArgument(
                f"inference request batch-size must be <= {config.max_batch_size} "
                f"for '{self._name}', got {rows}"
            )
        if config.max_queue_size and self._queued >= config.max_queue_size:
            raise ResourceExhausted(
                f"exceeds maximum queue size of {config.max_queue_size} for model '{self._name}'"
            )
        if priority < 0:
            raise InvalidArgument(f"priority must be >= 0, got {priority}")
        level = priority if 1 <= priority <= config.priority_levels else config.default_priority_level
        timeout = effective_timeout_us(timeout_us, config.default_timeout_us)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = time.monotonic_ns()
        request = _Request(inputs, rows, key, loop.create_future(), now)
        if timeout:
            request.deadline_ns = now + timeout * 1000
            request.expiry = loop.call_at(request.deadline_ns / 1e9, self._expire, request)
        self._levels[level - 1].append(request)
        self._queued += 1
        inline = self._schedule(request)
        try:
            if inline is None:
                return await request.future
            # A batch of just this request: run it in this task, with no hop through the loop.
            task = asyncio.current_task()
            self._inline.add(task)
            try:
                await self._execute(inline, inline=True)
            finally:
                self._inline.discard(task)
            return request.future.result()
        except asyncio.CancelledError:
            if request.state == _QUEUED:
                self._drop(request)
                self._schedule()
            task = asyncio.current_task()
            if task in self._aborted:  # close() gave up on this batch, not the caller on us
                self._aborted.discard(task)
                if task is not None:
                    task.uncancel()
                raise Unavailable(f"model '{self._name}' closed while running the batch; retry") from None
            raise

    async def drain(self) -> None:
        """Stop accepting (Unavailable "draining"); wait until queued and running requests finish."""
        self._stop_accepting("draining")
        await self._wait_idle()

    async def close(self, *, grace_s: float | None = None) -> None:
        """Fail queued requests with Unavailable; wait for running batches (cancelled after `grace_s`)."""
        self._stop_accepting("closing")
        error = Unavailable(f"model '{self._name}' is closing; retry")
        for level in self._levels:
            while level:
                request = level.popleft()
                if request.state == _QUEUED:
                    self._drop(request)
                    request.future.set_exception(error)
        self._cancel_timer()
        if not self._running_batches:
            return
        try:
            await asyncio.wait_for(self._wait_idle(), grace_s)
        except TimeoutError:
            for task in self._tasks:
                task.cancel()
            for caller in self._inline:
                if caller is not None:
                    self._aborted.add(caller)
                    caller.cancel()
            await self._wait_idle()

    # --- scheduling -------------------------------------------------------------------------

    def _stop_accepting(self, reason: str) -> None:
        if self._accepting:
            self._accepting = False
            self._closing_reason = reason

    async def _wait_idle(self) -> None:
        while self._queued or self._running_batches:
            if self._idle is None:
                self._idle = asyncio.Event()
            self._idle.clear()
            await self._idle.wait()

    def _notify_idle(self) -> None:
        if self._idle is not None and not self._queued and not self._running_batches:
            self._idle.set()

    def _drop(self, request: _Request) -> None:
        """Take a queued request out of the count; its deque entry is skipped lazily."""
        request.state = _DONE
        self._queued -= 1
        if request.expiry is not None:
            request.expiry.cancel()
            request.expiry = None

    def _expire(self, request: _Request) -> None:
        """The request's timeout timer fired."""
        request.expiry = None
        if request.state == _QUEUED:
            self._fail_expired(request, time.monotonic_ns())
            self._schedule()

    def _fail_expired(self, request: _Request, now: int) -> None:
        self._drop(request)
        if not request.future.done():
            waited_us = (now - request.enqueued_ns) // 1000
            request.future.set_exception(
                DeadlineExceeded(
                    f"request timeout expired after {waited_us} us in the queue of '{self._name}'"
                )
            )

    def _schedule(self, caller: _Request | None = None) -> list[_Request] | None:
        """Dispatch what can run now; a batch of only `caller` is handed back to run inline."""
        inline = None
        while self._queued and self._running_batches < self.config.max_concurrent_batches:
            batch = self._form_batch()
            if batch is None:
                break
            self._running_batches += 1
            self._in_flight += len(batch)
            if inline is None and len(batch) == 1 and batch[0] is caller:
                inline = batch
            else:
                self._launch(batch)
        if not self._queued:
            self._cancel_timer()
        self._notify_idle()
        return inline

    def _head(self, now: int) -> _Request | None:
        for level in self._levels:
            while level:
                request = level[0]
                if request.state == _QUEUED:
                    if not request.deadline_ns or request.deadline_ns > now:
                        return request
                    self._fail_expired(request, now)
                level.popleft()
        return None

    def _form_batch(self) -> list[_Request] | None:
        """The next batch to run now, or None when it should wait for the queue-delay timer."""
        now = time.monotonic_ns()
        head = self._head(now)
        if head is None:
            return None
        if not self._batching:
            return self._take([head])
        limit = self.config.max_batch_size
        chosen: list[_Request] = []
        rows = 0
        full = False
        preferred_at = 0  # requests in the longest prefix whose rows are a preferred size
        for level in self._levels:
            for request in level:
                if request.state != _QUEUED or request.key != head.key:
                    continue
                if request.deadline_ns and request.deadline_ns <= now:
                    self._fail_expired(request, now)
                    continue
                if rows + request.rows > limit:
                    full = True
                    break
                chosen.append(request)
                rows += request.rows
                if rows in self._preferred:
                    preferred_at = len(chosen)
                if rows == limit:
                    full = True
                    break
            if full:
                break
        if rows == limit:
            return self._take(chosen)
        if preferred_at:
            return self._take(chosen[:preferred_at])
        if full or not self._delay_ns:
            return self._take(chosen)
        due = head.enqueued_ns + self._delay_ns
        if now >= due:
            return self._take(chosen)
        # Called only while an instance is free: with nothing else queued, waiting for the timer
        # would leave that instance idle for the whole delay.
        if self.config.idle_dispatch and len(chosen) == self._queued:
            return self._take(chosen)
        self._arm_timer(due)
        return None

    def _take(self, requests: list[_Request]) -> list[_Request]:
        for request in requests:
            request.state = _TAKEN
            if request.expiry is not None:
                request.expiry.cancel()
                request.expiry = None
        self._queued -= len(requests)
        return requests

    def _arm_timer(self, due_ns: int) -> None:
        if self._timer is not None:
            if self._timer_at_ns == due_ns:
                return
            self._timer.cancel()
        assert self._loop is not None
        self._timer_at_ns = due_ns
        self._timer = self._loop.call_at(due_ns / 1e9, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule()

    # --- execution --------------------------------------------------------------------------

    def _launch(self, batch: list[_Request]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._execute(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[_Request], *, inline: bool = False) -> None:
        started = time.monotonic_ns()
        rows = sum(r.rows for r in batch) if self._batching else 1
        freed = False
        try:
            try:
                inputs = merge([r.inputs for r in batch])
                result = await self._run_batch(inputs)
                # The instance is free again: start the next batch before answering this one's
                # callers, so the instance computes while their responses are built and written
                # (otherwise it sits idle for the whole fan-out of a full batch).
                freed = True
                self._running_batches -= 1
                if self._queued:
                    running = self._running_batches
                    self._schedule()
                    if inline and self._running_batches > running:
                        # This task answers its own caller next: let the launched batch start first.
                        await asyncio.sleep(0)
                parts = split(result.outputs, [r.rows for r in batch], rows) if self._batching else [result.outputs]
            except AiaasError as exc:
                _fail(batch, exc)
                return
            except asyncio.CancelledError:
                if inline:
                    batch[0].future.cancel()  # its own caller was cancelled
                else:
                    _fail(batch, Unavailable(f"model '{self._name}' closed while running the batch; retry"))
                raise
            except Exception as exc:
                log.exception("batch of %d rows failed for model '%s'", rows, self._name)
                _fail(batch, Internal(f"model execution failed for '{self._name}': {exc}"))
                return
            for request, outputs in zip(batch, parts, strict=True):
                if not request.future.done():
                    request.future.set_result(
                        InferOutcome(
                            outputs,
                            started - request.enqueued_ns,
                            result.compute_input_ns,
                            result.compute_infer_ns,
                            result.compute_output_ns,
                            rows,
                        )
                    )
            if self._on_batch is not None:
                self._on_batch(
                    BatchExecution(
                        rows,
                        len(batch),
                        result.compute_input_ns,
                        result.compute_infer_ns,
                        result.compute_output_ns,
                    )
                )
        finally:
            if not freed:
                self._running_batches -= 1
            self._in_flight -= len(batch)
            for request in batch:
                request.state = _DONE
            self._schedule()


def _fail(batch: list[_Request], error: BaseException) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(error)


def effective_timeout_us(requested: int | None, default: int) -> int:
    """A request's own non-zero timeout wins, but may only shorten a configured default."""
    if not requested:
        return default
    if requested < 0:
        raise InvalidArgument(f"timeout must be >= 0 microseconds, got {requested}")
    return min(requested, default) if default else requested
