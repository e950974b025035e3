"""Alert state and fan-out: a condition fires once, resolves once, and every subscriber hears it.

Each subscriber has a bounded queue: one that does not keep up loses its oldest pending
alerts, and the next alert it gets says how many it missed. Nothing here blocks the evaluator.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import AsyncIterator

from services.monitor.entities import Alert, AlertState


class AlertSubscription:
    def __init__(self, hub: AlertHub, model: str, max_pending: int) -> None:
        self._hub = hub
        self.model = model
        self._pending: collections.deque[Alert] = collections.deque()
        self._max_pending = max_pending
        self._missed = 0
        self._ready = asyncio.Event()
        self._closed = False

    def offer(self, alert: Alert) -> None:
        if self.model and alert.model != self.model:
            return
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self._missed += 1
        self._pending.append(alert)
        self._ready.set()

    async def next(self) -> tuple[Alert, int]:
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        alert = self._pending.popleft()
        missed, self._missed = self._missed, 0
        return alert, missed

    def __aiter__(self) -> AsyncIterator[tuple[Alert, int]]:
        return self

    async def __anext__(self) -> tuple[Alert, int]:
        return await self.next()

    def close(self) -> None:
        self._closed = True
        self._ready.set()
        self._hub._subscribers.discard(self)


class AlertHub:
    def __init__(self, history: int = 1000, subscriber_queue: int = 1000) -> None:
        self.active: dict[str, Alert] = {}
        self.history: collections.deque[Alert] = collections.deque(maxlen=history)
        self._subscribers: set[AlertSubscription] = set()
        self._subscriber_queue = subscriber_queue

    def subscribe(self, model: str = "", include_active: bool = False) -> AlertSubscription:
        sub = AlertSubscription(self, model, self._subscriber_queue)
        if include_active:
            for alert in sorted(self.active.values(), key=lambda a: a.time_ns):
                sub.offer(alert)
        self._subscribers.add(sub)
        return sub

    def _publish(self, alert: Alert) -> None:
        self.history.append(alert)
        for sub in list(self._subscribers):
            sub.offer(alert)

    def fire(self, alert: Alert) -> bool:
        """Fire a condition; True when it was not already firing (then subscribers hear it)."""
        alert = dataclasses.replace(alert, state=AlertState.FIRING, time_ns=alert.time_ns or time.time_ns())
        previous = self.active.get(alert.id)
        self.active[alert.id] = alert
        if previous is not None:
            return False
        self._publish(alert)
        return True

    def resolve(self, alert_id: str, value: float | None = None, summary: str = "") -> bool:
        """Resolve a firing condition; True when it was firing."""
        firing = self.active.pop(alert_id, None)
        if firing is None:
            return False
        resolved = dataclasses.replace(
            firing, state=AlertState.RESOLVED, time_ns=time.time_ns(),
            value=firing.value if value is None else value,
            summary=summary or f"resolved: {firing.summary}",
        )
        self._publish(resolved)
        return True

    def set_condition(self, alert: Alert, firing: bool) -> None:
        if firing:
            self.fire(alert)
        else:
            self.resolve(alert.id, alert.value, alert.summary)

    def list(self, model: str = "", active_only: bool = False, limit: int = 100) -> list[Alert]:
        firing = sorted((a for a in self.active.values() if not model or a.model == model),
                        key=lambda a: a.time_ns, reverse=True)
        if active_only:
            return firing
        resolved = [a for a in reversed(self.history)
                    if a.state is AlertState.RESOLVED and (not model or a.model == model)][:limit]
        return firing + resolved

    def close(self) -> None:
        for sub in list(self._subscribers):
            sub.close()
