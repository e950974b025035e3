"""The monitor's control plane in the registry: SLO, baseline and route Records, and the audit log.

SLOs, baselines and routes are the record kinds of `aiaas.records` (SLO by model, BASELINE by
"<model>/<version>", the gateway's ROUTE by model). Routes are rewritten with compare-and-set on
their revision, so a rollback never overwrites a change it did not see.
"""

from __future__ import annotations

from typing import Any

import grpc

from aiaas.gateway.v1 import gateway_pb2
from aiaas.identity import ClientIdentity
from aiaas.records import BASELINE, ROUTE, SLO, baseline_name
from aiaas.registry.v1 import registry_pb2 as rpb
from services.common.errors import Aborted, NotFound
from services.common.registry_client import RegistryClient
from services.monitor import convert
from services.monitor import entities as e


def route_from_record(record: rpb.Record) -> e.RouteView:
    route: gateway_pb2.Route = ROUTE.decode(record.data, record.name)
    return e.RouteView(model=route.model or record.name, revision=record.revision,
                       splits=tuple(e.RouteSplit(alias=s.alias, version=s.version, weight=s.weight)
                                    for s in route.splits))


class RegistryControlPlane:
    def __init__(self, target: str, *, timeout_s: float = 5.0, credentials: grpc.ChannelCredentials | None = None,
                 identity: ClientIdentity | None = None) -> None:
        self.timeout_s = timeout_s
        self.registry = RegistryClient.connect(target, credentials=credentials, identity=identity,
                                               timeout_s=timeout_s, context="registry")

    async def list_slos(self) -> list[e.SLO]:
        return [convert.slo_from_proto(SLO.decode(r.data, r.name)) async for r in self.registry.records(SLO.kind)]

    async def put_slo(self, slo: e.SLO, actor: str) -> e.SLO:
        await self.registry.put_record(SLO.record(slo.model, convert.slo_to_proto(slo)), expected_revision=-1,
                                       actor=actor)
        return slo

    async def delete_slo(self, model: str, actor: str) -> None:
        await self.registry.delete_record(SLO.kind, model, actor=actor)

    async def list_baselines(self) -> list[tuple[e.Baseline, int]]:
        return [(convert.baseline_from_proto(BASELINE.decode(r.data, r.name)), r.revision)
                async for r in self.registry.records(BASELINE.kind)]

    async def get_baseline(self, model: str, version: int) -> tuple[e.Baseline, int] | None:
        try:
            record = await self.registry.get_record(BASELINE.kind, baseline_name(model, version))
        except NotFound:
            return None
        return convert.baseline_from_proto(BASELINE.decode(record.data, record.name)), record.revision

    async def put_baseline(self, baseline: e.Baseline, expected_revision: int, actor: str) -> int:
        record = BASELINE.record(baseline_name(baseline.model, baseline.version), convert.baseline_to_proto(baseline))
        stored = await self.registry.put_record(record, expected_revision=expected_revision, actor=actor)
        return int(stored.revision)

    async def list_routes(self) -> list[e.RouteView]:
        return [route_from_record(r) async for r in self.registry.records(ROUTE.kind)]

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
        await self.registry.close()
