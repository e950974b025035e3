"""Per-try timeouts of forwarded inference calls, in the manner of Envoy's `per_try_timeout` with
`hedge_on_per_try_timeout`, but derived from each replica's recent latency: how long one try may go
unanswered before the same request is also sent to another replica.

"auto": max(floor, factor x p99 of the replica's last answered tries), the pool's p99 while the
replica has too few; a fixed number of seconds; or "off". Either way a try gets no per-try timeout
when less than `floor` would be left of the caller's deadline after it: a hedge sent then could not
answer in time.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque

from services.common.errors import InvalidArgument

AUTO = "auto"
OFF = "off"


class LatencyWindow:
    """The latencies (seconds) of the last `size` answered tries; their p99 is worked out again every
    `refresh` new ones (a sort of `size` numbers), and is None until `refresh` have come."""

    __slots__ = ("_p99", "_samples", "_since", "refresh")

    def __init__(self, size: int = 128, refresh: int = 16) -> None:
        if size < 1 or not 1 <= refresh <= size:
            raise InvalidArgument("a latency window needs size >= 1 and 1 <= refresh <= size")
        self._samples: deque[float] = deque(maxlen=size)
        self.refresh = refresh
        self._since = 0
        self._p99: float | None = None

    def observe(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._since += 1
        if self._since >= self.refresh:
            self._since = 0
            ordered = sorted(self._samples)
            self._p99 = ordered[math.ceil(0.99 * len(ordered)) - 1]

    def p99(self) -> float | None:
        return self._p99


@dataclasses.dataclass(frozen=True)
class TryTimeouts:
    """The per-try timeout policy: adaptive ("auto"), `fixed_s`, or off (neither)."""

    adaptive: bool = True
    fixed_s: float | None = None
    # Shortest per-try timeout, and the least time left to the caller's deadline for a hedge.
    floor_s: float = 0.25
    # The adaptive timeout is this many times the replica's recent p99.
    p99_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.floor_s <= 0 or self.p99_factor < 1:
            raise InvalidArgument("per-try timeout floor must be > 0 and its p99 factor >= 1")
        if self.fixed_s is not None and (self.adaptive or self.fixed_s <= 0):
            raise InvalidArgument("a fixed per-try timeout must be > 0 and excludes 'auto'")

    @classmethod
    def parse(cls, text: str, *, floor_s: float = 0.25, p99_factor: float = 3.0) -> TryTimeouts:
        """"auto", "off" or a number of seconds (> 0)."""
        value = text.strip().lower()
        if value in (AUTO, OFF):
            return cls(adaptive=value == AUTO, floor_s=floor_s, p99_factor=p99_factor)
        try:
            seconds = float(value)
        except ValueError:
            raise InvalidArgument(f"per_try_timeout must be 'auto', 'off' or seconds, got {text!r}") from None
        if not seconds > 0 or math.isinf(seconds):
            raise InvalidArgument(f"per_try_timeout must be a finite number of seconds > 0, got {text!r}")
        return cls(adaptive=False, fixed_s=seconds, floor_s=floor_s, p99_factor=p99_factor)

    @property
    def enabled(self) -> bool:
        return self.adaptive or self.fixed_s is not None

    def for_try(self, replica: LatencyWindow, pool: LatencyWindow, remaining_s: float) -> float | None:
        """Seconds a try on `replica` may go unanswered before a hedge; None: no hedge, the try has
        the caller's whole remaining deadline."""
        if self.fixed_s is not None:
            timeout = self.fixed_s
        elif self.adaptive:
            p99 = replica.p99()
            if p99 is None:
                p99 = pool.p99()
            if p99 is None:
                return None  # nothing measured yet: no ground to call a try slow
            timeout = max(self.floor_s, self.p99_factor * p99)
        else:
            return None
        if remaining_s - timeout < self.floor_s:
            return None
        return timeout
