"""The registry as the gateway's record store: control-plane records and audit events, through the
services' registry client (services.common.registry_client)."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc

from aiaas.registry.v1 import registry_pb2 as rpb
from services.common.registry_client import RegistryClient


@dataclasses.dataclass(frozen=True)
class StoredRecord:
    kind: str
    name: str
    data: bytes
    revision: int


class RegistryRecords:
    """PutRecord / GetRecord / ListRecords / DeleteRecord / AppendAuditEvent, errors mapped."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 10.0) -> None:
        self.registry = RegistryClient(channel, timeout_s=timeout_s)

    async def put(self, kind: str, name: str, data: bytes, *, expected_revision: int, actor: str) -> StoredRecord:
        return _record(await self.registry.put_record(rpb.Record(kind=kind, name=name, data=data),
                                                      expected_revision=expected_revision, actor=actor))

    async def get(self, kind: str, name: str) -> StoredRecord:
        return _record(await self.registry.get_record(kind, name))

    async def list(self, kind: str) -> list[StoredRecord]:
        return [_record(r) async for r in self.registry.records(kind)]

    async def delete(self, kind: str, name: str, *, actor: str) -> None:
        await self.registry.delete_record(kind, name, actor=actor)

    async def audit(self, *, actor: str, action: str, model: str = "", details: dict[str, Any] | None = None) -> None:
        await self.registry.append_audit(actor=actor, action=action, model=model, details=details)


def _record(record: rpb.Record) -> StoredRecord:
    return StoredRecord(kind=record.kind, name=record.name, data=record.data, revision=record.revision)
