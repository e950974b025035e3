"""RegistryCore: the registry's domain operations. Plain Python in and out; no gRPC here.

The core validates every input, then calls the store (one transaction per change, with its
audit and feed events) and the artifact store. Methods block (SQL, files): the servicer runs
them in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from aiaas import artifact_gate, manifest
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from services.registry import validation as check
from services.registry.artifacts import ArtifactStore, PendingArtifact, PendingFiles
from services.registry.entities import (
    AliasMove,
    AuditEvent,
    FileStart,
    ManifestFile,
    Model,
    ModelVersion,
    Page,
    Record,
    VersionSpec,
)
from services.registry.quality import DEFAULT_GATED_ALIASES, QualityCore
from services.registry.store import NO_CHECK, RegistryStore

log = logging.getLogger("aiaas.registry.core")

MAX_CHUNK_BYTES = 4 * 1024 * 1024
# The upload header (signature, metadata, reports) as sent; larger reports can follow with AttachReport.
MAX_UPLOAD_HEADER_BYTES = 4 * 1024 * 1024
# Room for a message's own fields around its largest payload (a chunk, a header, a 1 MiB record).
MESSAGE_FRAMING_BYTES = 64 * 1024
# The largest message the registry accepts: anything bigger is refused before it is buffered.
MAX_REQUEST_BYTES = max(MAX_CHUNK_BYTES, MAX_UPLOAD_HEADER_BYTES) + MESSAGE_FRAMING_BYTES
DEFAULT_DOWNLOAD_CHUNK = 1024 * 1024


def _chunk_size(value: int) -> int:
    if value < 0 or value > MAX_CHUNK_BYTES:
        raise InvalidArgument(f"chunk_size must be 0..{MAX_CHUNK_BYTES} (0 means {DEFAULT_DOWNLOAD_CHUNK})")
    return value or DEFAULT_DOWNLOAD_CHUNK


def _check_offset(offset: int, size: int, what: str) -> None:
    if not 0 <= offset <= size:
        raise OutOfRange(f"offset {offset} is outside {what} ({size} bytes)")


class UploadSlots:
    """At most `limit` uploads at once; one more is refused before it holds a file."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_use = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return self._in_use

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            if self._in_use >= self.limit:
                plural = "s" if self._in_use != 1 else ""
                raise ResourceExhausted(
                    f"this registry already has {self._in_use} upload{plural} in progress, its limit (setting "
                    "max_concurrent_uploads); retry in a few seconds", metadata={"retry-after-ms": "2000"})
            self._in_use += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use -= 1


class Upload:
    """One version upload: `write` chunks, then `finish`; `abort` (always safe) drops what was written.

    A multi-file version's chunks are its files' bytes, one file after the other (PendingFiles)."""

    def __init__(self, core: RegistryCore, spec: VersionSpec) -> None:
        self.core = core
        self.spec = spec
        # `abort` may come from another thread (a cancelled stream) while a chunk is being written.
        self._lock = threading.Lock()
        self._pending: PendingArtifact | PendingFiles | None
        if spec.files:
            self._pending = PendingFiles(core.artifacts, spec.artifact_sha256, manifest.encode(spec.files), spec.files)
        else:
            self._pending = core.artifacts.begin(spec.artifact_sha256, spec.artifact_size)

    def write(self, chunk: bytes) -> None:
        if len(chunk) > MAX_CHUNK_BYTES:
            raise InvalidArgument(f"an upload chunk is {len(chunk)} bytes; send at most {MAX_CHUNK_BYTES} per message")
        with self._lock:
            if self._pending is None:
                raise FailedPrecondition("this upload is already finished")
            self._pending.write(chunk)

    def finish(self) -> tuple[ModelVersion, bool]:
        """Verify the artifact, then create the version, storing the blob in the same transaction.

        Returns (version, deduplicated)."""
        pending = self._pending
        if pending is None:
            raise FailedPrecondition("this upload is already finished")
        try:
            # The gate reads the whole hash-verified file before the transaction, which serializes writers.
            pending.verify(self._check_content)
            pending.seal()
            version = self.core.store.create_version(self.spec, place_blob=pending.place)
        except BaseException:
            self.abort()
            # Files went into place but the version did not commit: remove them unless something uses them now.
            for sha256 in pending.placed_blobs():
                self.core.collect_blob_or_log(sha256, "the same bytes are uploaded again")
            raise
        self.abort()  # drops the temporary copy when the content was stored already
        return version, not pending.placed

    def _check_content(self, located: Path | Mapping[str, Path]) -> None:
        """The artifact gate on the complete upload: nothing that can run code becomes a version."""
        try:
            artifact_gate.check_artifact(located, self.spec.format.value,
                                         allow_torchscript="torchscript" in self.core.allowed_formats)
        except artifact_gate.UnsafeArtifact as exc:
            raise InvalidArgument(f"artifact refused: {exc}; nothing was stored") from None

    def abort(self) -> None:
        # Even during `finish`: a placed file is renamed away atomically, so an abort either comes first (and the
        # version is refused) or finds nothing left to remove.
        with self._lock:
            if self._pending is not None:
                self._pending.discard()
                self._pending = None


