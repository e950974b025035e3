"""The monitor's control plane in the registry: SLO, baseline and route Records, and the audit log.

SLOs, baselines and routes are the record kinds of `aiaas.records` (SLO by model, BASELINE by
"<model>/<version>", the gateway's ROUTE by model). The monitor reads them by following the
registry's change feed (`ControlFeed`, on `services.common.feed_follower.FeedFollower`: a
snapshot swapped in whole, then each change as it commits) and writes them through
`services.common.registry_client.RegistryClient`. Routes are rewritten with compare-and-set on
their revision, so a rollback never overwrites a change it did not see.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from aiaas.errors import AiaasError
from aiaas.gateway.v1 import gateway_pb2
from aiaas.identity import ClientIdentity
from aiaas.records import BASELINE, ROUTE, SLO, baseline_key, baseline_name
from aiaas.registry.v1 import registry_pb2 as rpb
from services.common.errors import Aborted, NotFound
from services.common.feed_follower import FeedFollower
from services.common.outages import describe_error
from services.common.registry_client import RegistryClient
from services.monitor import convert
from services.monitor import entities as e
from services.monitor.control import ControlListener, ControlState

log = logging.getLogger("aiaas.monitor")

_E = rpb.ChangeEventType


def route_from_record(record: rpb.Record) -> e.RouteView:
    route: gateway_pb2.Route = ROUTE.decode(record.data, record.name)
    return e.RouteView(model=route.model or record.name, revision=record.revision,
                       splits=tuple(e.RouteSplit(alias=s.alias, version=s.version, weight=s.weight)
                                    for s in route.splits))


def slo_from_record(record: rpb.Record) -> e.SLO:
    slo = convert.slo_from_proto(SLO.decode(record.data, record.name))
    return slo if slo.model == record.name else dataclasses.replace(slo, model=record.name)


def baseline_from_record(record: rpb.Record) -> e.Baseline:
    return convert.baseline_from_proto(BASELINE.decode(record.data, record.name))


class ControlFeed(FeedFollower):
    """SLO, baseline and route records from the registry's feed, told to a `ControlListener`."""

    def __init__(self, channel: grpc.aio.Channel, listener: ControlListener, *, address: str = "") -> None:
        super().__init__(channel, name="monitor", on_snapshot=self._swap_in, on_event=self._apply,
                         address=address)
        self.listener = listener

    def _swap_in(self, revision: int, events: Sequence[rpb.ChangeEvent]) -> None:
        state = ControlState()
        for event in events:
            if event.type == _E.CHANGE_EVENT_TYPE_RECORD_PUT:
                self._read(event.record, lambda r: _stage(state, r))
        self.listener.control_replaced(state)
        log.info("registry snapshot at revision %d: %d SLOs, %d baselines, %d routes", revision,
                 len(state.slos), len(state.baselines), len(state.routes))

    def _apply(self, event: rpb.ChangeEvent) -> None:
        if event.type == _E.CHANGE_EVENT_TYPE_RECORD_PUT:
            self._read(event.record, self._put)
        elif event.type == _E.CHANGE_EVENT_TYPE_RECORD_DELETED:
            self._read(event.record, self._delete)

    def _put(self, record: rpb.Record) -> None:
        if record.kind == SLO.kind:
            self.listener.slo_changed(record.name, slo_from_record(record))
        elif record.kind == BASELINE.kind:
            baseline = baseline_from_record(record)
            self.listener.baseline_changed((baseline.model, baseline.version), baseline, record.revision)
        elif record.kind == ROUTE.kind:
            self.listener.route_changed(record.name, route_from_record(record), record.revision)

    def _delete(self, record: rpb.Record) -> None:
        if record.kind == SLO.kind:
            self.listener.slo_changed(record.name, None)
        elif record.kind == BASELINE.kind:
            self.listener.baseline_changed(baseline_key(record.name), None, record.revision)
        elif record.kind == ROUTE.kind:
            self.listener.route_changed(record.name, None, record.revision)

    @staticmethod
    def _read(record: rpb.Record, use: Callable[[rpb.Record], None]) -> None:
        """One unreadable record is skipped, not a reason to drop the feed (and read it again, forever)."""
        try:
            use(record)
        except AiaasError as exc:
            log.warning("ignoring unreadable %s record %r: %s", record.kind, record.name, describe_error(exc))
        except Exception:
            log.exception("ignoring %s record %r", record.kind, record.name)


