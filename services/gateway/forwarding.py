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
from typing import Any, NoReturn

from services.common import errors
from services.gateway.balancer import Balancer, Replica
from services.gateway.try_timeout import LatencyWindow, TryTimeouts

# Starts a try of the call on one replica within the given seconds and returns the grpc call
# (an awaitable with `done`, `cancel` and `add_done_callback`).
Begin = Callable[[Replica, float], Any]
# Awaits a try's grpc call: its answer, or ReplicaFailed, Refused or the replica's own error.
Finish = Callable[[Replica, Any], Awaitable[bytes]]


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


class _Try:
    __slots__ = ("call", "number", "replica", "started", "watched")

    def __init__(self, replica: Replica, call: Any, number: int, started: float) -> None:
        self.replica = replica
        self.call = call
        self.number = number
        self.started = started
        self.watched = False


class ForwardedCall:
    """The tries of one call until an answer, within `deadline` (the loop's clock) and
    `max_attempts`. With `try_timeouts`, tries are timed and hedged; without, one at a time.

    A lone try with no per-try timeout is simply awaited (no task, timer or future of our own);
    otherwise the tries' grpc calls wake one future, as does the newest try's per-try timer."""

    def __init__(self, balancer: Balancer, begin: Begin, finish: Finish, *, deadline: float, max_attempts: int,
                 retry_not_found: bool = False, try_timeouts: TryTimeouts | None = None,
                 pool_latency: LatencyWindow | None = None) -> None:
        self.balancer = balancer
        self.begin = begin
        self.finish = finish
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
        self.pending: list[_Try] = []
        # Pending tries whose grpc call has ended, not settled yet.
        self.ended: list[_Try] = []
        # Pending tries past their per-try timeout.
        self.stalled: set[_Try] = set()
        # When the newest try's per-try timeout passes (None: no hedge for it).
        self.hedge_at: float | None = None
        self.timed_out = False
        self._waiter: asyncio.Future[None] | None = None
        self.last: errors.AiaasError | None = None
        self.answer: errors.AiaasError | None = None

    async def run(self) -> bytes:
        try:
            while True:
                if not self.pending and not await self._start():
                    self._give_up()
                for attempt in await self._ended():
                    try:
                        response = await self._settle(attempt)
                    except errors.AiaasError:
                        self._count_stalls(attempt)  # another replica's own answer ends the call
                        raise
                    if response is not None:
                        self._count_stalls(attempt)
                        return response
        finally:
            for attempt in self.pending:  # hedged away, or the caller is gone
                attempt.call.cancel()
                attempt.replica.outstanding -= 1

    async def _start(self) -> bool:
        """Start a try on a replica not tried yet; when every one failed already, on one of them
        after a short pause. False when no try can start (deadline, attempts, or nobody left)."""
        remaining = self.deadline - self.loop.time()
        if remaining <= 0 or self.attempts >= self.max_attempts:
            return False
        busy = {attempt.replica.address for attempt in self.pending}
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
        now = self.loop.time()
        call = self.begin(replica, self.deadline - now)
        replica.outstanding += 1
        self.tried.add(replica.address)
        self.attempts += 1
        self.pending.append(_Try(replica, call, self.attempts, now))
        self.hedge_at = None
        if self.try_timeouts is not None:
            per_try = self.try_timeouts.for_try(replica.latency, self.pool_latency, self.deadline - now)
            if per_try is not None:
                self.hedge_at = now + per_try
        return True

    async def _ended(self) -> list[_Try]:
        """The tries to settle next: a lone untimed one as it is (settling awaits it); otherwise
        those that have ended, once one has, hedging each time the newest's per-try timeout passes."""
        if not self.ended and self.hedge_at is None and len(self.pending) == 1:
            return list(self.pending)
        while not self.ended:
            for attempt in self.pending:
                self._watch(attempt)
            if self.ended:
                break
            self._waiter = self.loop.create_future()
            timer = None if self.hedge_at is None else self.loop.call_at(self.hedge_at, self._on_timer)
            try:
                await self._waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if self.timed_out:
                await self._hedge()
        ended, self.ended = self.ended, []
        return ended

    def _watch(self, attempt: _Try) -> None:
        if attempt.watched:
            return
        attempt.watched = True
        if attempt.call.done():
            self.ended.append(attempt)
        else:
            attempt.call.add_done_callback(lambda _call: self._on_end(attempt))

    def _on_end(self, attempt: _Try) -> None:
        if attempt in self.pending and attempt not in self.ended:
            self.ended.append(attempt)
            self._wake()

    def _on_timer(self) -> None:
        self.timed_out = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _hedge(self) -> None:
        """The newest try's per-try timeout passed: the same request to another replica too."""
        self.timed_out = False
        self.hedge_at = None
        if self.pending:
            self.stalled.add(self.pending[-1])
        await self._start()

    async def _settle(self, attempt: _Try) -> bytes | None:
        """A finished try: its answer, or None to go on; raises the answer that ends the call."""
        newest = attempt is self.pending[-1]
        try:
            response = await self.finish(attempt.replica, attempt.call)
            if self.try_timeouts is not None:
                elapsed = self.loop.time() - attempt.started
                attempt.replica.latency.observe(elapsed)
                self.pool_latency.observe(elapsed)
            return response
        except ReplicaFailed as exc:
            self.last = exc.error
        except Refused as exc:
            self.answer = exc.error
            self.answered.add(attempt.replica.address)
        except errors.NotFound as exc:
            if not self.retry_not_found:
                raise
            self.last = exc
        finally:
            self.pending.remove(attempt)
            if attempt in self.ended:  # a lone try's call may end while it is awaited
                self.ended.remove(attempt)
            self.stalled.discard(attempt)
            attempt.replica.outstanding -= 1
            if newest:
                # The tries still pending are past their per-try timeout: hedge again at once.
                self.hedge_at = self.loop.time() if self.pending and self.try_timeouts is not None else None
        return None

    def _count_stalls(self, settled: _Try) -> None:
        """Tries older than the one that settled the call, still unanswered past their per-try timeout."""
        for attempt in self.stalled:
            if attempt.number < settled.number and attempt in self.pending:
                self.balancer.failed(attempt.replica, stalled=True)

    def _give_up(self) -> NoReturn:
        if self.answer is not None:
            raise self.answer  # a replica's own answer, passed through
        if isinstance(self.last, errors.NotFound):
            raise self.last
        if self.last is not None:
            raise errors.Unavailable(f"no inference replica could serve the request: {self.last.message}")
        raise errors.DeadlineExceeded("deadline exceeded before an inference replica answered")
