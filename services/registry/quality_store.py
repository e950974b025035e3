"""The registry store's data sets and evaluation results: the `QualityStore` interface, and its SQL side
as a mixin of `SqlRegistryStore` (same transactions, same serialized writers, same blob references).

A data set's file is a blob like an artifact: its row references it in `blobs`, placed inside the
transaction that records the data set and collected once nothing references it. Evaluation
results are rows of their version, deleted with it.
"""

from __future__ import annotations

import abc
import contextlib
import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from services.common.errors import AlreadyExists, NotFound
from services.registry import rows
from services.registry import schema as t
from services.registry.entities import Dataset, DatasetColumn, DatasetSpec, Page, StoredEvaluation
from services.registry.validation import decode_token, encode_token

if TYPE_CHECKING:
    from services.registry.sql_store import _Tx
    from services.registry.store import PlaceBlob


class QualityStore(abc.ABC):
    """Data sets and evaluation results. Raises services.common.errors."""

    @abc.abstractmethod
    def check_new_dataset(self, spec: DatasetSpec) -> None:
        """Raise now what `create_dataset` would refuse (a name taken by other content), before any upload."""

    @abc.abstractmethod
    def create_dataset(self, spec: DatasetSpec, num_rows: int, columns: tuple[DatasetColumn, ...],
                       model_version: int, place_blob: PlaceBlob) -> tuple[Dataset, bool]:
        """Record the data set and a reference to its blob, placing it before the commit; (data set,
        deduplicated): a data set of that name with the same content is returned as it is."""

    @abc.abstractmethod
    def get_dataset(self, name: str) -> Dataset: ...

    @abc.abstractmethod
    def list_datasets(self, page_size: int, page_token: str) -> Page: ...

    @abc.abstractmethod
    def delete_dataset(self, name: str, actor: str) -> str:
        """Delete the data set, dropping its blob reference; returns its sha256."""

    @abc.abstractmethod
    def put_evaluation(self, model: str, version: int, name: str, passed: bool, data: bytes, actor: str,
                       details: dict[str, Any]) -> StoredEvaluation:
        """Store (or replace) the version's result under `name`, with an `evaluation.put` audit event."""

    @abc.abstractmethod
    def get_evaluation(self, model: str, version: int, name: str) -> StoredEvaluation: ...

    @abc.abstractmethod
    def list_evaluations(self, model: str, version: int, page_size: int, page_token: str) -> Page:
        """A model's results (of one version when `version` > 0), by version then name."""


