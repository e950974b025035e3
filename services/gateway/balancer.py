"""Client-side load balancing over inference replicas: least outstanding requests, round-robin on
ties, and outlier detection in the manner of Envoy's.

Only failures of the replica itself count against it: a transport failure (connection refused or
reset, GOAWAY, a channel that cannot connect) or a gateway-level failure (a deadline that passed
with no answer). An application answer, even UNAVAILABLE ("model loading", "queue timeout") or
RESOURCE_EXHAUSTED, shows the replica is up and never ejects it. After `eject_after` such
failures in a row a replica is skipped for a growing while; a transport failure while its channel
cannot connect ejects it at once. Panic threshold: when more than `panic_threshold` of the
replicas are ejected, ejection is ignored and every replica takes traffic (ejecting the whole
pool would only turn a partial outage into a total one).

Active health checks feed the same ejection state, so the panic threshold applies to them as to
any failure: a failed check is a transport failure, NOT_SERVING ejects at once. A passing check
brings back at once a replica that was seen down (a transport failure or a failed check), like
Envoy's `successful_active_health_check_uneject_host`; it leaves alone a replica ejected only
for stalls (tries with no answer in time) while its checks kept passing, whose data path is the
problem, and never resets the failures counted by requests.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

from services.gateway.try_timeout import LatencyWindow


@dataclasses.dataclass(eq=False)
class Replica:
    address: str
    outstanding: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    # False after a transport failure, until the replica answers again (anything, even an error).
    reachable: bool = True
    # Seen down (a transport failure or a failed health check) and not seen back since: a passing
    # health check brings it back at once.
    down: bool = False
    # The transport attached by the forwarder (a channel and its method callables).
    transport: Any = None
    # Latencies of its last answered inference tries (its per-try timeout).
    latency: LatencyWindow = dataclasses.field(default_factory=LatencyWindow)

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until


class Balancer:
    def __init__(
        self, *, eject_after: int = 3, eject_base_s: float = 1.0, eject_max_s: float = 30.0,
        panic_threshold: float = 0.5, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.eject_after = eject_after
        self.eject_base_s = eject_base_s
        self.eject_max_s = eject_max_s
        self.panic_threshold = panic_threshold
        self.clock = clock
        self.replicas: list[Replica] = []
        self._next = 0

    def set_addresses(self, addresses: Iterable[str]) -> tuple[list[Replica], list[Replica]]:
        """Make the pool exactly `addresses`; returns (added, removed) replicas."""
        wanted = list(dict.fromkeys(addresses))
        current = {r.address: r for r in self.replicas}
        added = [Replica(a) for a in wanted if a not in current]
        removed = [r for a, r in current.items() if a not in wanted]
        by_address = {**current, **{r.address: r for r in added}}
        self.replicas = [by_address[a] for a in wanted]
        return added, removed

    def healthy(self) -> list[Replica]:
        """The replicas not ejected."""
        now = self.clock()
        return [r for r in self.replicas if not r.ejected(now)]

    def panicking(self) -> bool:
        """More than `panic_threshold` of the replicas are ejected: ejection is ignored."""
        replicas = self.replicas
        if not replicas:
            return False
        now = self.clock()
        ejected = sum(1 for r in replicas if r.ejected(now))
        return ejected > self.panic_threshold * len(replicas)

    def routable(self) -> list[Replica]:
        """The replicas that take traffic: the healthy ones, or all of them in panic."""
        return list(self.replicas) if self.panicking() else self.healthy()

    def pick(self, exclude: frozenset[str] | set[str] = frozenset()) -> Replica | None:
        """The least busy replica not excluded, skipping ejected ones; when every one left is
        ejected, the one back soonest. In panic ejected replicas take traffic too: the least busy
        wins, and on a tie a replica not ejected (or back sooner) goes first."""
        replicas = self.replicas
        count = len(replicas)
        if count == 0:
            return None
        panic = self.panicking()
        now = self.clock()
        start = self._next % count
        self._next += 1
        best: Replica | None = None
        best_key = (0, 0.0)
        fallback: Replica | None = None
        for i in range(count):
            replica = replicas[(start + i) % count]
            if replica.address in exclude:
                continue
            ejected = replica.ejected_until > now
            if ejected and not panic:
                if fallback is None or replica.ejected_until < fallback.ejected_until:
                    fallback = replica
                continue
            key = (replica.outstanding, replica.ejected_until if ejected else 0.0)
            if best is None or key < best_key:
                best, best_key = replica, key
                if key == (0, 0.0):
                    break
        return best if best is not None else fallback

    def succeeded(self, replica: Replica) -> None:
        """The replica answered (a success or an application error): its transport works."""
        replica.consecutive_failures = 0
        replica.ejections = 0
        replica.reachable = True
        replica.down = False

    def failed(self, replica: Replica, *, unreachable: bool = False, stalled: bool = False) -> None:
        """A transport failure, or with `stalled` a gateway-level one (no answer in time);
        `unreachable`: the replica cannot be connected to at all (ejected at once)."""
        replica.consecutive_failures += 1
        if not stalled:
            replica.down = True
        if unreachable:
            replica.reachable = False
        if unreachable or replica.consecutive_failures >= self.eject_after:
            self._eject(replica)

    def check_failed(self, replica: Replica, *, unreachable: bool = False, not_serving: bool = False) -> None:
        """A health check failed (a transport failure); `not_serving`: the replica answered that it
        should get no traffic (draining, say): ejected at once."""
        if not_serving:
            replica.down = True
            self._eject(replica)
        else:
            self.failed(replica, unreachable=unreachable)

    def check_passed(self, replica: Replica) -> bool:
        """A health check said SERVING; True when the replica had been seen down (it is back now)."""
        if not replica.down and replica.reachable:
            return False
        replica.down = False
        replica.reachable = True
        replica.consecutive_failures = 0
        replica.ejected_until = 0.0
        return True

    def _eject(self, replica: Replica) -> None:
        replica.ejections += 1
        backoff = min(self.eject_max_s, self.eject_base_s * 2 ** (replica.ejections - 1))
        replica.ejected_until = self.clock() + backoff
        replica.consecutive_failures = 0