def _stage(state: ControlState, record: rpb.Record) -> None:
    if record.kind == SLO.kind:
        state.slos[record.name] = slo_from_record(record)
    elif record.kind == BASELINE.kind:
        baseline = baseline_from_record(record)
        state.baselines[(baseline.model, baseline.version)] = (baseline, record.revision)
    elif record.kind == ROUTE.kind:
        state.routes[record.name] = route_from_record(record)


class RegistryControlPlane:
    def __init__(self, target: str, *, timeout_s: float = 5.0, credentials: grpc.ChannelCredentials | None = None,
                 identity: ClientIdentity | None = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        if identity is not None:
            self._channel = identity.aio_channel(target)
        else:
            self._channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
                             else grpc.aio.insecure_channel(target))
        self.registry = RegistryClient(self._channel, timeout_s=timeout_s, context="registry", address=target)
        self.feed: ControlFeed | None = None

    def follow(self, listener: ControlListener) -> None:
        self.feed = ControlFeed(self._channel, listener, address=self.target)
        self.feed.start()

    async def wait_synced(self, timeout: float) -> bool:
        if self.feed is None:
            return False
        try:
            await self.feed.wait_synced(timeout)
        except TimeoutError:
            return False
        return True

    async def put_slo(self, slo: e.SLO, actor: str) -> e.SLO:
        await self.registry.put_record(SLO.record(slo.model, convert.slo_to_proto(slo)), expected_revision=-1,
                                       actor=actor)
        return slo

    async def delete_slo(self, model: str, actor: str) -> None:
        await self.registry.delete_record(SLO.kind, model, actor=actor)

    async def get_baseline(self, model: str, version: int) -> tuple[e.Baseline, int] | None:
        try:
            record = await self.registry.get_record(BASELINE.kind, baseline_name(model, version))
        except NotFound:
            return None
        return baseline_from_record(record), record.revision

    async def put_baseline(self, baseline: e.Baseline, expected_revision: int, actor: str) -> int:
        record = BASELINE.record(baseline_name(baseline.model, baseline.version), convert.baseline_to_proto(baseline))
        stored = await self.registry.put_record(record, expected_revision=expected_revision, actor=actor)
        return int(stored.revision)

    async def get_route(self, model: str) -> e.RouteView | None:
        try:
            return route_from_record(await self.registry.get_record(ROUTE.kind, model))
        except NotFound:
            return None

    async def set_split_weight(self, model: str, alias: str, weight: int, expected_revision: int,
                               actor: str) -> e.RouteView:
        current = await self.registry.get_record(ROUTE.kind, model)
        if current.revision != expected_revision:
            raise Aborted(f"route {model!r} changed (revision {current.revision}, expected {expected_revision})")
        route = ROUTE.decode(current.data, model)
        for split in route.splits:
            if split.alias == alias:
                split.weight = weight
        stored = await self.registry.put_record(ROUTE.record(model, route), expected_revision=expected_revision,
                                                actor=actor)
        return route_from_record(stored)

    async def append_audit(self, action: str, model: str, version: int, details: dict[str, Any],
                           actor: str) -> None:
        await self.registry.append_audit(actor=actor, action=action, model=model, version=version, details=details)

    async def close(self) -> None:
        if self.feed is not None:
            await self.feed.close()
        await self.registry.close()
        await self._channel.close()
