"""SQL rows <-> registry entities (pure, apart from the batched look-ups a page needs)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from services.registry import schema as t
from services.registry.entities import (
    ArtifactFormat,
    AuditEvent,
    ChangeEvent,
    ChangeType,
    Lineage,
    ManifestFile,
    Model,
    ModelVersion,
    Record,
    ServingConfig,
    Signature,
    TensorSpec,
    VersionSpec,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def time(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def micros(when: datetime) -> int:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // timedelta(microseconds=1)


def _signature_json(sig: Signature) -> str:
    def specs(items: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in items]

    return json.dumps({"inputs": specs(sig.inputs), "outputs": specs(sig.outputs)})


def _signature(raw: str) -> Signature:
    data = json.loads(raw)

    def specs(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(s["name"], s["datatype"], tuple(s["shape"])) for s in items)

    return Signature(specs(data["inputs"]), specs(data["outputs"]))


def _serving(raw: str) -> ServingConfig:
    data = json.loads(raw)
    data["preferred_batch_sizes"] = tuple(data.get("preferred_batch_sizes", ()))
    known = {f.name for f in dataclasses.fields(ServingConfig)}
    return ServingConfig(**{k: v for k, v in data.items() if k in known})


def version_values(spec: VersionSpec) -> dict[str, Any]:
    return {
        "format": spec.format.value,
        "sha256": spec.artifact_sha256,
        "size": spec.artifact_size,
        "signature": _signature_json(spec.signature),
        "serving_config": json.dumps(dataclasses.asdict(spec.serving_config)),
        "metadata": json.dumps(spec.metadata, sort_keys=True),
        "reports": json.dumps(spec.reports, sort_keys=True),
        "parent_model": spec.lineage.parent_model,
        "parent_version": spec.lineage.parent_version,
        "transformation": spec.lineage.transformation,
        "created_by": spec.actor,
    }


def models(conn: sa.Connection, found: Sequence[sa.Row[Any]]) -> list[Model]:
    ids = [row.id for row in found]
    aliases: dict[int, dict[str, int]] = {i: {} for i in ids}
    latest: dict[int, int] = {}
    if ids:
        for model_id, alias, version in conn.execute(
                sa.select(t.aliases.c.model_id, t.aliases.c.alias, t.aliases.c.version)
                .where(t.aliases.c.model_id.in_(ids)).order_by(t.aliases.c.alias)):
            aliases[model_id][alias] = int(version)
        for model_id, highest in conn.execute(
                sa.select(t.versions.c.model_id, sa.func.max(t.versions.c.version))
                .where(t.versions.c.model_id.in_(ids)).group_by(t.versions.c.model_id)):
            latest[model_id] = int(highest)
    return [
        Model(name=row.name, description=row.description, labels=json.loads(row.labels), aliases=aliases[row.id],
              latest_version=latest.get(row.id, 0), created_by=row.created_by, create_time=time(row.create_us),
              update_time=time(row.update_us))
        for row in found
    ]


def versions(conn: sa.Connection, model: str, found: Sequence[sa.Row[Any]]) -> list[ModelVersion]:
    pointing: dict[int, list[str]] = {}
    listed: dict[int, list[ManifestFile]] = {}
    if found:
        for alias, number in conn.execute(
                sa.select(t.aliases.c.alias, t.aliases.c.version)
                .where(t.aliases.c.model_id == found[0].model_id).order_by(t.aliases.c.alias)):
            pointing.setdefault(int(number), []).append(alias)
        for file_row in conn.execute(
                sa.select(t.version_files).where(t.version_files.c.version_id.in_([row.id for row in found]))):
            listed.setdefault(file_row.version_id, []).append(
                ManifestFile(file_row.path, file_row.sha256, int(file_row.size)))
    # Sorted here, not by SQL: a PostgreSQL collation may order paths unlike the manifest (code points).
    return [version(row, model, tuple(pointing.get(row.version, ())), tuple(sorted(listed.get(row.id, ()))))
            for row in found]


def version(row: sa.Row[Any], model: str, aliases: tuple[str, ...] = (),
            files: tuple[ManifestFile, ...] = ()) -> ModelVersion:
    return ModelVersion(
        model=model, version=int(row.version), format=ArtifactFormat(row.format), artifact_sha256=row.sha256,
        artifact_size=int(row.size), signature=_signature(row.signature), serving_config=_serving(row.serving_config),
        metadata=json.loads(row.metadata), lineage=Lineage(int(row.parent_version), row.transformation,
                                                           row.parent_model),
        created_by=row.created_by, create_time=time(row.create_us), aliases=aliases,
        reports=json.loads(row.reports), files=files,
    )


def record(row: sa.Row[Any]) -> Record:
    return Record(row.kind, row.name, bytes(row.data), int(row.revision), time(row.update_us))


def audit(row: sa.Row[Any]) -> AuditEvent:
    return AuditEvent(int(row.id), time(row.time_us), row.actor, row.action, row.model, int(row.version),
                      json.loads(row.details))


def change(row: sa.Row[Any]) -> ChangeEvent:
    kind = ChangeType(row.type)
    rec = None
    if row.record_kind:
        rec = Record(row.record_kind, row.record_name, bytes(row.record_data or b""), int(row.revision),
                     time(row.time_us))
    return ChangeEvent(revision=int(row.revision), type=kind, time=time(row.time_us), model=row.model,
                       version=int(row.version), alias=row.alias, from_version=int(row.from_version), record=rec)


def snapshot(conn: sa.Connection, head: int) -> list[ChangeEvent]:
    """The current state as events at revision `head`: models, versions, aliases, records."""
    events: list[ChangeEvent] = []
    names: dict[int, str] = {}
    for row in conn.execute(sa.select(t.models).order_by(t.models.c.name)):
        names[row.id] = row.name
        events.append(ChangeEvent(head, ChangeType.MODEL_CREATED, time(row.update_us), model=row.name,
                                  snapshot=True))
    for row in conn.execute(sa.select(t.versions.c.model_id, t.versions.c.version, t.versions.c.create_us)
                            .order_by(t.versions.c.model_id, t.versions.c.version)):
        events.append(ChangeEvent(head, ChangeType.VERSION_CREATED, time(row.create_us), model=names[row.model_id],
                                  version=int(row.version), snapshot=True))
    for row in conn.execute(sa.select(t.aliases).order_by(t.aliases.c.model_id, t.aliases.c.alias)):
        events.append(ChangeEvent(head, ChangeType.ALIAS_MOVED, time(row.update_us), model=names[row.model_id],
                                  version=int(row.version), alias=row.alias, snapshot=True))
    for row in conn.execute(sa.select(t.records).order_by(t.records.c.kind, t.records.c.name)):
        rec = record(row)
        events.append(ChangeEvent(head, ChangeType.RECORD_PUT, rec.update_time, record=rec, snapshot=True))
    return events
