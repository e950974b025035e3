"""`RegistryStore` on SQLAlchemy: SQLite (WAL) embedded, PostgreSQL for several replicas.

Writers are serialized by the `feed_head` row (locked first in every writing transaction; on
SQLite `BEGIN IMMEDIATE` does the same), which keeps revisions gapless and in commit order and
makes every check-then-write below (version numbers, compare-and-set, blob references) race-free,
across replicas too: a blob file is placed or removed only inside such a transaction.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from services.common.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.registry import rows
from services.registry import schema as t
from services.registry.entities import (
    AliasMove,
    AuditEvent,
    ChangeEvent,
    ChangeType,
    Model,
    ModelVersion,
    Page,
    Record,
    VersionSpec,
)
from services.registry.quality_store import SqlQualityStore
from services.registry.store import NO_CHECK, AliasGuard, CommitListener, PlaceBlob, RegistryStore, RemoveBlob
from services.registry.validation import decode_token, encode_token


def now_us() -> int:
    return time.time_ns() // 1000


def create_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event below issue BEGIN, not the sqlite3 module.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            for pragma in ("journal_mode=WAL", "foreign_keys=ON", "synchronous=NORMAL", "busy_timeout=30000"):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # A writer takes the lock up front: upgrading a read lock later can fail with SQLITE_BUSY.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class _Tx:
    """One writing transaction: its connection, its clock, and the feed events it appends."""

    def __init__(self, conn: sa.Connection, retention: int) -> None:
        self.conn = conn
        self.now = now_us()
        self.retention = retention
        self.head = conn.execute(
            sa.update(t.feed_head).where(t.feed_head.c.id == 1)
            .values(revision=t.feed_head.c.revision).returning(t.feed_head.c.revision)
        ).scalar_one()
        self.first_head = self.head

    def emit(self, kind: ChangeType, model: str = "", version: int = 0, alias: str = "", from_version: int = 0,
             record: tuple[str, str, bytes | None] | None = None) -> int:
        self.head += 1
        kind_name, record_name, data = record or ("", "", None)
        self.conn.execute(t.feed.insert().values(
            revision=self.head, type=kind.value, model=model, version=version, alias=alias,
            from_version=from_version, record_kind=kind_name, record_name=record_name, record_data=data,
            time_us=self.now,
        ))
        return self.head

    def audit(self, actor: str, action: str, model: str = "", version: int = 0,
              extra: dict[str, Any] | None = None, **details: Any) -> int:
        return int(self.conn.execute(t.audit.insert().values(
            time_us=self.now, actor=actor, action=action, model=model, version=version,
            details=json.dumps({**(extra or {}), **details}, sort_keys=True),
        ).returning(t.audit.c.id)).scalar_one())

    def finish(self) -> None:
        if self.head == self.first_head:
            return
        self.conn.execute(sa.update(t.feed_head).where(t.feed_head.c.id == 1).values(revision=self.head))
        self.conn.execute(sa.delete(t.feed).where(t.feed.c.revision <= self.head - self.retention))


class SqlRegistryStore(SqlQualityStore, RegistryStore):
    def __init__(self, url: str, *, feed_retention: int = 10_000) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.dialect = self.engine.dialect.name
        self.feed_retention = feed_retention
        self._listener: CommitListener | None = None
        t.migrate(self.engine)

    def set_commit_listener(self, listener: CommitListener | None) -> None:
        self._listener = listener

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _write(self) -> Iterator[_Tx]:
        with self.engine.connect() as conn:
            conn.execution_options(write=True)
            try:
                with conn.begin():
                    tx = _Tx(conn, self.feed_retention)
                    yield tx
                    tx.finish()
            except sa.exc.IntegrityError as exc:
                raise Aborted(f"a concurrent change conflicted with this one; retry ({exc.orig})") from None
        if tx.head != tx.first_head and self._listener is not None:
            self._listener(tx.head)

    @contextlib.contextmanager
    def _read(self, consistent: bool = False) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            if consistent and self.dialect == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    # Lookups shared by reads and writes.
    def _model_row(self, conn: sa.Connection, name: str) -> sa.Row[Any]:
        row = conn.execute(sa.select(t.models).where(t.models.c.name == name)).first()
        if row is None:
            raise NotFound(f"model {name!r} not found")
        return row

    def _version_row(self, conn: sa.Connection, model: sa.Row[Any], version: int) -> sa.Row[Any]:
        row = conn.execute(sa.select(t.versions).where(
            t.versions.c.model_id == model.id, t.versions.c.version == version)).first()
        if row is None:
            raise NotFound(f"model {model.name!r} has no version {version}")
        return row

    def _alias_target(self, conn: sa.Connection, model_id: int, alias: str) -> int:
        found = conn.execute(sa.select(t.aliases.c.version).where(
            t.aliases.c.model_id == model_id, t.aliases.c.alias == alias)).scalar()
        return int(found or 0)

    # Models.
    def create_model(self, name: str, description: str, labels: dict[str, str], actor: str) -> Model:
        with self._write() as tx:
            self._insert_model(tx, name, description, labels, actor)
        return self.get_model(name)

    def _insert_model(self, tx: _Tx, name: str, description: str, labels: dict[str, str], actor: str) -> int:
        if tx.conn.execute(sa.select(t.models.c.id).where(t.models.c.name == name)).first() is not None:
            raise AlreadyExists(f"model {name!r} already exists")
        model_id = tx.conn.execute(t.models.insert().values(
            name=name, description=description, labels=json.dumps(labels, sort_keys=True), last_version=0,
            created_by=actor, create_us=tx.now, update_us=tx.now,
        ).returning(t.models.c.id)).scalar_one()
        tx.audit(actor, "model.create", name, description=description, labels=labels)
        tx.emit(ChangeType.MODEL_CREATED, model=name)
        return int(model_id)

    def get_model(self, name: str) -> Model:
        with self._read() as conn:
            return rows.models(conn, [self._model_row(conn, name)])[0]

    def list_models(self, page_size: int, page_token: str) -> Page:
        after = decode_token(page_token, "models")
        query = sa.select(t.models).order_by(t.models.c.name).limit(page_size + 1)
        if after is not None:
            query = query.where(t.models.c.name > str(after))
        with self._read() as conn:
            found = list(conn.execute(query))
            items = rows.models(conn, found[:page_size])
        token = encode_token("models", items[-1].name) if len(found) > page_size else ""
        return Page(items, token)

    def update_model(self, name: str, description: str | None, labels: dict[str, str] | None,
                     actor: str) -> Model:
        with self._write() as tx:
            row = self._model_row(tx.conn, name)
            values: dict[str, Any] = {"update_us": tx.now}
            if description is not None:
                values["description"] = description
            if labels is not None:
                values["labels"] = json.dumps(labels, sort_keys=True)
            tx.conn.execute(sa.update(t.models).where(t.models.c.id == row.id).values(**values))
            tx.audit(actor, "model.update", name, description=description, labels=labels)
            tx.emit(ChangeType.MODEL_UPDATED, model=name)
        return self.get_model(name)

    def delete_model(self, name: str, actor: str) -> list[str]:
        with self._write() as tx:
            row = self._model_row(tx.conn, name)
            pointed = tx.conn.execute(sa.select(t.aliases.c.alias, t.aliases.c.version).where(
                t.aliases.c.model_id == row.id).order_by(t.aliases.c.alias)).all()
            if pointed:
                listed = ", ".join(f"{a}->{v}" for a, v in pointed)
                raise FailedPrecondition(f"model {name!r} still has aliases ({listed}); delete or move them first")
            gone = tx.conn.execute(sa.select(t.versions.c.id, t.versions.c.version).where(
                t.versions.c.model_id == row.id).order_by(t.versions.c.version)).all()
            shas = [sha for version_id, _ in gone for sha in self._drop_version(tx, version_id)]
            tx.conn.execute(sa.delete(t.alias_moves).where(t.alias_moves.c.model_id == row.id))
            tx.conn.execute(sa.delete(t.models).where(t.models.c.id == row.id))
            tx.audit(actor, "model.delete", name, versions=[v for _, v in gone])
            for _, number in gone:
                tx.emit(ChangeType.VERSION_DELETED, model=name, version=number)
            tx.emit(ChangeType.MODEL_DELETED, model=name)
        return shas

    # Versions.
    def check_new_version(self, spec: VersionSpec) -> None:
        with self._read() as conn:
            self._check_version_refs(conn, spec)

    def _check_version_refs(self, conn: sa.Connection, spec: VersionSpec) -> sa.Row[Any] | None:
        row = conn.execute(sa.select(t.models).where(t.models.c.name == spec.model)).first()
        if row is None and not spec.create_model:
            raise NotFound(f"model {spec.model!r} not found; create it first or set create_model")
        parent = spec.lineage.parent_version
        if parent:
            parent_name = spec.lineage.parent_model or spec.model
            parent_row = conn.execute(sa.select(t.models).where(t.models.c.name == parent_name)).first()
            if parent_row is None:
                raise NotFound(f"lineage: parent model {parent_name!r} not found")
            self._version_row(conn, parent_row, parent)
        return row

    def create_version(self, spec: VersionSpec, place_blob: PlaceBlob) -> ModelVersion:
        with self._write() as tx:
            row = self._check_version_refs(tx.conn, spec)
            model_id = row.id if row is not None else self._insert_model(tx, spec.model, "", {}, spec.actor)
            number = tx.conn.execute(
                sa.update(t.models).where(t.models.c.id == model_id)
                .values(last_version=t.models.c.last_version + 1, update_us=tx.now)
                .returning(t.models.c.last_version)
            ).scalar_one()
            version_id = tx.conn.execute(t.versions.insert().values(
                model_id=model_id, version=number, **rows.version_values(spec), create_us=tx.now,
            ).returning(t.versions.c.id)).scalar_one()
            if spec.files:
                tx.conn.execute(t.version_files.insert(), [
                    {"version_id": version_id, "path": f.path, "sha256": f.sha256, "size": f.size} for f in spec.files])
            for sha256, size in self._blobs_of(spec).items():
                self._add_blob_ref(tx, sha256, size)
            place_blob()
            tx.audit(spec.actor, "version.create", spec.model, number, sha256=spec.artifact_sha256,
                     size=spec.artifact_size, format=spec.format.value,
                     parent_model=spec.lineage.parent_model, parent_version=spec.lineage.parent_version,
                     transformation=spec.lineage.transformation)
            tx.emit(ChangeType.VERSION_CREATED, model=spec.model, version=number)
        return self.get_version(spec.model, number)

    def get_version(self, model: str, version: int = 0, alias: str = "") -> ModelVersion:
        with self._read() as conn:
            model_row = self._model_row(conn, model)
            if not version:
                version = self._alias_target(conn, model_row.id, alias)
                if not version:
                    raise NotFound(f"model {model!r} has no alias {alias!r}")
            return rows.versions(conn, model, [self._version_row(conn, model_row, version)])[0]

    def list_versions(self, model: str, page_size: int, page_token: str) -> Page:
        after = decode_token(page_token, "versions:" + model)
        with self._read() as conn:
            model_row = self._model_row(conn, model)
            query = (sa.select(t.versions).where(t.versions.c.model_id == model_row.id)
                     .order_by(t.versions.c.version).limit(page_size + 1))
            if after is not None:
                query = query.where(t.versions.c.version > int(after))
            found = list(conn.execute(query))
            items = rows.versions(conn, model, found[:page_size])
        token = encode_token("versions:" + model, items[-1].version) if len(found) > page_size else ""
        return Page(items, token)

    def delete_version(self, model: str, version: int, actor: str) -> list[str]:
        with self._write() as tx:
            model_row = self._model_row(tx.conn, model)
            row = self._version_row(tx.conn, model_row, version)
            pointing = tx.conn.execute(sa.select(t.aliases.c.alias).where(
                t.aliases.c.model_id == model_row.id, t.aliases.c.version == version)
                .order_by(t.aliases.c.alias)).scalars().all()
            if pointing:
                raise FailedPrecondition(f"version {version} of model {model!r} is aliased by "
                                         f"{', '.join(pointing)}; move or delete those aliases first")
            shas = self._drop_version(tx, row.id)
            tx.audit(actor, "version.delete", model, version, sha256=row.sha256)
            tx.emit(ChangeType.VERSION_DELETED, model=model, version=version)
        return shas

    def _drop_version(self, tx: _Tx, version_id: int) -> list[str]:
        """Delete a version's row and files, dropping one reference to each blob it used; returns them."""
        sha = tx.conn.execute(sa.select(t.versions.c.sha256).where(t.versions.c.id == version_id)).scalar_one()
        listed = tx.conn.execute(sa.select(t.version_files.c.sha256).where(
            t.version_files.c.version_id == version_id)).scalars().all()
        tx.conn.execute(sa.delete(t.version_files).where(t.version_files.c.version_id == version_id))
        tx.conn.execute(sa.delete(t.versions).where(t.versions.c.id == version_id))
        shas = sorted({sha, *listed})
        for blob in shas:
            self._drop_blob_ref(tx, blob)
        return shas

    def attach_report(self, model: str, version: int, name: str, report: dict[str, Any],
                      actor: str) -> ModelVersion:
        with self._write() as tx:
            row = self._version_row(tx.conn, self._model_row(tx.conn, model), version)
            reports = {**json.loads(row.reports), name: report}
            tx.conn.execute(sa.update(t.versions).where(t.versions.c.id == row.id)
                            .values(reports=json.dumps(reports, sort_keys=True)))
            tx.audit(actor, "version.report", model, version, report=name)
        return self.get_version(model, version)

    # Blobs.
    @staticmethod
    def _blobs_of(spec: VersionSpec) -> dict[str, int]:
        """The distinct blobs a version uses (its artifact, and a multi-file version's files), with their sizes."""
        return {spec.artifact_sha256: spec.artifact_size, **{f.sha256: f.size for f in spec.files}}

    def _add_blob_ref(self, tx: _Tx, sha256: str, size: int) -> None:
        # No insert can race this one: writers are serialized (module docstring).
        added = tx.conn.execute(sa.update(t.blobs).where(t.blobs.c.sha256 == sha256)
                                .values(refs=t.blobs.c.refs + 1, update_us=tx.now)).rowcount
        if not added:
            tx.conn.execute(t.blobs.insert().values(sha256=sha256, size=size, refs=1, update_us=tx.now))

    def _drop_blob_ref(self, tx: _Tx, sha256: str) -> None:
        tx.conn.execute(sa.update(t.blobs).where(t.blobs.c.sha256 == sha256, t.blobs.c.refs > 0)
                        .values(refs=t.blobs.c.refs - 1, update_us=tx.now))

    def collect_blob(self, sha256: str, remove_blob: RemoveBlob) -> bool:
        with self._write() as tx:
            refs = tx.conn.execute(sa.select(t.blobs.c.refs).where(t.blobs.c.sha256 == sha256)).scalar()
            if refs:
                return False
            tx.conn.execute(sa.delete(t.blobs).where(t.blobs.c.sha256 == sha256))
            # Before the commit: if it fails, the row stays unreferenced and a later collection retries.
            remove_blob(sha256)
        return True

    def unreferenced_blobs(self, limit: int) -> list[str]:
        with self._read() as conn:
            return list(conn.execute(sa.select(t.blobs.c.sha256).where(t.blobs.c.refs == 0)
                                     .order_by(t.blobs.c.update_us).limit(limit)).scalars())

    def blob_refs(self, sha256: str) -> int | None:
        with self._read() as conn:
            refs = conn.execute(sa.select(t.blobs.c.refs).where(t.blobs.c.sha256 == sha256)).scalar()
        return None if refs is None else int(refs)

    # Aliases.
    def _move(self, tx: _Tx, model: sa.Row[Any], alias: str, to_version: int, actor: str, reason: str,
              action: str, details: dict[str, Any] | None = None) -> AliasMove:
        current = self._alias_target(tx.conn, model.id, alias)
        key = (t.aliases.c.model_id == model.id, t.aliases.c.alias == alias)
        if to_version == 0:
            tx.conn.execute(sa.delete(t.aliases).where(*key))
        elif current:
            tx.conn.execute(sa.update(t.aliases).where(*key).values(version=to_version, update_us=tx.now))
        else:
            tx.conn.execute(t.aliases.insert().values(model_id=model.id, alias=alias, version=to_version,
                                                      update_us=tx.now))
        tx.conn.execute(t.alias_moves.insert().values(
            model_id=model.id, alias=alias, from_version=current, to_version=to_version, actor=actor,
            reason=reason, time_us=tx.now))
        tx.conn.execute(sa.update(t.models).where(t.models.c.id == model.id).values(update_us=tx.now))
        tx.audit(actor, action, model.name, to_version, extra=details, alias=alias, from_version=current,
                 to_version=to_version, reason=reason)
        if to_version:
            tx.emit(ChangeType.ALIAS_MOVED, model=model.name, version=to_version, alias=alias, from_version=current)
        else:
            tx.emit(ChangeType.ALIAS_DELETED, model=model.name, alias=alias, from_version=current)
        return AliasMove(model.name, alias, current, to_version, actor, reason, rows.time(tx.now))

    def set_alias(self, model: str, alias: str, version: int, expected_version: int, actor: str,
                  reason: str, guard: AliasGuard | None = None) -> AliasMove:
        with self._write() as tx:
            model_row = self._model_row(tx.conn, model)
            self._version_row(tx.conn, model_row, version)
            current = self._alias_target(tx.conn, model_row.id, alias)
            if expected_version != NO_CHECK and expected_version != current:
                now = f"points at version {current}" if current else "does not exist"
                wanted = f"version {expected_version}" if expected_version else "no version (a new alias)"
                raise Aborted(f"alias {alias!r} of model {model!r} {now}, not the expected {wanted}; "
                              "it was moved concurrently: read it again and retry")
            if current == version:
                return AliasMove(model, alias, current, version, actor, reason, rows.time(tx.now))
            # Writers are serialized from here to the commit, so what the guard reads cannot change meanwhile.
            details = guard() if guard is not None else None
            return self._move(tx, model_row, alias, version, actor, reason, "alias.set", details)

    def delete_alias(self, model: str, alias: str, actor: str, reason: str) -> AliasMove:
        with self._write() as tx:
            model_row = self._model_row(tx.conn, model)
            if not self._alias_target(tx.conn, model_row.id, alias):
                raise NotFound(f"model {model!r} has no alias {alias!r}")
            return self._move(tx, model_row, alias, 0, actor, reason, "alias.delete")

    def rollback_alias(self, model: str, alias: str, actor: str, reason: str) -> AliasMove:
        with self._write() as tx:
            model_row = self._model_row(tx.conn, model)
            last = tx.conn.execute(sa.select(t.alias_moves).where(
                t.alias_moves.c.model_id == model_row.id, t.alias_moves.c.alias == alias)
                .order_by(t.alias_moves.c.id.desc()).limit(1)).first()
            if last is None:
                raise NotFound(f"model {model!r} has no alias {alias!r}")
            if not last.from_version:
                raise FailedPrecondition(f"alias {alias!r} of model {model!r} was created by its last move: "
                                         "there is no earlier version to roll back to")
            target = int(last.from_version)
            exists = tx.conn.execute(sa.select(t.versions.c.id).where(
                t.versions.c.model_id == model_row.id, t.versions.c.version == target)).first()
            if exists is None:
                raise FailedPrecondition(f"alias {alias!r} of model {model!r} pointed at version {target} before, "
                                         "but that version was deleted; set the alias explicitly")
            return self._move(tx, model_row, alias, target, actor, reason, "alias.rollback")

    def alias_history(self, model: str, alias: str, limit: int) -> list[AliasMove]:
        with self._read() as conn:
            model_row = self._model_row(conn, model)
            query = (sa.select(t.alias_moves).where(t.alias_moves.c.model_id == model_row.id)
                     .order_by(t.alias_moves.c.id.desc()).limit(limit))
            if alias:
                query = query.where(t.alias_moves.c.alias == alias)
            return [AliasMove(model, r.alias, r.from_version, r.to_version, r.actor, r.reason, rows.time(r.time_us))
                    for r in conn.execute(query)]

    # Records.
    def put_record(self, kind: str, name: str, data: bytes, expected_revision: int, actor: str) -> Record:
        with self._write() as tx:
            key = (t.records.c.kind == kind, t.records.c.name == name)
            current = tx.conn.execute(sa.select(t.records.c.revision).where(*key)).scalar()
            if expected_revision != NO_CHECK and expected_revision != (current or 0):
                now = f"is at revision {current}" if current else "does not exist"
                raise Aborted(f"record {kind}/{name} {now}, not the expected revision {expected_revision}; "
                              "read it again and retry")
            revision = tx.emit(ChangeType.RECORD_PUT, record=(kind, name, data))
            if current:
                tx.conn.execute(sa.update(t.records).where(*key).values(data=data, revision=revision,
                                                                        update_us=tx.now))
            else:
                tx.conn.execute(t.records.insert().values(kind=kind, name=name, data=data, revision=revision,
                                                          update_us=tx.now))
            tx.audit(actor, "record.put", kind=kind, name=name, revision=revision, size=len(data))
        return Record(kind, name, data, revision, rows.time(tx.now))

    def get_record(self, kind: str, name: str) -> Record:
        with self._read() as conn:
            row = conn.execute(sa.select(t.records).where(t.records.c.kind == kind, t.records.c.name == name)).first()
        if row is None:
            raise NotFound(f"record {kind}/{name} not found")
        return rows.record(row)

    def list_records(self, kind: str, page_size: int, page_token: str) -> Page:
        after = decode_token(page_token, "records:" + kind)
        query = (sa.select(t.records).where(t.records.c.kind == kind).order_by(t.records.c.name)
                 .limit(page_size + 1))
        if after is not None:
            query = query.where(t.records.c.name > str(after))
        with self._read() as conn:
            found = [rows.record(r) for r in conn.execute(query)]
        items = found[:page_size]
        return Page(items, encode_token("records:" + kind, items[-1].name) if len(found) > page_size else "")

    def delete_record(self, kind: str, name: str, actor: str) -> None:
        with self._write() as tx:
            key = (t.records.c.kind == kind, t.records.c.name == name)
            if tx.conn.execute(sa.delete(t.records).where(*key)).rowcount == 0:
                raise NotFound(f"record {kind}/{name} not found")
            tx.audit(actor, "record.delete", kind=kind, name=name)
            tx.emit(ChangeType.RECORD_DELETED, record=(kind, name, None))

    # Audit.
    def list_audit(self, model: str, since: datetime | None, until: datetime | None, page_size: int,
                   page_token: str) -> Page:
        before = decode_token(page_token, "audit")
        query = sa.select(t.audit).order_by(t.audit.c.id.desc()).limit(page_size + 1)
        if model:
            query = query.where(t.audit.c.model == model)
        if since is not None:
            query = query.where(t.audit.c.time_us >= rows.micros(since))
        if until is not None:
            query = query.where(t.audit.c.time_us <= rows.micros(until))
        if before is not None:
            query = query.where(t.audit.c.id < int(before))
        with self._read() as conn:
            found = [rows.audit(r) for r in conn.execute(query)]
        items = found[:page_size]
        return Page(items, encode_token("audit", items[-1].id) if len(found) > page_size else "")

    def append_audit(self, actor: str, action: str, model: str, version: int,
                     details: dict[str, Any]) -> AuditEvent:
        if not action:
            raise InvalidArgument("action is required, e.g. 'canary.rollback'")
        with self._write() as tx:
            event_id = tx.audit(actor, action, model, version, extra=details)
        return AuditEvent(event_id, rows.time(tx.now), actor, action, model, version, details)

    # Change feed.
    def head_revision(self) -> int:
        with self._read() as conn:
            return int(conn.execute(sa.select(t.feed_head.c.revision)).scalar_one())

    def oldest_revision(self) -> int:
        with self._read() as conn:
            oldest = conn.execute(sa.select(sa.func.min(t.feed.c.revision))).scalar()
            if oldest is None:
                return int(conn.execute(sa.select(t.feed_head.c.revision)).scalar_one()) + 1
            return int(oldest)

    def events_after(self, revision: int, limit: int) -> list[ChangeEvent]:
        with self._read() as conn:
            found = conn.execute(sa.select(t.feed).where(t.feed.c.revision > revision)
                                 .order_by(t.feed.c.revision).limit(limit))
            return [rows.change(r) for r in found]

    def snapshot(self) -> tuple[int, list[ChangeEvent]]:
        with self._read(consistent=True) as conn:
            head = int(conn.execute(sa.select(t.feed_head.c.revision)).scalar_one())
            return head, rows.snapshot(conn, head)
