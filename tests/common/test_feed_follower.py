"""The shared registry feed follower (services/common/feed_follower.py) and its two users.

A small gRPC server plays a scripted `WatchModels` (the protocol of services/registry/feed.py:
a snapshot at the head with every event carrying the head revision, SNAPSHOT_DONE, then live
events; FAILED_PRECONDITION when a resume point is no longer kept) and cuts the first stream
after k events, for every k through the snapshot and the live tail. Whatever k, the follower must
end up with the registry's state, and a snapshot is only ever applied whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
import pytest

from aiaas.registry.v1 import registry_pb2 as rpb
from aiaas.registry.v1 import registry_pb2_grpc as rpb_grpc
from services.gateway.feed import RegistryFeed
from services.gateway.keys import KeyRing
from services.gateway.router import Catalog
from services.inference.follower import AliasFollower

E = rpb.ChangeEventType
FOLLOWED = ("production",)


def _moved(model: str, alias: str, version: int) -> rpb.ChangeEvent:
    return rpb.ChangeEvent(type=E.CHANGE_EVENT_TYPE_ALIAS_MOVED, model=model, alias=alias, version=version)


# Revisions 1..len: the registry's history. The snapshot is taken after SNAPSHOT_AT of them; the
# rest is the live tail. Some aliases only appear in the snapshot (a resume that skips the
# snapshot never learns them), the tail moves, deletes and drops a model.
HISTORY = [
    rpb.ChangeEvent(type=E.CHANGE_EVENT_TYPE_MODEL_CREATED, model="a"),
    rpb.ChangeEvent(type=E.CHANGE_EVENT_TYPE_MODEL_CREATED, model="b"),
    rpb.ChangeEvent(type=E.CHANGE_EVENT_TYPE_MODEL_CREATED, model="c"),
    _moved("a", "production", 1),
    _moved("b", "production", 2),
    _moved("c", "production", 3),
    _moved("a", "staging", 4),
    rpb.ChangeEvent(type=E.CHANGE_EVENT_TYPE_MODEL_CREATED, model="e"),
    _moved("e", "production", 7),  # untouched by the tail: only the snapshot tells it
    # ---- snapshot here
    _moved("b", "production", 5),
    rpb.ChangeEvent(type=E.CHANGE_EVENT_TYPE_ALIAS_DELETED, model="c", alias="production"),
    rpb.ChangeEvent(type=E.CHANGE_EVENT_TYPE_MODEL_CREATED, model="d"),
    _moved("d", "production", 6),
    rpb.ChangeEvent(type=E.CHANGE_EVENT_TYPE_MODEL_DELETED, model="a"),
]
SNAPSHOT_AT = 9


def _numbered(events: list[rpb.ChangeEvent]) -> list[rpb.ChangeEvent]:
    out = []
    for revision, event in enumerate(events, start=1):
        copy = rpb.ChangeEvent()
        copy.CopyFrom(event)
        copy.revision = revision
        copy.time.GetCurrentTime()
        out.append(copy)
    return out


def aliases_after(events: list[rpb.ChangeEvent]) -> dict[tuple[str, str], int]:
    """The registry's alias targets once `events` are applied (the reference the followers must reach)."""
    targets: dict[tuple[str, str], int] = {}
    for e in events:
        if e.type == E.CHANGE_EVENT_TYPE_ALIAS_MOVED:
            targets[(e.model, e.alias)] = e.version
        elif e.type == E.CHANGE_EVENT_TYPE_ALIAS_DELETED:
            targets.pop((e.model, e.alias), None)
        elif e.type == E.CHANGE_EVENT_TYPE_MODEL_DELETED:
            targets = {k: v for k, v in targets.items() if k[0] != e.model}
    return targets


def snapshot_of(events: list[rpb.ChangeEvent]) -> list[rpb.ChangeEvent]:
    """State as snapshot events (models, then alias targets), each carrying the head revision."""
    head = len(events)
    models: list[str] = []
    for e in events:
        if e.type == E.CHANGE_EVENT_TYPE_MODEL_CREATED:
            models.append(e.model)
        elif e.type == E.CHANGE_EVENT_TYPE_MODEL_DELETED:
            models.remove(e.model)
    out = [rpb.ChangeEvent(revision=head, type=E.CHANGE_EVENT_TYPE_MODEL_CREATED, model=m, snapshot=True)
           for m in models]
    out += [rpb.ChangeEvent(revision=head, type=E.CHANGE_EVENT_TYPE_ALIAS_MOVED, model=m, alias=a, version=v,
                            snapshot=True) for (m, a), v in sorted(aliases_after(events).items())]
    return out


