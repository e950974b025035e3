"""The monitor's control plane in the registry: SLO, baseline and route Records, and the audit log.

SLOs are Records of kind "slo" named by model (data: aiaas.monitor.v1.SLO), baselines of kind
"baseline" named "<model>/<version>" (data: aiaas.monitor.v1.Baseline); routes are the
gateway's Records of kind "route" (data: aiaas.gateway.v1.Route), rewritten with
compare-and-set on their revision so a rollback never overwrites a change it did not see.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import struct_pb2

from aiaas.gateway.v1 import gateway_pb2
from aiaas.monitor.v1 import monitor_pb2
from aiaas.registry.v1 import registry_pb2 as rpb
from aiaas.registry.v1 import registry_pb2_grpc
from services.common.errors import (
    Aborted,
    AiaasError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.monitor import convert
from services.monitor.entities import SLO, Baseline, RouteSplit, RouteView

KIND_SLO = "slo"
KIND_BASELINE = "baseline"
KIND_ROUTE = "route"

_ERRORS: dict[grpc.StatusCode, type[AiaasError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def _error(exc: grpc.RpcError) -> AiaasError:
    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.UNKNOWN
    kind = _ERRORS.get(code, Internal)
    return kind(f"registry: {exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc}")


def route_from_record(record: rpb.Record) -> RouteView:
    route = gateway_pb2.Route.FromString(record.data)
    return RouteView(model=route.model or record.name, revision=record.revision,
                     splits=tuple(RouteSplit(alias=s.alias, version=s.version, weight=s.weight) for s in route.splits))


class RegistryControlPlane:
    def __init__(self, target: str, *, timeout_s: float = 5.0, credentials: grpc.ChannelCredentials | None = None
                 ) -> None:
        self.timeout_s = timeout_s
        self._channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
                         else grpc.aio.insecure_channel(target))
        self._stub = registry_pb2_grpc.ModelRegistryStub(self._channel)

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def _records(self, kind: str) -> AsyncIterator[rpb.Record]:
        token = ""
        while True:
            page = await self._call("ListRecords", rpb.ListRecordsRequest(kind=kind, page_size=1000, page_token=token))
            for record in page.records:
                yield record
            token = page.next_page_token
            if not token:
                return

    async def list_slos(self) -> list[SLO]:
        return [convert.slo_from_proto(monitor_pb2.SLO.FromString(r.data)) async for r in self._records(KIND_SLO)]

    async def put_slo(self, slo: SLO, actor: str) -> SLO:
        record = rpb.Record(kind=KIND_SLO, name=slo.model, data=convert.slo_to_proto(slo).SerializeToString())
        await self._call("PutRecord", rpb.PutRecordRequest(record=record, expected_revision=-1, actor=actor))
        return slo

    async def delete_slo(self, model: str, actor: str) -> None:
        await self._call("DeleteRecord", rpb.DeleteRecordRequest(kind=KIND_SLO, name=model, actor=actor))

    async def list_baselines(self) -> list[tuple[Baseline, int]]:
        return [(convert.baseline_from_proto(monitor_pb2.Baseline.FromString(r.data)), r.revision)
                async for r in self._records(KIND_BASELINE)]

    async def get_baseline(self, model: str, version: int) -> tuple[Baseline, int] | None:
        try:
            reply = await self._call("GetRecord", rpb.GetRecordRequest(kind=KIND_BASELINE, name=f"{model}/{version}"))
        except NotFound:
            return None
        return convert.baseline_from_proto(monitor_pb2.Baseline.FromString(reply.record.data)), reply.record.revision

    async def put_baseline(self, baseline: Baseline, expected_revision: int, actor: str) -> int:
        record = rpb.Record(kind=KIND_BASELINE, name=f"{baseline.model}/{baseline.version}",
                            data=convert.baseline_to_proto(baseline).SerializeToString())
        reply = await self._call("PutRecord", rpb.PutRecordRequest(record=record, expected_revision=expected_revision,
                                                                   actor=actor))
        return int(reply.record.revision)

    async def list_routes(self) -> list[RouteView]:
        return [route_from_record(r) async for r in self._records(KIND_ROUTE)]

    async def set_split_weight(self, model: str, alias: str, weight: int, expected_revision: int,
                               actor: str) -> RouteView:
        reply = await self._call("GetRecord", rpb.GetRecordRequest(kind=KIND_ROUTE, name=model))
        if reply.record.revision != expected_revision:
            raise Aborted(f"route {model!r} changed (revision {reply.record.revision}, expected {expected_revision})")
        route = gateway_pb2.Route.FromString(reply.record.data)
        for split in route.splits:
            if split.alias == alias:
                split.weight = weight
        record = rpb.Record(kind=KIND_ROUTE, name=model, data=route.SerializeToString())
        stored = await self._call("PutRecord", rpb.PutRecordRequest(record=record, expected_revision=expected_revision,
                                                                    actor=actor))
        return route_from_record(stored.record)

    async def append_audit(self, action: str, model: str, version: int, details: dict[str, Any],
                           actor: str) -> None:
        struct = struct_pb2.Struct()
        struct.update(details)
        await self._call("AppendAuditEvent", rpb.AppendAuditEventRequest(
            actor=actor, action=action, model=model, version=version, details=struct))

    async def close(self) -> None:
        await self._channel.close()
