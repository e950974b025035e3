"""The registry's domain types: plain dataclasses, no protobuf, no SQL."""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime
from typing import Any

from aiaas.formats import ArtifactFormat
from aiaas.manifest import ManifestFile
from aiaas.serving import ServingConfig
from aiaas.tensors import TensorSpec

__all__ = ["AliasMove", "ArtifactFormat", "AuditEvent", "ChangeEvent", "ChangeType", "Dataset", "DatasetColumn",
           "DatasetSpec", "FileStart", "Lineage", "ManifestFile", "Model", "ModelVersion", "Page", "Record",
           "ServingConfig", "Signature", "StoredEvaluation", "TensorSpec", "VersionBody", "VersionSpec"]


class ChangeType(enum.Enum):
    MODEL_CREATED = "model_created"
    MODEL_UPDATED = "model_updated"
    MODEL_DELETED = "model_deleted"
    VERSION_CREATED = "version_created"
    VERSION_DELETED = "version_deleted"
    ALIAS_MOVED = "alias_moved"
    ALIAS_DELETED = "alias_deleted"
    RECORD_PUT = "record_put"
    RECORD_DELETED = "record_deleted"
    SNAPSHOT_DONE = "snapshot_done"
    HEARTBEAT = "heartbeat"


@dataclasses.dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()


@dataclasses.dataclass(frozen=True)
class Lineage:
    parent_version: int = 0
    transformation: str = ""
    parent_model: str = ""


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    description: str
    labels: dict[str, str]
    aliases: dict[str, int]
    latest_version: int
    created_by: str
    create_time: datetime
    update_time: datetime


@dataclasses.dataclass(frozen=True, kw_only=True)
class VersionBody:
    """What a version is: its artifact, signature, serving settings and provenance; declared by a
    client (`VersionSpec`) and stored by the registry (`ModelVersion`) alike."""

    model: str
    format: ArtifactFormat
    artifact_sha256: str
    artifact_size: int
    signature: Signature
    serving_config: ServingConfig = dataclasses.field(default_factory=ServingConfig)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    lineage: Lineage = Lineage()
    reports: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # A multi-file version's files, sorted by path (their bytes arrive in this order); the artifact is then
    # their manifest (aiaas.manifest).
    files: tuple[ManifestFile, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class VersionSpec(VersionBody):
    """What a client declares for a new version (the upload header, validated)."""

    actor: str = "anonymous"
    create_model: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelVersion(VersionBody):
    version: int
    created_by: str
    create_time: datetime
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class FileStart:
    """In a download of a multi-file version: the chunks that follow are `path`'s, from `offset` on."""

    path: str
    offset: int


@dataclasses.dataclass(frozen=True)
class AliasMove:
    model: str
    alias: str
    from_version: int
    to_version: int
    actor: str
    reason: str
    time: datetime


@dataclasses.dataclass(frozen=True)
class Record:
    kind: str
    name: str
    data: bytes
    revision: int
    update_time: datetime


@dataclasses.dataclass(frozen=True)
class AuditEvent:
    id: int
    time: datetime
    actor: str
    action: str
    model: str
    version: int
    details: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ChangeEvent:
    revision: int
    type: ChangeType
    time: datetime
    model: str = ""
    version: int = 0
    alias: str = ""
    from_version: int = 0
    record: Record | None = None
    snapshot: bool = False


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of a listing; `next_token` is empty on the last page."""

    items: list[Any]
    next_token: str = ""


@dataclasses.dataclass(frozen=True)
class DatasetColumn:
    name: str
    datatype: str
    shape: tuple[int, ...]
    role: str  # "input", "label" or "feature"
    split: bool = False


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a client declares for a new data set (the upload header, validated)."""

    name: str
    format: str  # aiaas.eval.formats.DatasetFormat value
    sha256: str
    size: int
    label_columns: tuple[str, ...]
    model: str
    model_version: int = 0
    model_alias: str = ""
    description: str = ""
    actor: str = "anonymous"


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    format: str
    sha256: str
    size: int
    num_rows: int
    columns: tuple[DatasetColumn, ...]
    model: str
    model_version: int
    description: str
    created_by: str
    create_time: datetime


@dataclasses.dataclass(frozen=True)
class StoredEvaluation:
    """An EvaluationResult as the store keeps it: serialized, with what the store needs to know."""

    model: str
    version: int
    name: str
    passed: bool
    data: bytes
    created_by: str
    create_time: datetime
