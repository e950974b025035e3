"""Input rules of the registry, each failure an `InvalidArgument` a person can act on."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from typing import Any

from aiaas import manifest
from services.common.errors import InvalidArgument
from services.registry.entities import (
    Lineage,
    ManifestFile,
    ServingConfig,
    Signature,
    TensorSpec,
    VersionSpec,
)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
TENSOR_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}")
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
DATATYPES = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
     "FP16", "BF16", "FP32", "FP64", "BYTES"}
)
MAX_RANK = 16
MAX_TENSORS = 256
MAX_DESCRIPTION = 4096
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_ACTOR = 200
MAX_REASON = 1024
MAX_JSON_BYTES = 256 * 1024
MAX_RECORD_NAME = 200
MAX_RECORD_BYTES = 1024 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def name(value: str, what: str = "model name") -> str:
    if not NAME_RE.fullmatch(value or ""):
        raise InvalidArgument(
            f"{what} {value!r} is invalid: use 1 to 63 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return value


def actor(value: str) -> str:
    value = (value or "").strip()
    if len(value) > MAX_ACTOR:
        raise InvalidArgument(f"actor is longer than {MAX_ACTOR} characters")
    return value or "anonymous"


def reason(value: str) -> str:
    if len(value) > MAX_REASON:
        raise InvalidArgument(f"reason is longer than {MAX_REASON} characters")
    return value


def description(value: str) -> str:
    if len(value) > MAX_DESCRIPTION:
        raise InvalidArgument(f"description is longer than {MAX_DESCRIPTION} characters")
    return value


def labels(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_LABELS:
        raise InvalidArgument(f"a model has at most {MAX_LABELS} labels, got {len(value)}")
    for key, val in value.items():
        if not LABEL_KEY_RE.fullmatch(key):
            raise InvalidArgument(f"label key {key!r} is invalid: use up to 63 characters from A-Z a-z 0-9 . _ / -")
        if len(val) > MAX_LABEL_VALUE:
            raise InvalidArgument(f"label {key!r}: value is longer than {MAX_LABEL_VALUE} characters")
    return dict(value)


def page_size(value: int) -> int:
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 1 and {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE}), got {value}")
    return value


def version_number(value: int, what: str = "version") -> int:
    if value < 1:
        raise InvalidArgument(f"{what} must be a positive version number, got {value}")
    return value


def json_document(value: dict[str, Any], what: str) -> dict[str, Any]:
    try:
        size = len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} is not a JSON document: {exc}") from None
    if size > MAX_JSON_BYTES:
        raise InvalidArgument(f"{what} is {size} bytes as JSON; the limit is {MAX_JSON_BYTES}")
    return value


def record_name(value: str) -> str:
    if not value or len(value) > MAX_RECORD_NAME or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgument(f"record name {value[:40]!r} is invalid: use 1 to {MAX_RECORD_NAME} characters, "
                              "no control characters")
    return value


def record_data(value: bytes) -> bytes:
    if len(value) > MAX_RECORD_BYTES:
        raise InvalidArgument(f"record data is {len(value)} bytes; the limit is {MAX_RECORD_BYTES}")
    return value


def _tensor(spec: TensorSpec, where: str, batched: bool, max_batch: int) -> None:
    label = f"signature {where} {spec.name!r}"
    if not TENSOR_NAME_RE.fullmatch(spec.name):
        raise InvalidArgument(f"signature {where} name {spec.name!r} is invalid: use 1 to 128 characters from "
                              "A-Z a-z 0-9 _ . : / -, starting with a letter, digit or '_'")
    if spec.datatype not in DATATYPES:
        raise InvalidArgument(f"{label}: datatype {spec.datatype!r} is not a KServe datatype; use one of "
                              + ", ".join(sorted(DATATYPES)))
    if len(spec.shape) > MAX_RANK:
        raise InvalidArgument(f"{label}: shape has {len(spec.shape)} dimensions; the limit is {MAX_RANK}")
    for dim in spec.shape:
        if dim < -1 or dim == 0:
            raise InvalidArgument(f"{label}: shape {list(spec.shape)} has dimension {dim}; "
                                  "use a positive size or -1 for a variable one")
    if batched and (not spec.shape or spec.shape[0] != -1):
        raise InvalidArgument(f"{label}: with batching (max_batch_size {max_batch}) the first dimension is the "
                              f"batch and must be -1, got shape {list(spec.shape)}")


def signature(sig: Signature, serving: ServingConfig) -> Signature:
    if not sig.inputs or not sig.outputs:
        raise InvalidArgument("signature needs at least one input and one output tensor")
    batched = serving.max_batch_size > 0
    for where, specs in (("input", sig.inputs), ("output", sig.outputs)):
        if len(specs) > MAX_TENSORS:
            raise InvalidArgument(f"signature has {len(specs)} {where}s; the limit is {MAX_TENSORS}")
        seen: set[str] = set()
        for spec in specs:
            _tensor(spec, where, batched, serving.max_batch_size)
            if spec.name in seen:
                raise InvalidArgument(f"signature {where} {spec.name!r} is declared twice")
            seen.add(spec.name)
    return sig


def serving_config(cfg: ServingConfig) -> ServingConfig:
    """The rules live with the type (aiaas.serving), so the pipeline checks the same ones before upload."""
    return cfg.normalized()


def lineage(value: Lineage) -> Lineage:
    if value.parent_version < 0:
        raise InvalidArgument(f"lineage.parent_version must be >= 0, got {value.parent_version}")
    if value.parent_model:
        name(value.parent_model, "lineage.parent_model")
    if len(value.transformation) > 256:
        raise InvalidArgument("lineage.transformation is longer than 256 characters")
    if value.parent_model and not value.parent_version:
        raise InvalidArgument("lineage.parent_model needs lineage.parent_version")
    return value


def files(spec: VersionSpec, max_artifact_bytes: int) -> tuple[tuple[ManifestFile, ...], str, int]:
    """A multi-file version's files, and the sha256 and size of their manifest (its artifact)."""
    fmt = spec.format.value
    if not spec.format.multi_file:
        raise InvalidArgument(f"a {fmt} artifact is a single file: send it without a files list")
    if not spec.files:
        raise InvalidArgument(f"a {fmt} version is a directory of files: list them (path, sha256, size) in the "
                              "upload header's files")
    listed = manifest.check_files(spec.files)
    if listed != tuple(spec.files):
        raise InvalidArgument("list the files sorted by path: their bytes follow in that order")
    total = manifest.total_size(listed)
    if total > max_artifact_bytes:
        raise InvalidArgument(f"the files add up to {total} bytes, over this registry's limit of {max_artifact_bytes} "
                              "bytes (setting max_artifact_bytes)")
    sha256, size = manifest.digest(listed)
    if spec.artifact_sha256 and spec.artifact_sha256 != sha256:
        raise InvalidArgument(f"artifact_sha256 of a multi-file version is the sha256 of its manifest "
                              f"(aiaas.manifest.digest): the files listed give {sha256}, not {spec.artifact_sha256}; "
                              "or leave it empty")
    if spec.artifact_size and spec.artifact_size != size:
        raise InvalidArgument(f"artifact_size of a multi-file version is the size of its manifest: the files listed "
                              f"give {size}, not {spec.artifact_size}; or leave it 0")
    return listed, sha256, size


