"""The registry's store interface. Every write is one transaction that also appends its audit
event and its change-feed events, so a change, its audit entry and its feed event are never
seen apart. `SqlRegistryStore` (sql_store.py) implements it on SQLite and PostgreSQL.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from datetime import datetime
from typing import Any

from services.registry.entities import (
    AliasMove,
    AuditEvent,
    ChangeEvent,
    Model,
    ModelVersion,
    Page,
    Record,
    VersionSpec,
)
from services.registry.quality_store import QualityStore

# Called after a write commits, with the feed revision it reached.
CommitListener = Callable[[int], None]
# Puts a version's blob files in place if they are missing; run inside the version's transaction.
PlaceBlob = Callable[[], None]
# Removes a blob file (given its sha256); run inside the transaction that forgets the blob.
RemoveBlob = Callable[[str], None]
# Runs inside an alias move's transaction before it changes anything: raises to refuse the move, or
# returns details to add to its audit event (the promotion gate, services/registry/quality.py).
AliasGuard = Callable[[], dict[str, Any]]

NO_CHECK = -1


class RegistryStore(QualityStore):
    """Models, versions, aliases, records, audit and feed (and data sets and evaluation results, from
    QualityStore). Raises services.common.errors."""

    @abc.abstractmethod
    def set_commit_listener(self, listener: CommitListener | None) -> None: ...

    # Models.
    @abc.abstractmethod
    def create_model(self, name: str, description: str, labels: dict[str, str], actor: str) -> Model: ...

    @abc.abstractmethod
    def get_model(self, name: str) -> Model: ...

    @abc.abstractmethod
    def list_models(self, page_size: int, page_token: str) -> Page: ...

    @abc.abstractmethod
    def update_model(self, name: str, description: str | None, labels: dict[str, str] | None,
                     actor: str) -> Model: ...

    @abc.abstractmethod
    def delete_model(self, name: str, actor: str) -> list[str]:
        """Delete a model and its versions, dropping their blob references; returns those blobs' sha256."""

    # Versions.
    @abc.abstractmethod
    def check_new_version(self, spec: VersionSpec) -> None:
        """Raise now what `create_version` would refuse (unknown model or parent), before any upload."""

    @abc.abstractmethod
    def create_version(self, spec: VersionSpec, place_blob: PlaceBlob) -> ModelVersion:
        """Record the version and a reference to each of its blobs (the artifact, and a multi-file version's
        files), then call `place_blob` (which places them all) before committing.

        No `collect_blob` of any replica runs between the reference and the commit, so a blob file
        that `place_blob` finds (or puts) in place stays there while a version uses it."""

    @abc.abstractmethod
    def get_version(self, model: str, version: int = 0, alias: str = "") -> ModelVersion: ...

    @abc.abstractmethod
    def list_versions(self, model: str, page_size: int, page_token: str) -> Page: ...

    @abc.abstractmethod
    def delete_version(self, model: str, version: int, actor: str) -> list[str]:
        """Delete an unaliased version, dropping its blob references; returns those blobs' sha256."""

    @abc.abstractmethod
    def attach_report(self, model: str, version: int, name: str, report: dict[str, Any],
                      actor: str) -> ModelVersion: ...

    # Blobs.
    @abc.abstractmethod
    def collect_blob(self, sha256: str, remove_blob: RemoveBlob) -> bool:
        """Forget a blob no version references and call `remove_blob` before committing; False if in use.

        Runs serialized with every `create_version`, across replicas: see `create_version`."""

    @abc.abstractmethod
    def unreferenced_blobs(self, limit: int) -> list[str]:
        """Blobs no version references any more that a `collect_blob` has not removed yet."""

    @abc.abstractmethod
    def blob_refs(self, sha256: str) -> int | None:
        """How many versions reference the blob; None when the store does not know it."""

    # Aliases.
    @abc.abstractmethod
    def set_alias(self, model: str, alias: str, version: int, expected_version: int, actor: str,
                  reason: str, guard: AliasGuard | None = None) -> AliasMove:
        """Point the alias at the version; `guard` runs once the move is known to change something."""

    @abc.abstractmethod
    def delete_alias(self, model: str, alias: str, actor: str, reason: str) -> AliasMove: ...

    @abc.abstractmethod
    def rollback_alias(self, model: str, alias: str, actor: str, reason: str) -> AliasMove: ...

    @abc.abstractmethod
    def alias_history(self, model: str, alias: str, limit: int) -> list[AliasMove]: ...

    # Control-plane records.
    @abc.abstractmethod
    def put_record(self, kind: str, name: str, data: bytes, expected_revision: int, actor: str) -> Record: ...

    @abc.abstractmethod
    def get_record(self, kind: str, name: str) -> Record: ...

    @abc.abstractmethod
    def list_records(self, kind: str, page_size: int, page_token: str) -> Page: ...

    @abc.abstractmethod
    def delete_record(self, kind: str, name: str, actor: str) -> None: ...

    # Audit.
    @abc.abstractmethod
    def list_audit(self, model: str, since: datetime | None, until: datetime | None, page_size: int,
                   page_token: str) -> Page: ...

    @abc.abstractmethod
    def append_audit(self, actor: str, action: str, model: str, version: int,
                     details: dict[str, Any]) -> AuditEvent: ...

    # Change feed.
    @abc.abstractmethod
    def head_revision(self) -> int: ...

    @abc.abstractmethod
    def oldest_revision(self) -> int:
        """The oldest revision still kept for resuming; head + 1 when none is kept."""

    @abc.abstractmethod
    def events_after(self, revision: int, limit: int) -> list[ChangeEvent]: ...

    @abc.abstractmethod
    def snapshot(self) -> tuple[int, list[ChangeEvent]]:
        """Current state as snapshot events, and the revision it reflects, read consistently."""

    @abc.abstractmethod
    def close(self) -> None: ...
