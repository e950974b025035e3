"""The registry as the gateway's record store: control-plane records and audit events over gRPC."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
from google.protobuf import struct_pb2

from aiaas.registry.v1 import registry_pb2 as rpb
from aiaas.registry.v1 import registry_pb2_grpc as rpb_grpc
from services.gateway.upstream import upstream_error


@dataclasses.dataclass(frozen=True)
class StoredRecord:
    kind: str
    name: str
    data: bytes
    revision: int


class RegistryRecords:
    """PutRecord / GetRecord / ListRecords / DeleteRecord / AppendAuditEvent, errors mapped."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 10.0) -> None:
        self.stub = rpb_grpc.ModelRegistryStub(channel)
        self.timeout_s = timeout_s

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc) from None

    async def put(self, kind: str, name: str, data: bytes, *, expected_revision: int, actor: str) -> StoredRecord:
        reply = await self._call(self.stub.PutRecord, rpb.PutRecordRequest(
            record=rpb.Record(kind=kind, name=name, data=data), expected_revision=expected_revision, actor=actor,
        ))
        return _record(reply.record)

    async def get(self, kind: str, name: str) -> StoredRecord:
        reply = await self._call(self.stub.GetRecord, rpb.GetRecordRequest(kind=kind, name=name))
        return _record(reply.record)

    async def list(self, kind: str) -> list[StoredRecord]:
        found: list[StoredRecord] = []
        token = ""
        while True:
            reply = await self._call(
                self.stub.ListRecords, rpb.ListRecordsRequest(kind=kind, page_size=1000, page_token=token)
            )
            found += [_record(r) for r in reply.records]
            token = reply.next_page_token
            if not token:
                return found

    async def delete(self, kind: str, name: str, *, actor: str) -> None:
        await self._call(self.stub.DeleteRecord, rpb.DeleteRecordRequest(kind=kind, name=name, actor=actor))

    async def audit(self, *, actor: str, action: str, model: str = "", details: dict[str, Any] | None = None) -> None:
        info = struct_pb2.Struct()
        info.update(details or {})
        await self._call(self.stub.AppendAuditEvent, rpb.AppendAuditEventRequest(
            actor=actor, action=action, model=model, details=info,
        ))


def _record(record: rpb.Record) -> StoredRecord:
    return StoredRecord(kind=record.kind, name=record.name, data=record.data, revision=record.revision)