class SqlQualityStore(QualityStore):
    """`QualityStore` on the tables of `SqlRegistryStore`, which provides the transaction helpers."""

    if TYPE_CHECKING:
        def _write(self) -> contextlib.AbstractContextManager[_Tx]: ...

        def _read(self, consistent: bool = False) -> contextlib.AbstractContextManager[sa.Connection]: ...

        def _model_row(self, conn: sa.Connection, name: str) -> sa.Row[Any]: ...

        def _version_row(self, conn: sa.Connection, model: sa.Row[Any], version: int) -> sa.Row[Any]: ...

        def _add_blob_ref(self, tx: _Tx, sha256: str, size: int) -> None: ...

        def _drop_blob_ref(self, tx: _Tx, sha256: str) -> None: ...

    # Data sets.
    def check_new_dataset(self, spec: DatasetSpec) -> None:
        with self._read() as conn:
            self._model_row(conn, spec.model)
            self._taken(conn, spec)

    @staticmethod
    def _taken(conn: sa.Connection, spec: DatasetSpec) -> sa.Row[Any] | None:
        row = conn.execute(sa.select(t.datasets).where(t.datasets.c.name == spec.name)).first()
        if row is not None and row.sha256 != spec.sha256:
            raise AlreadyExists(f"data set {spec.name!r} already exists with other content (sha256 "
                                f"{row.sha256[:12]}...); data sets are immutable: register it under a new name")
        return row

    def create_dataset(self, spec: DatasetSpec, num_rows: int, columns: tuple[DatasetColumn, ...],
                       model_version: int, place_blob: PlaceBlob) -> tuple[Dataset, bool]:
        with self._write() as tx:
            self._model_row(tx.conn, spec.model)
            if self._taken(tx.conn, spec) is not None:
                deduplicated = True
            else:
                deduplicated = False
                tx.conn.execute(t.datasets.insert().values(
                    name=spec.name, format=spec.format, sha256=spec.sha256, size=spec.size, num_rows=num_rows,
                    columns=json.dumps([_column_json(c) for c in columns]), model=spec.model,
                    model_version=model_version, description=spec.description, created_by=spec.actor,
                    create_us=tx.now))
                self._add_blob_ref(tx, spec.sha256, spec.size)
                place_blob()
                tx.audit(spec.actor, "dataset.create", spec.model, model_version, dataset=spec.name,
                         sha256=spec.sha256, size=spec.size, rows=num_rows, format=spec.format)
        return self.get_dataset(spec.name), deduplicated

    def get_dataset(self, name: str) -> Dataset:
        with self._read() as conn:
            row = conn.execute(sa.select(t.datasets).where(t.datasets.c.name == name)).first()
        if row is None:
            raise NotFound(f"data set {name!r} not found")
        return _dataset(row)

    def list_datasets(self, page_size: int, page_token: str) -> Page:
        after = decode_token(page_token, "datasets")
        query = sa.select(t.datasets).order_by(t.datasets.c.name).limit(page_size + 1)
        if after is not None:
            query = query.where(t.datasets.c.name > str(after))
        with self._read() as conn:
            found = [_dataset(r) for r in conn.execute(query)]
        items = found[:page_size]
        return Page(items, encode_token("datasets", items[-1].name) if len(found) > page_size else "")

    def delete_dataset(self, name: str, actor: str) -> str:
        with self._write() as tx:
            row = tx.conn.execute(sa.select(t.datasets).where(t.datasets.c.name == name)).first()
            if row is None:
                raise NotFound(f"data set {name!r} not found")
            tx.conn.execute(sa.delete(t.datasets).where(t.datasets.c.id == row.id))
            self._drop_blob_ref(tx, row.sha256)
            tx.audit(actor, "dataset.delete", row.model, 0, dataset=name, sha256=row.sha256)
        return str(row.sha256)

    # Evaluation results.
    def put_evaluation(self, model: str, version: int, name: str, passed: bool, data: bytes, actor: str,
                       details: dict[str, Any]) -> StoredEvaluation:
        with self._write() as tx:
            version_row = self._version_row(tx.conn, self._model_row(tx.conn, model), version)
            key = (t.evaluations.c.version_id == version_row.id, t.evaluations.c.name == name)
            values = {"passed": passed, "data": data, "created_by": actor, "create_us": tx.now}
            if not tx.conn.execute(sa.update(t.evaluations).where(*key).values(**values)).rowcount:
                tx.conn.execute(t.evaluations.insert().values(version_id=version_row.id, name=name, **values))
            tx.audit(actor, "evaluation.put", model, version, extra=details, evaluation=name, passed=passed)
        return StoredEvaluation(model, version, name, passed, data, actor, rows.time(tx.now))

    def get_evaluation(self, model: str, version: int, name: str) -> StoredEvaluation:
        with self._read() as conn:
            version_row = self._version_row(conn, self._model_row(conn, model), version)
            row = conn.execute(sa.select(t.evaluations).where(
                t.evaluations.c.version_id == version_row.id, t.evaluations.c.name == name)).first()
        if row is None:
            raise NotFound(f"version {version} of model {model!r} has no evaluation {name!r}")
        return StoredEvaluation(model, version, row.name, bool(row.passed), bytes(row.data), row.created_by,
                                rows.time(row.create_us))

    def list_evaluations(self, model: str, version: int, page_size: int, page_token: str) -> Page:
        after = decode_token(page_token, "evaluations:" + model)
        with self._read() as conn:
            model_row = self._model_row(conn, model)
            if version:
                self._version_row(conn, model_row, version)
            query = (sa.select(t.versions.c.version, t.evaluations)
                     .join(t.versions, t.versions.c.id == t.evaluations.c.version_id)
                     .where(t.versions.c.model_id == model_row.id)
                     .order_by(t.versions.c.version, t.evaluations.c.name).limit(page_size + 1))
            if version:
                query = query.where(t.versions.c.version == version)
            if after is not None:
                last_version, last_name = after
                query = query.where(sa.or_(t.versions.c.version > int(last_version),
                                           sa.and_(t.versions.c.version == int(last_version),
                                                   t.evaluations.c.name > str(last_name))))
            found = [StoredEvaluation(model, int(r.version), r.name, bool(r.passed), bytes(r.data), r.created_by,
                                      rows.time(r.create_us)) for r in conn.execute(query)]
        items = found[:page_size]
        token = encode_token("evaluations:" + model, [items[-1].version, items[-1].name]) \
            if len(found) > page_size else ""
        return Page(items, token)


def _column_json(column: DatasetColumn) -> dict[str, Any]:
    return {"name": column.name, "datatype": column.datatype, "shape": list(column.shape), "role": column.role,
            "split": column.split}


def _dataset(row: sa.Row[Any]) -> Dataset:
    columns = tuple(DatasetColumn(c["name"], c["datatype"], tuple(c["shape"]), c["role"], bool(c.get("split")))
                    for c in json.loads(row.columns))
    return Dataset(row.name, row.format, row.sha256, int(row.size), int(row.num_rows), columns, row.model,
                   int(row.model_version), row.description, row.created_by, rows.time(row.create_us))