@dataclass
class ScriptedRegistry(rpb_grpc.ModelRegistryServicer):
    """WatchModels over a history: `cuts[i]` ends the i-th stream with UNAVAILABLE after that many
    events (None: never); resumes from before `oldest_kept` answer FAILED_PRECONDITION."""

    history: list[rpb.ChangeEvent]
    snapshot_at: int
    cuts: list[int | None] = field(default_factory=list)
    oldest_kept: int = 1
    calls: list[int] = field(default_factory=list)

    def _stream(self, after: int) -> Iterator[rpb.ChangeEvent]:
        if after == 0:
            yield from snapshot_of(self.history[:self.snapshot_at])
            yield rpb.ChangeEvent(revision=self.snapshot_at, type=E.CHANGE_EVENT_TYPE_SNAPSHOT_DONE)
            after = self.snapshot_at
        yield from self.history[after:]
        yield rpb.ChangeEvent(revision=len(self.history), type=E.CHANGE_EVENT_TYPE_HEARTBEAT)

    async def WatchModels(self, request: rpb.WatchModelsRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[rpb.WatchModelsResponse]:
        index = len(self.calls)
        self.calls.append(request.after_revision)
        if 0 < request.after_revision < self.oldest_kept - 1:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "resync required: events no longer kept")
        cut = self.cuts[index] if index < len(self.cuts) else None
        for sent, event in enumerate(self._stream(request.after_revision)):
            if cut is not None and sent >= cut:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"scripted break after {cut} events")
            yield rpb.WatchModelsResponse(event=event)
        if cut is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"scripted break after {cut} events")
        await asyncio.sleep(3600)  # a live stream stays open


