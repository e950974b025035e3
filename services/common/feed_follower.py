"""The one follower of the registry's change feed (`WatchModels`), shared by the services that cache registry state.

The protocol (protos/aiaas/registry/v1/registry.proto, server side in services/registry/feed.py):
`after_revision` 0 sends a snapshot (events with `snapshot` set, each carrying the snapshot's
revision) closed by SNAPSHOT_DONE, then live events; any other `after_revision` sends the events
after it. FAILED_PRECONDITION means "resync required": start again from 0.

What this follower guarantees to its user (two callbacks: `on_snapshot`, `on_event`):

- Snapshot events are staged and handed over all at once at SNAPSHOT_DONE, so the user swaps its
  state atomically; a stream that breaks mid-snapshot leaves the previous state in place and the
  next connection asks for a whole snapshot again.
- `revision` advances only with events the user has applied (a snapshot at SNAPSHOT_DONE, a live
  event after `on_event` returned, a heartbeat once everything before it is applied), so a resume
  never skips an event.
- FAILED_PRECONDITION restarts from a fresh snapshot (the cached state is served meanwhile).
- Reconnects back off exponentially with jitter, bounded by `backoff_max_s`; the backoff resets
  once a connection has delivered something.
- While the registry is unreachable it logs one line when the feed is lost, then at most one line
  per `warn_every_s`, and one when it is back (`services.common.outages.OutageLog`: no tracebacks
  for an outage, only for a bug such as a callback that raised).
- Metrics (OpenTelemetry meter `aiaas.feed`, attribute `follower`): `aiaas.feed.lag_revisions`
  (head seen minus revision applied), `aiaas.feed.lag_seconds` (while connected and synced: the
  delay of the last applied change; otherwise the time since the follower was last current),
  `aiaas.feed.resyncs`, `aiaas.feed.reconnects`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence

import grpc
from opentelemetry import metrics

from aiaas.registry.v1 import registry_pb2 as rpb
from aiaas.registry.v1 import registry_pb2_grpc as rpb_grpc
from services.common.outages import WARN_EVERY_S, OutageLog

log = logging.getLogger("aiaas.feed")

E = rpb.ChangeEventType

SnapshotCallback = Callable[[int, Sequence[rpb.ChangeEvent]], None]
EventCallback = Callable[[rpb.ChangeEvent], None]


class _Metrics:
    """Process-wide instruments; each follower observes under its own `follower` attribute."""

    _instance: _Metrics | None = None

    def __init__(self) -> None:
        self.followers: set[FeedFollower] = set()
        meter = metrics.get_meter("aiaas.feed")
        self.resyncs = meter.create_counter(
            "aiaas.feed.resyncs", unit="1", description="Fresh snapshots asked for after FAILED_PRECONDITION")
        self.reconnects = meter.create_counter(
            "aiaas.feed.reconnects", unit="1", description="Feed streams that ended and were reopened")
        meter.create_observable_gauge(
            "aiaas.feed.lag_revisions", [self._lag_revisions], unit="1",
            description="Registry head revision seen minus the revision applied")
        meter.create_observable_gauge(
            "aiaas.feed.lag_seconds", [self._lag_seconds], unit="s",
            description="How far behind the registry the follower's state may be")

    @classmethod
    def get(cls) -> _Metrics:
        if cls._instance is None:
            cls._instance = _Metrics()
        return cls._instance

    def _lag_revisions(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [metrics.Observation(f.lag_revisions(), {"follower": f.name}) for f in list(self.followers)]

    def _lag_seconds(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [metrics.Observation(f.lag_seconds(), {"follower": f.name}) for f in list(self.followers)]


class FeedFollower:
    def __init__(self, channel: grpc.aio.Channel, *, name: str, on_snapshot: SnapshotCallback,
                 on_event: EventCallback, models: Sequence[str] = (), backoff_min_s: float = 0.1,
                 backoff_max_s: float = 5.0, warn_every_s: float = WARN_EVERY_S, address: str = "") -> None:
        self._stub = rpb_grpc.ModelRegistryStub(channel)
        self.name = name
        self._on_snapshot = on_snapshot
        self._on_event = on_event
        self._models = tuple(models)
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = max(backoff_min_s, backoff_max_s)
        self.revision = 0  # the last revision applied
        self.head_seen = 0  # the highest revision the registry has shown us
        self.resyncs = 0
        self.reconnects = 0
        self.synced = asyncio.Event()  # set after the first snapshot; stays set (the cache is served)
        self.connected = False
        self._last_current = time.monotonic()  # when the state was last known current
        self._apply_delay_s = 0.0  # delay of the last applied live change (commit to apply)
        self.outage = OutageLog(log, "registry", address, user=f"{name} feed", every_s=warn_every_s)
        self._task: asyncio.Task[None] | None = None
        self._metrics = _Metrics.get()

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._metrics.followers.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-feed")

    async def wait_synced(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.synced.wait(), timeout)

    async def close(self) -> None:
        self._metrics.followers.discard(self)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ---- metrics --------------------------------------------------------------------------------

    def lag_revisions(self) -> int:
        return max(0, self.head_seen - self.revision)

    def lag_seconds(self) -> float:
        if self.connected and self.synced.is_set():
            return self._apply_delay_s
        return time.monotonic() - self._last_current

    # ---- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self.backoff_min_s
        while True:
            progressed = False
            try:
                progressed = await self._follow()
                self._failed("the registry ended the feed", None)
            except grpc.aio.AioRpcError as exc:
                progressed = progressed or self.connected
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and self.revision != 0:
                    self.resyncs += 1
                    self._metrics.resyncs.add(1, {"follower": self.name})
                    log.warning("%s: registry feed asks for a resync (%s); taking a fresh snapshot",
                                self.name, exc.details())
                    self.revision = 0
                    continue
                self._failed(exc, None)
            except Exception as exc:  # noqa: BLE001 - the follower survives anything (a callback bug too)
                self._failed(exc, exc)
            finally:
                self.connected = False
            self.reconnects += 1
            self._metrics.reconnects.add(1, {"follower": self.name})
            if progressed:
                backoff = self.backoff_min_s
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(self.backoff_max_s, backoff * 2)

    def _failed(self, error: BaseException | str, exc: BaseException | None) -> None:
        """One line when the feed is lost, then at most one per warn_every_s while it stays down."""
        if self.synced.is_set():
            consequence = f"feed lost at revision {self.revision}; serving from cache, reconnecting"
        else:
            consequence = "no snapshot yet; reconnecting"
        self.outage.failed(error, consequence=consequence, exc_info=exc)

    def _recovered(self) -> None:
        self.outage.recovered(f"resuming after revision {self.revision}")

    async def _follow(self) -> bool:
        """One stream; returns whether it delivered anything (raises on a broken stream)."""
        staged: list[rpb.ChangeEvent] | None = [] if self.revision == 0 else None
        call = self._stub.WatchModels(rpb.WatchModelsRequest(after_revision=self.revision, models=self._models))
        delivered = False
        try:
            async for response in call:
                event = response.event
                if not delivered:
                    delivered = True
                    self.connected = True
                    self._recovered()
                self.head_seen = max(self.head_seen, event.revision)
                if staged is not None:
                    if event.type == E.CHANGE_EVENT_TYPE_SNAPSHOT_DONE:
                        self._install(event.revision, staged)
                        staged = None
                        continue
                    if event.type == E.CHANGE_EVENT_TYPE_HEARTBEAT:
                        continue
                    if event.snapshot:
                        staged.append(event)  # applied at SNAPSHOT_DONE; the revision does not move
                        continue
                    # A live event before SNAPSHOT_DONE (an older registry): the snapshot is what came.
                    self._install(max((e.revision for e in staged), default=0), staged)
                    staged = None
                self._apply_live(event)
        finally:
            call.cancel()
        return delivered

    def _install(self, revision: int, events: Sequence[rpb.ChangeEvent]) -> None:
        self._on_snapshot(revision, events)
        self.revision = revision
        self._apply_delay_s = 0.0
        self._current()

    def _apply_live(self, event: rpb.ChangeEvent) -> None:
        if event.revision and event.revision <= self.revision:
            return  # already applied (a replayed event)
        if event.type not in (E.CHANGE_EVENT_TYPE_HEARTBEAT, E.CHANGE_EVENT_TYPE_SNAPSHOT_DONE):
            self._on_event(event)
            if event.HasField("time"):
                committed = event.time.seconds + event.time.nanos / 1e9
                self._apply_delay_s = max(0.0, time.time() - committed)
        self.revision = max(self.revision, event.revision)
        self._current()

    def _current(self) -> None:
        self._last_current = time.monotonic()
        self.synced.set()
