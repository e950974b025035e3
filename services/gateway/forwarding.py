"""One forwarded call and its tries: a retry on another replica after a replica failure or an
application refusal, and a hedge after a try has gone unanswered for its per-try timeout.

A failed try is one of two kinds. An *application answer* carries the `aiaas-app-status` trailer
that every service's own errors carry: the replica is up. UNAVAILABLE (model loading, queue timeout,
worker restarting) and RESOURCE_EXHAUSTED (queue full) of that kind go to another replica when one
is left to try, and are passed through as they are otherwise; they never count against the replica.
A *replica failure* is UNAVAILABLE without the trailer (grpc's own: connection refused or reset,
GOAWAY) or a deadline that passed with no answer: it counts towards ejection and is retried, on the
same replica too once every replica was tried.

A hedge sends the same request to another replica while the slow try goes on; the first answer
wins and the other tries are cancelled. When a later try's answer settles the call, an earlier
try still unanswered past its per-try timeout counts against its replica as a stall (a
gateway-level failure: no answer in time; the same request was answered sooner elsewhere); a try
that answers first, however late, counts nothing, and neither does a hedge that lost to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import NoReturn

from services.common import errors
from services.gateway.balancer import Balancer, Replica
from services.gateway.try_timeout import LatencyWindow, TryTimeouts

# A try of the call on one replica within the given seconds; raises ReplicaFailed, Refused or the
# replica's own error.
TryOne = Callable[[Replica, float], Awaitable[bytes]]


class ReplicaFailed(Exception):
    """A transport or gateway-level failure of one replica (counted towards its ejection)."""

    def __init__(self, error: errors.AiaasError) -> None:
        super().__init__(error.message)
        self.error = error


class Refused(Exception):
    """An application answer another replica may serve (model loading, queue full or timed out)."""

    def __init__(self, error: errors.AiaasError) -> None:
        super().__init__(error.message)
        self.error = error


def _retrieve(task: asyncio.Task[bytes]) -> None:
    # A try left behind may have failed meanwhile: its exception is not anyone's to handle.
    if not task.cancelled():
        task.exception()


class ForwardedCall:
    """The tries of one call until an answer, within `deadline` (the loop's clock) and
    `max_attempts`. With `try_timeouts`, tries are timed and hedged; without, one at a time."""

    def __init__(self, balancer: Balancer, try_one: TryOne, *, deadline: float, max_attempts: int,
                 retry_not_found: bool = False, try_timeouts: TryTimeouts | None = None,
                 pool_latency: LatencyWindow | None = None) -> None:
        self.balancer = balancer
        self.try_one = try_one
        self.deadline = deadline
        self.max_attempts = max_attempts
        self.retry_not_found = retry_not_found
        self.try_timeouts = try_timeouts
        self.pool_latency = pool_latency or LatencyWindow()
        self.loop = asyncio.get_running_loop()
        self.attempts = 0
        self.tried: set[str] = set()
        # Replicas that answered this call: not asked again for it.
        self.answered: set[str] = set()
        self.pending: dict[asyncio.Task[bytes], Replica] = {}
        # Tries in the order they started (a try's number).
        self.order: dict[asyncio.Task[bytes], int] = {}
        # Pending tries past their per-try timeout.
        self.stalled: set[asyncio.Task[bytes]] = set()
        self.newest: asyncio.Task[bytes] | None = None
        # When the newest try's per-try timeout passes (None: no hedge for it).
        self.hedge_at: float | None = None
        self.last: errors.AiaasError | None = None
        self.answer: errors.AiaasError | None = None

    async def run(self) -> bytes:
        try:
            while True:
                if not self.pending and not await self._start():
                    self._give_up()
                done = await self._wait()
                if not done:
                    await self._hedge()
                    continue
                for task in done:
                    try:
                        response = self._settle(task)
                    except errors.AiaasError:
                        self._count_stalls(task)  # another replica's own answer ends the call
                        raise
                    if response is not None:
                        self._count_stalls(task)
                        return response
        finally:
            for task in self.pending:
                task.cancel()
                task.add_done_callback(_retrieve)

    async def _start(self) -> bool:
        """Start a try on a replica not tried yet; when every one failed already, on one of them
        after a short pause. False when no try can start (deadline, attempts, or nobody left)."""
        remaining = self.deadline - self.loop.time()
        if remaining <= 0 or self.attempts >= self.max_attempts:
            return False
        busy = {replica.address for replica in self.pending.values()}
        replica = self.balancer.pick(self.tried | self.answered | busy)
        if replica is None:
            if not self.attempts:
                raise errors.Unavailable("no inference replica is known")
            if self.pending or not self.tried - self.answered:
                return False  # a hedge goes to another replica only; or every replica answered
            # Every replica failed once: try again after a short pause, within the deadline.
            self.tried.clear()
            await asyncio.sleep(min(0.05 * self.attempts, remaining / 2))
            replica = self.balancer.pick(self.answered)
            if replica is None:
                return False
        self.tried.add(replica.address)
        self.attempts += 1
        task = self.loop.create_task(self._try(replica))
        self.pending[task] = replica
        self.order[task] = self.attempts
        self.newest = task
        self.hedge_at = None
        if self.try_timeouts is not None:
            now = self.loop.time()
            per_try = self.try_timeouts.for_try(replica.latency, self.pool_latency, self.deadline - now)
            if per_try is not None:
                self.hedge_at = now + per_try
        return True

    async def _try(self, replica: Replica) -> bytes:
        started = self.loop.time()
        response = await self.try_one(replica, self.deadline - started)
        if self.try_timeouts is not None:
            elapsed = self.loop.time() - started
            replica.latency.observe(elapsed)
            self.pool_latency.observe(elapsed)
        return response

    async def _wait(self) -> set[asyncio.Task[bytes]]:
        timeout = None if self.hedge_at is None else max(0.0, self.hedge_at - self.loop.time())
        done, _ = await asyncio.wait(self.pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return done

    async def _hedge(self) -> None:
        """The newest try's per-try timeout passed: the same request to another replica too."""
        self.hedge_at = None
        if self.newest in self.pending:
            self.stalled.add(self.newest)
        await self._start()

    def _settle(self, task: asyncio.Task[bytes]) -> bytes | None:
        """A finished try: its answer, or None to go on; raises the answer that ends the call."""
        replica = self.pending.pop(task)
        self.stalled.discard(task)
        if task is self.newest:
            # The tries still pending are past their per-try timeout: hedge again at once.
            self.hedge_at = self.loop.time() if self.pending and self.try_timeouts is not None else None
        try:
            return task.result()
        except ReplicaFailed as exc:
            self.last = exc.error
        except Refused as exc:
            self.answer = exc.error
            self.answered.add(replica.address)
        except errors.NotFound as exc:
            if not self.retry_not_found:
                raise
            self.last = exc
        return None

    def _count_stalls(self, settled: asyncio.Task[bytes]) -> None:
        """Tries older than the one that settled the call, still unanswered past their per-try timeout."""
        for task in self.stalled:
            if task in self.pending and self.order[task] < self.order[settled]:
                self.balancer.failed(self.pending[task], stalled=True)

    def _give_up(self) -> NoReturn:
        if self.answer is not None:
            raise self.answer  # a replica's own answer, passed through
        if isinstance(self.last, errors.NotFound):
            raise self.last
        if self.last is not None:
            raise errors.Unavailable(f"no inference replica could serve the request: {self.last.message}")
        raise errors.DeadlineExceeded("deadline exceeded before an inference replica answered")
