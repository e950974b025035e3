"""Pure conversions between registry protobuf messages and domain types."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from aiaas import serving
from aiaas.registry.v1 import registry_pb2 as pb
from services.registry.entities import (
    AliasMove,
    ArtifactFormat,
    AuditEvent,
    ChangeEvent,
    ChangeType,
    FileStart,
    Lineage,
    ManifestFile,
    Model,
    ModelVersion,
    Record,
    Signature,
    TensorSpec,
    VersionSpec,
)

CHANGE_TO_PB = {kind: pb.ChangeEventType.Value("CHANGE_EVENT_TYPE_" + kind.name) for kind in ChangeType}


def timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts


def from_timestamp(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(data)
    return out


def from_struct(value: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


def signature(sig: Signature) -> pb.Signature:
    return pb.Signature(
        inputs=[pb.TensorSpec(name=s.name, datatype=s.datatype, shape=s.shape) for s in sig.inputs],
        outputs=[pb.TensorSpec(name=s.name, datatype=s.datatype, shape=s.shape) for s in sig.outputs],
    )


def from_signature(sig: pb.Signature) -> Signature:
    return Signature(
        inputs=tuple(TensorSpec(s.name, s.datatype, tuple(s.shape)) for s in sig.inputs),
        outputs=tuple(TensorSpec(s.name, s.datatype, tuple(s.shape)) for s in sig.outputs),
    )


def model(m: Model) -> pb.Model:
    return pb.Model(
        name=m.name, description=m.description, labels=m.labels, aliases=m.aliases, latest_version=m.latest_version,
        create_time=timestamp(m.create_time), update_time=timestamp(m.update_time), created_by=m.created_by,
    )


def version(v: ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(
        model=v.model, version=v.version, format=v.format.pb, artifact_sha256=v.artifact_sha256,
        artifact_size=v.artifact_size, signature=signature(v.signature), serving_config=serving.to_pb(v.serving_config),
        metadata=struct(v.metadata),
        lineage=pb.Lineage(parent_version=v.lineage.parent_version, transformation=v.lineage.transformation,
                           parent_model=v.lineage.parent_model),
        created_by=v.created_by, create_time=timestamp(v.create_time), aliases=v.aliases,
        reports={name: struct(report) for name, report in v.reports.items()},
        files=[pb.ArtifactFile(path=f.path, sha256=f.sha256, size=f.size) for f in v.files],
    )


def file_part(part: FileStart | bytes) -> pb.DownloadFilesResponse:
    if isinstance(part, FileStart):
        return pb.DownloadFilesResponse(file=pb.FileStart(path=part.path, offset=part.offset))
    return pb.DownloadFilesResponse(chunk=part)


def version_spec(header: pb.UploadVersionHeader) -> VersionSpec:
    return VersionSpec(
        model=header.model, format=ArtifactFormat.from_pb(header.format), artifact_sha256=header.artifact_sha256,
        artifact_size=header.artifact_size, signature=from_signature(header.signature),
        serving_config=serving.from_pb(header.serving_config), metadata=from_struct(header.metadata),
        lineage=Lineage(header.lineage.parent_version, header.lineage.transformation, header.lineage.parent_model),
        actor=header.actor, create_model=header.create_model,
        reports={name: from_struct(report) for name, report in header.reports.items()},
        files=tuple(ManifestFile(f.path, f.sha256, f.size) for f in header.files),
    )


def alias_move(move: AliasMove) -> pb.AliasMove:
    return pb.AliasMove(model=move.model, alias=move.alias, from_version=move.from_version,
                        to_version=move.to_version, actor=move.actor, reason=move.reason, time=timestamp(move.time))


def record(rec: Record) -> pb.Record:
    return pb.Record(kind=rec.kind, name=rec.name, data=rec.data, revision=rec.revision,
                     update_time=timestamp(rec.update_time))


def audit_event(event: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(id=event.id, time=timestamp(event.time), actor=event.actor, action=event.action,
                         model=event.model, version=event.version, details=struct(event.details))


def change_event(event: ChangeEvent) -> pb.ChangeEvent:
    out = pb.ChangeEvent(
        revision=event.revision, type=CHANGE_TO_PB[event.type], model=event.model, version=event.version,
        alias=event.alias, from_version=event.from_version, time=timestamp(event.time), snapshot=event.snapshot,
    )
    if event.record is not None:
        out.record.CopyFrom(record(event.record))
    return out