def version_spec(spec: VersionSpec, max_artifact_bytes: int) -> VersionSpec:
    name(spec.model)
    listed: tuple[ManifestFile, ...] = ()
    if spec.files or spec.format.multi_file:
        listed, sha256, size = files(spec, max_artifact_bytes)
        spec = dataclasses.replace(spec, artifact_sha256=sha256, artifact_size=size)
    if not SHA256_RE.fullmatch(spec.artifact_sha256):
        raise InvalidArgument("artifact_sha256 must be 64 lowercase hex characters (the sha256 of the artifact)")
    if spec.artifact_size <= 0:
        raise InvalidArgument(f"artifact_size must be positive, got {spec.artifact_size}")
    if spec.artifact_size > max_artifact_bytes:
        raise InvalidArgument(f"artifact_size {spec.artifact_size} exceeds this registry's limit of "
                              f"{max_artifact_bytes} bytes (setting max_artifact_bytes)")
    cfg = serving_config(spec.serving_config)
    # A checkpoint speaks text (the generative engine's protocol): a tensor signature is optional.
    if not spec.format.multi_file or spec.signature.inputs or spec.signature.outputs:
        signature(spec.signature, cfg)
    json_document(spec.metadata, "metadata")
    for report_name, report in spec.reports.items():
        name(report_name, "report name")
        json_document(report, f"report {report_name!r}")
    return VersionSpec(
        model=spec.model, format=spec.format, artifact_sha256=spec.artifact_sha256,
        artifact_size=spec.artifact_size, signature=spec.signature, serving_config=cfg,
        metadata=spec.metadata, lineage=lineage(spec.lineage), actor=actor(spec.actor),
        create_model=spec.create_model, reports=spec.reports, files=listed,
    )


def encode_token(kind: str, position: Any) -> str:
    raw = json.dumps([kind, position]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, kind: str) -> Any:
    """The position inside a page token made by `encode_token(kind, ...)`; None for an empty token."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        found_kind, position = json.loads(raw)
    except (ValueError, TypeError):
        found_kind, position = None, None
    if found_kind != kind:
        raise InvalidArgument("page_token is malformed or belongs to another listing; pass the next_page_token "
                              "of the previous response unchanged")
    return position
