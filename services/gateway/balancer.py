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
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any


@dataclasses.dataclass(eq=False)
class Replica:
    address: str
    outstanding: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    # False after a transport failure, until the replica answers again (anything, even an error).
    reachable: bool = True
    # The transport attached by the forwarder (a channel and its method callables).
    transport: Any = None

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

    def failed(self, replica: Replica, *, unreachable: bool = False) -> None:
        """A transport or gateway-level failure; `unreachable`: the replica cannot be connected to
        at all (ejected at once)."""
        replica.consecutive_failures += 1
        if unreachable:
            replica.reachable = False
        if unreachable or replica.consecutive_failures >= self.eject_after:
            replica.ejections += 1
            backoff = min(self.eject_max_s, self.eject_base_s * 2 ** (replica.ejections - 1))
            replica.ejected_until = self.clock() + backoff
            replica.consecutive_failures = 0