@contextlib.asynccontextmanager
async def serving(registry: ScriptedRegistry) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    rpb_grpc.add_ModelRegistryServicer_to_server(registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(0)


class RecordedTargets:
    """The inference repository's alias-target interface, kept as a plain mapping (and every
    snapshot handed over, to check that none was partial)."""

    def __init__(self, initial: Mapping[tuple[str, str], int] | None = None) -> None:
        self.targets: dict[tuple[str, str], int] = dict(initial or {})
        self.replacements: list[dict[tuple[str, str], int]] = []

    def set_alias_target(self, model: str, alias: str, version: int) -> None:
        self.targets[(model, alias)] = version

    def remove_alias_target(self, model: str, alias: str) -> None:
        self.targets.pop((model, alias), None)

    def replace_alias_targets(self, targets: Mapping[tuple[str, str], int]) -> None:
        self.replacements.append(dict(targets))
        self.targets = dict(targets)


def followed(targets: Mapping[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    return {k: v for k, v in targets.items() if k[1] in FOLLOWED}


def catalog_aliases(catalog: Catalog) -> dict[tuple[str, str], int]:
    return {(m, a): v for m, state in catalog.models.items() for a, v in state.aliases.items()}


async def converge(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if check():
            return True
        await asyncio.sleep(0.005)
    return check()


HISTORY_N = _numbered(HISTORY)
STREAM_LEN = len(snapshot_of(HISTORY_N[:SNAPSHOT_AT])) + 1 + len(HISTORY_N) - SNAPSHOT_AT + 1
FINAL = aliases_after(HISTORY_N)
SNAPSHOT_STATE = aliases_after(HISTORY_N[:SNAPSHOT_AT])


@pytest.mark.parametrize("cut", range(STREAM_LEN))
async def test_inference_follower_converges_whatever_event_the_stream_breaks_after(cut: int) -> None:
    registry = ScriptedRegistry(HISTORY_N, SNAPSHOT_AT, cuts=[cut])
    repo = RecordedTargets()
    async with serving(registry) as channel:
        follower = AliasFollower(channel, repo, aliases=FOLLOWED, backoff_min_s=0.005, backoff_max_s=0.02)
        follower.start()
        try:
            converged = await converge(lambda: repo.targets == followed(FINAL)
                                       and follower.revision == len(HISTORY_N))
        finally:
            await follower.close()
    assert converged, (f"after a break at event {cut}: {repo.targets} at revision {follower.revision}, "
                       f"registry has {followed(FINAL)} at {len(HISTORY_N)}; streams asked from {registry.calls}")
    assert all(r == followed(SNAPSHOT_STATE) for r in repo.replacements), "a partial snapshot was applied"
    assert follower.synced.is_set()


@pytest.mark.parametrize("cut", range(STREAM_LEN))
async def test_gateway_feed_converges_whatever_event_the_stream_breaks_after(cut: int) -> None:
    registry = ScriptedRegistry(HISTORY_N, SNAPSHOT_AT, cuts=[cut])
    catalog = Catalog()
    async with serving(registry) as channel:
        feed = RegistryFeed(channel, catalog, KeyRing(b"pepper", enabled=False))
        feed.backoff_min_s, feed.backoff_max_s = 0.005, 0.02
        feed.start()
        try:
            converged = await converge(lambda: catalog_aliases(catalog) == FINAL
                                       and feed.revision == len(HISTORY_N))
        finally:
            await feed.close()
    assert converged, f"after a break at event {cut}: {catalog_aliases(catalog)}, registry has {FINAL}"
    assert set(catalog.models) == {"b", "c", "d", "e"}
    assert feed.lag_revisions() == 0 and feed.head_seen == len(HISTORY_N)


async def test_a_break_mid_snapshot_keeps_the_previous_state_until_a_whole_snapshot_arrives() -> None:
    # The follower already holds an older state; the registry says resync, then breaks the snapshot.
    stale = {("a", "production"): 9, ("z", "production"): 1}
    registry = ScriptedRegistry(HISTORY_N, SNAPSHOT_AT, cuts=[None, 3, 1], oldest_kept=len(HISTORY_N))
    repo = RecordedTargets(stale)
    async with serving(registry) as channel:
        follower = AliasFollower(channel, repo, aliases=FOLLOWED, backoff_min_s=0.005, backoff_max_s=0.02)
        follower.revision = 2  # resuming from a point the registry no longer keeps
        follower.start()
        try:
            converged = await converge(lambda: repo.targets == followed(FINAL))
        finally:
            await follower.close()
    assert converged, f"{repo.targets} != {followed(FINAL)}; streams asked from {registry.calls}"
    assert registry.calls[:4] == [2, 0, 0, 0]  # resync, then whole snapshots until one gets through
    assert follower.resyncs == 1
    assert repo.replacements == [followed(SNAPSHOT_STATE)]


async def test_resync_on_failed_precondition_replaces_state_with_a_fresh_snapshot() -> None:
    registry = ScriptedRegistry(HISTORY_N, SNAPSHOT_AT, oldest_kept=len(HISTORY_N))
    catalog = Catalog()
    catalog.move_alias("gone", "production", 4)  # cached before the gap; the registry no longer has it
    async with serving(registry) as channel:
        feed = RegistryFeed(channel, catalog, KeyRing(b"pepper", enabled=False))
        feed.revision = 3
        feed.start()
        try:
            converged = await converge(lambda: catalog_aliases(catalog) == FINAL)
        finally:
            await feed.close()
    assert converged, catalog_aliases(catalog)
    assert registry.calls[:2] == [3, 0]
    assert feed.resyncs == 1 and feed.revision == len(HISTORY_N)


async def test_an_unreachable_registry_is_one_warning_line_not_one_per_attempt(
        caplog: pytest.LogCaptureFixture) -> None:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    repo = RecordedTargets()
    follower = AliasFollower(channel, repo, aliases=FOLLOWED, backoff_min_s=0.005, backoff_max_s=0.02,
                             address=f"127.0.0.1:{port}")
    with caplog.at_level(logging.INFO, logger="aiaas.feed"):
        follower.start()
        await converge(lambda: follower.reconnects >= 10)
        await follower.close()
    await channel.close()
    assert follower.reconnects >= 10
    lines = [r for r in caplog.records if r.name == "aiaas.feed"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and lines[0].exc_info is None
    assert "\n" not in lines[0].getMessage()
    assert lines[0].getMessage().startswith(f"inference feed: registry at 127.0.0.1:{port} unreachable: UNAVAILABLE: ")
    assert not follower.synced.is_set() and follower.lag_seconds() > 0
