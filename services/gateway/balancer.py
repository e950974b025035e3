"""Client-side load balancing over inference replicas: least outstanding requests, round-robin on
ties, and passive ejection (a replica that keeps failing is skipped for a growing while)."""

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
    # The transport attached by the forwarder (a channel and its method callables).
    transport: Any = None

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until


class Balancer:
    def __init__(
        self, *, eject_after: int = 3, eject_base_s: float = 1.0, eject_max_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.eject_after = eject_after
        self.eject_base_s = eject_base_s
        self.eject_max_s = eject_max_s
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
        now = self.clock()
        return [r for r in self.replicas if not r.ejected(now)]

    def pick(self, exclude: frozenset[str] | set[str] = frozenset()) -> Replica | None:
        """The least busy replica not excluded; when all are ejected, the one back soonest."""
        replicas = self.replicas
        count = len(replicas)
        if count == 0:
            return None
        now = self.clock()
        start = self._next % count
        self._next += 1
        best: Replica | None = None
        fallback: Replica | None = None
        for i in range(count):
            replica = replicas[(start + i) % count]
            if replica.address in exclude:
                continue
            if replica.ejected_until > now:
                if fallback is None or replica.ejected_until < fallback.ejected_until:
                    fallback = replica
                continue
            if best is None or replica.outstanding < best.outstanding:
                best = replica
                if best.outstanding == 0:
                    break
        return best if best is not None else fallback

    def succeeded(self, replica: Replica) -> None:
        replica.consecutive_failures = 0
        replica.ejections = 0

    def failed(self, replica: Replica) -> None:
        replica.consecutive_failures += 1
        if replica.consecutive_failures >= self.eject_after:
            replica.ejections += 1
            backoff = min(self.eject_max_s, self.eject_base_s * 2 ** (replica.ejections - 1))
            replica.ejected_until = self.clock() + backoff
            replica.consecutive_failures = 0