class RegistryCore:
    def __init__(self, store: RegistryStore, artifacts: ArtifactStore, *, max_artifact_bytes: int,
                 max_concurrent_uploads: int = 64,
                 allowed_formats: frozenset[str] = frozenset(artifact_gate.FORMATS),
                 max_dataset_bytes: int = 4 * 1024**3, gated_aliases: frozenset[str] = DEFAULT_GATED_ALIASES) -> None:
        self.allowed_formats = frozenset(allowed_formats)
        self.store = store
        self.artifacts = artifacts
        self.max_artifact_bytes = max_artifact_bytes
        self.upload_slots = UploadSlots(max_concurrent_uploads)
        # Data sets, evaluation results and the promotion gate.
        self.quality = QualityCore(self, max_dataset_bytes=max_dataset_bytes, gated_aliases=gated_aliases)

    # Models.
    def create_model(self, name: str, description: str = "", labels: dict[str, str] | None = None,
                     actor: str = "") -> Model:
        return self.store.create_model(check.name(name), check.description(description), check.labels(labels or {}),
                                       check.actor(actor))

    def get_model(self, name: str) -> Model:
        return self.store.get_model(check.name(name))

    def list_models(self, page_size: int = 0, page_token: str = "") -> Page:
        return self.store.list_models(check.page_size(page_size), page_token)

    def update_model(self, name: str, *, description: str | None = None, labels: dict[str, str] | None = None,
                     actor: str = "") -> Model:
        if description is None and labels is None:
            raise InvalidArgument("nothing to update: set update_description and/or update_labels")
        return self.store.update_model(
            check.name(name), None if description is None else check.description(description),
            None if labels is None else check.labels(labels), check.actor(actor))

    def delete_model(self, name: str, actor: str = "") -> None:
        for sha in set(self.store.delete_model(check.name(name), check.actor(actor))):
            self.collect_blob_or_log(sha, "the next sweep")

    # Versions.
    def begin_upload(self, spec: VersionSpec) -> Upload:
        """Check everything about the version before a byte is received; only then open a temporary file.

        The caller holds one of `upload_slots` for the whole upload."""
        spec = check.version_spec(spec, self.max_artifact_bytes)
        if spec.format.value not in self.allowed_formats:
            raise InvalidArgument(f"this registry does not accept {spec.format.value} artifacts (setting "
                                  f"allowed_formats: {', '.join(sorted(self.allowed_formats))})")
        if spec.files:
            try:
                artifact_gate.check_file_names((f.path for f in spec.files), spec.format.value)
            except artifact_gate.UnsafeArtifact as exc:
                raise InvalidArgument(f"artifact refused: {exc}; nothing was stored") from None
        self.store.check_new_version(spec)
        return Upload(self, spec)

    def upload_bytes(self, spec: VersionSpec, data: bytes) -> tuple[ModelVersion, bool]:
        """Upload a whole artifact held in memory (tests, small artifacts)."""
        with self.upload_slots.hold():
            upload = self.begin_upload(spec)
            try:
                for start in range(0, len(data), MAX_CHUNK_BYTES):
                    upload.write(data[start:start + MAX_CHUNK_BYTES])
                return upload.finish()
            finally:
                upload.abort()

    def get_version(self, model: str, version: int = 0, alias: str = "") -> ModelVersion:
        check.name(model)
        if version < 0:
            raise InvalidArgument(f"version must be a positive number, got {version}")
        if not version:
            if not alias:
                raise InvalidArgument("give a version number or an alias")
            check.name(alias, "alias")
        return self.store.get_version(model, version, alias)

    def list_versions(self, model: str, page_size: int = 0, page_token: str = "") -> Page:
        return self.store.list_versions(check.name(model), check.page_size(page_size), page_token)

    def delete_version(self, model: str, version: int, actor: str = "") -> None:
        for sha in self.store.delete_version(check.name(model), check.version_number(version), check.actor(actor)):
            self.collect_blob_or_log(sha, "the next sweep")

    # Blobs.
    def collect_blob(self, sha256: str) -> bool:
        """Remove the blob's file if no version uses it (any replica's upload of the same bytes waits or wins)."""
        return self.store.collect_blob(sha256, self.artifacts.remove)

    def collect_blob_or_log(self, sha256: str, left_until: str) -> None:
        """`collect_blob` after a change that already happened (or already failed): what to report is that."""
        try:
            self.collect_blob(sha256)
        except Exception:
            log.exception("could not remove unused blob %s; it stays until %s", sha256, left_until)

    def collect_unreferenced_blobs(self, limit: int = 100) -> int:
        """Remove blobs left unreferenced by a deletion whose own collection did not finish (a crash, a lost
        database connection); returns how many were removed."""
        return sum(self.collect_blob(sha) for sha in self.store.unreferenced_blobs(limit))

    def read_artifact(self, model: str, version: int = 0, alias: str = "", chunk_size: int = 0,
                      offset: int = 0) -> tuple[ModelVersion, Iterator[bytes]]:
        """The version and its artifact's bytes from `offset` (a multi-file version's artifact is its manifest)."""
        chunk_size = _chunk_size(chunk_size)
        found = self.get_version(model, version, alias)
        _check_offset(offset, found.artifact_size, "the artifact")
        return found, self.artifacts.read(found.artifact_sha256, found.artifact_size, chunk_size, offset)

    def read_files(self, model: str, version: int = 0, alias: str = "", chunk_size: int = 0, path: str = "",
                   offset: int = 0) -> tuple[ModelVersion, Iterator[FileStart | bytes]]:
        """A multi-file version and its files' bytes in manifest order, each file's after a `FileStart`;
        starting at file `path` (empty: the first), `offset` bytes in."""
        chunk_size = _chunk_size(chunk_size)
        found = self.get_version(model, version, alias)
        if not found.files:
            raise FailedPrecondition(f"version {found.version} of model {found.model!r} is a single-file "
                                     f"{found.format.value} artifact; download it with DownloadArtifact")
        paths = [listed.path for listed in found.files]
        if path and path not in paths:
            raise NotFound(f"version {found.version} of model {found.model!r} has no file {path!r}")
        if offset and not path:
            raise InvalidArgument("an offset needs the path of the file it is in")
        start = paths.index(path) if path else 0
        _check_offset(offset, found.files[start].size, f"file {path!r}")
        return found, self._file_parts(found.files[start:], offset, chunk_size)

    def _file_parts(self, files: Sequence[ManifestFile], offset: int, chunk_size: int) -> Iterator[FileStart | bytes]:
        for index, listed in enumerate(files):
            start = offset if index == 0 else 0
            yield FileStart(listed.path, start)
            yield from self.artifacts.read(listed.sha256, listed.size, chunk_size, start)

    def attach_report(self, model: str, version: int, name: str, report: dict[str, Any],
                      actor: str = "") -> ModelVersion:
        return self.store.attach_report(check.name(model), check.version_number(version),
                                        check.name(name, "report name"), check.json_document(report, "report"),
                                        check.actor(actor))

    # Aliases.
    def set_alias(self, model: str, alias: str, version: int, expected_version: int = NO_CHECK,
                  actor: str = "", reason: str = "", force: bool = False) -> AliasMove:
        """Move the alias; a gated alias (production) only to a version that passed what its model's
        evaluation gate requires, unless forced with a reason."""
        if expected_version < NO_CHECK:
            raise InvalidArgument("expected_version must be -1 (no check), 0 (alias must be new) or a version")
        if force and not reason.strip():
            raise InvalidArgument("a forced alias move needs a reason; it is recorded in the audit log")
        guard = self.quality.alias_guard(model, alias, version, force=force)
        return self.store.set_alias(check.name(model), check.name(alias, "alias"), check.version_number(version),
                                    expected_version, check.actor(actor), check.reason(reason), guard=guard)

    def delete_alias(self, model: str, alias: str, actor: str = "", reason: str = "") -> AliasMove:
        return self.store.delete_alias(check.name(model), check.name(alias, "alias"), check.actor(actor),
                                       check.reason(reason))

    def rollback_alias(self, model: str, alias: str, actor: str = "", reason: str = "") -> AliasMove:
        return self.store.rollback_alias(check.name(model), check.name(alias, "alias"), check.actor(actor),
                                         check.reason(reason))

    def alias_history(self, model: str, alias: str = "", limit: int = 0) -> list[AliasMove]:
        if alias:
            check.name(alias, "alias")
        return self.store.alias_history(check.name(model), alias, check.page_size(limit))

    # Records.
    def put_record(self, kind: str, name: str, data: bytes, expected_revision: int = NO_CHECK,
                   actor: str = "") -> Record:
        if expected_revision < NO_CHECK:
            raise InvalidArgument("expected_revision must be -1 (no check), 0 (must be new) or a revision")
        return self.store.put_record(check.name(kind, "record kind"), check.record_name(name),
                                     check.record_data(data), expected_revision, check.actor(actor))

    def get_record(self, kind: str, name: str) -> Record:
        return self.store.get_record(check.name(kind, "record kind"), check.record_name(name))

    def list_records(self, kind: str, page_size: int = 0, page_token: str = "") -> Page:
        return self.store.list_records(check.name(kind, "record kind"), check.page_size(page_size), page_token)

    def delete_record(self, kind: str, name: str, actor: str = "") -> None:
        self.store.delete_record(check.name(kind, "record kind"), check.record_name(name), check.actor(actor))

    # Audit.
    def list_audit(self, model: str = "", since: datetime | None = None, until: datetime | None = None,
                   page_size: int = 0, page_token: str = "") -> Page:
        if model:
            check.name(model)
        if since is not None and until is not None and since > until:
            raise InvalidArgument("since is after until")
        return self.store.list_audit(model, since, until, check.page_size(page_size), page_token)

    def append_audit(self, actor: str, action: str, model: str = "", version: int = 0,
                     details: dict[str, Any] | None = None) -> AuditEvent:
        if model:
            check.name(model)
        if not action or len(action) > 100:
            raise InvalidArgument("action must be 1 to 100 characters, e.g. 'canary.rollback'")
        if version < 0:
            raise InvalidArgument(f"version must be >= 0, got {version}")
        return self.store.append_audit(check.actor(actor), action, model, version,
                                       check.json_document(details or {}, "details"))
