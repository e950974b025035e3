"""QualityCore: the registry's data sets, evaluation results and promotion gate. Plain Python; no gRPC.

A data set upload is an artifact upload with another check at the end: the complete file is
inspected (aiaas.eval.schema) and fitted to the named model version's signature, so a data set
whose columns do not fit is refused with a message naming the column, and nothing is stored.

The promotion gate: a model's `evaluation_gate` record lists the evaluations (name, data set,
spec) a version must have passed before a gated alias (setting `gated_aliases`, default
production) points at it. The check runs inside the alias move's transaction. A forced move
needs a reason; its audit event records what the gate would have refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiaas import records
from aiaas.eval import schema as dataset_schema
from aiaas.eval.formats import DatasetFormat
from aiaas.registry.v1 import evaluation_pb2 as epb
from services.common.errors import AiaasError, FailedPrecondition, InvalidArgument, NotFound
from services.registry import validation as check
from services.registry.artifacts import PendingArtifact
from services.registry.entities import (
    Dataset,
    DatasetColumn,
    DatasetSpec,
    ModelVersion,
    Page,
    StoredEvaluation,
)
from services.registry.store import AliasGuard

if TYPE_CHECKING:
    from services.registry.core import RegistryCore

MAX_LABEL_COLUMNS = 64
MAX_COLUMN_NAME = 200
# An EvaluationResult as stored; a larger one has too many slices (the spec's max_slices bounds them).
MAX_RESULT_BYTES = 2 * 1024 * 1024
DEFAULT_GATED_ALIASES = frozenset({"production"})


def check_dataset_spec(spec: DatasetSpec, max_bytes: int) -> DatasetSpec:
    check.name(spec.name, "data set name")
    DatasetFormat.parse(spec.format)
    if not check.SHA256_RE.fullmatch(spec.sha256 or ""):
        raise InvalidArgument("sha256 must be 64 lowercase hex characters")
    if not 0 < spec.size <= max_bytes:
        raise InvalidArgument(f"size must be between 1 and {max_bytes} bytes (setting max_dataset_bytes), "
                              f"got {spec.size}")
    if not 0 < len(spec.label_columns) <= MAX_LABEL_COLUMNS:
        raise InvalidArgument(f"name 1 to {MAX_LABEL_COLUMNS} label columns, got {len(spec.label_columns)}")
    for column in spec.label_columns:
        if not column or len(column) > MAX_COLUMN_NAME:
            raise InvalidArgument(f"label column name {column[:40]!r} must be 1 to {MAX_COLUMN_NAME} characters")
    check.name(spec.model)
    if spec.model_version < 0:
        raise InvalidArgument(f"model_version must be >= 0, got {spec.model_version}")
    if spec.model_alias:
        check.name(spec.model_alias, "alias")
    check.description(spec.description)
    return spec


class DatasetUpload:
    """One data set upload: `write` chunks, then `finish`; `abort` (always safe) drops what was written."""

    def __init__(self, quality: QualityCore, spec: DatasetSpec, version: ModelVersion) -> None:
        self.quality = quality
        self.spec = spec
        self.version = version
        self._lock = threading.Lock()
        self._columns: tuple[tuple[DatasetColumn, ...], int] | None = None
        self._pending: PendingArtifact | None = quality.core.artifacts.begin(spec.sha256, spec.size)

    def write(self, chunk: bytes) -> None:
        from services.registry.core import MAX_CHUNK_BYTES

        if len(chunk) > MAX_CHUNK_BYTES:
            raise InvalidArgument(f"an upload chunk is {len(chunk)} bytes; send at most {MAX_CHUNK_BYTES} per message")
        with self._lock:
            if self._pending is None:
                raise FailedPrecondition("this upload is already finished")
            self._pending.write(chunk)

    def finish(self) -> tuple[Dataset, bool]:
        pending = self._pending
        if pending is None:
            raise FailedPrecondition("this upload is already finished")
        try:
            pending.verify(self._check_content)
            pending.seal()
            if self._columns is None:
                raise FailedPrecondition("the data set was not inspected")
            columns, rows = self._columns
            found = self.quality.core.store.create_dataset(self.spec, rows, columns, self.version.version,
                                                           place_blob=pending.place)
        except BaseException:
            self.abort()
            if pending.placed:
                self.quality.core.collect_blob_or_log(self.spec.sha256, "the same bytes are uploaded again")
            raise
        self.abort()
        return found

    def _check_content(self, path: Path) -> None:
        """The data set's columns fit the version's signature, or nothing is stored."""
        fmt = DatasetFormat.parse(self.spec.format)
        where = f"model {self.version.model!r} version {self.version.version}"
        try:
            found = dataset_schema.inspect(path, fmt)
            fitted = dataset_schema.fit(found, self.version.signature.inputs, self.spec.label_columns, where)
        except InvalidArgument as exc:
            raise InvalidArgument(f"data set refused: {exc.message}; nothing was stored") from None
        labels = {c.name for c in fitted.labels}
        inputs = {c.name for c in fitted.inputs.values()}
        columns = tuple(DatasetColumn(c.name, c.datatype, c.shape,
                                      "input" if c.name in inputs else "label" if c.name in labels else "feature",
                                      c.split) for c in found.columns)
        self._columns = (columns, found.num_rows)

    def abort(self) -> None:
        with self._lock:
            if self._pending is not None:
                self._pending.discard()
                self._pending = None


class QualityCore:
    def __init__(self, core: RegistryCore, *, max_dataset_bytes: int,
                 gated_aliases: frozenset[str] = DEFAULT_GATED_ALIASES) -> None:
        self.core = core
        self.store = core.store
        self.max_dataset_bytes = max_dataset_bytes
        self.gated_aliases = frozenset(gated_aliases)

    # Data sets.
    def begin_dataset_upload(self, spec: DatasetSpec) -> DatasetUpload:
        """Check the header and find the model version before a byte is received (the caller holds an
        upload slot for the whole upload)."""
        spec = dataclasses.replace(check_dataset_spec(spec, self.max_dataset_bytes), actor=check.actor(spec.actor),
                                   format=DatasetFormat.parse(spec.format).value)
        self.store.check_new_dataset(spec)
        return DatasetUpload(self, spec, self._version_to_fit(spec))

    def _version_to_fit(self, spec: DatasetSpec) -> ModelVersion:
        if spec.model_version or spec.model_alias:
            return self.core.get_version(spec.model, spec.model_version, spec.model_alias)
        latest = self.store.get_model(spec.model).latest_version
        if not latest:
            raise FailedPrecondition(f"model {spec.model!r} has no versions: register one first, the data set is "
                                     "checked against its signature")
        return self.store.get_version(spec.model, latest)

    def get_dataset(self, name: str) -> Dataset:
        return self.store.get_dataset(check.name(name, "data set name"))

    def list_datasets(self, page_size: int = 0, page_token: str = "") -> Page:
        return self.store.list_datasets(check.page_size(page_size), page_token)

    def read_dataset(self, name: str, chunk_size: int = 0) -> tuple[Dataset, Iterator[bytes]]:
        from services.registry.core import DEFAULT_DOWNLOAD_CHUNK, MAX_CHUNK_BYTES

        if chunk_size < 0 or chunk_size > MAX_CHUNK_BYTES:
            raise InvalidArgument(f"chunk_size must be 0..{MAX_CHUNK_BYTES} (0 means {DEFAULT_DOWNLOAD_CHUNK})")
        found = self.get_dataset(name)
        return found, self.core.artifacts.read(found.sha256, found.size, chunk_size or DEFAULT_DOWNLOAD_CHUNK)

    def delete_dataset(self, name: str, actor: str = "") -> None:
        check.name(name, "data set name")
        users = sorted(model for model, gate in self._gates() if any(r.dataset == name for r in gate.required))
        if users:
            raise FailedPrecondition(f"data set {name!r} is required by the evaluation gate of {', '.join(users)}; "
                                     "change those gates first")
        sha = self.store.delete_dataset(name, check.actor(actor))
        self.core.collect_blob_or_log(sha, "the next sweep")

    def _gates(self) -> Iterator[tuple[str, epb.EvaluationGate]]:
        token = ""
        while True:
            page = self.store.list_records(records.EVALUATION_GATE.kind, 1000, token)
            for record in page.items:
                yield record.name, records.EVALUATION_GATE.decode(record.data, record.name)
            if not page.next_token:
                return
            token = page.next_token

    # Evaluation results.
    def put_evaluation(self, result: epb.EvaluationResult, actor: str = "") -> epb.EvaluationResult:
        check.name(result.model)
        check.version_number(result.version)
        check.name(result.name, "evaluation name")
        version = self.store.get_version(result.model, result.version)
        if hashlib.sha256(result.spec_yaml.encode()).hexdigest() != result.spec_sha256:
            raise InvalidArgument("spec_sha256 is not the sha256 of spec_yaml")
        if result.dataset:
            dataset = self.get_dataset(result.dataset)
            if dataset.sha256 != result.dataset_sha256:
                raise InvalidArgument(f"the result is of other content (sha256 {result.dataset_sha256[:12]}...) than "
                                      f"data set {result.dataset!r} holds ({dataset.sha256[:12]}...)")
        failed = [t for t in result.thresholds if t.outcome == epb.THRESHOLD_OUTCOME_FAILED]
        if result.passed == bool(failed):
            raise InvalidArgument(f"passed is {result.passed} but {len(failed)} threshold(s) failed")
        stored = epb.EvaluationResult()
        stored.CopyFrom(result)
        stored.artifact_sha256 = version.artifact_sha256
        stored.actor = check.actor(actor)
        stored.time.FromDatetime(datetime.now(UTC))
        data = stored.SerializeToString()
        if len(data) > MAX_RESULT_BYTES:
            raise InvalidArgument(f"the evaluation result is {len(data)} bytes; the limit is {MAX_RESULT_BYTES}: "
                                  "use fewer slices (max_slices in the spec)")
        details: dict[str, Any] = {"dataset": result.dataset, "dataset_sha256": result.dataset_sha256,
                                   "spec_sha256": result.spec_sha256, "baseline_version": result.baseline_version,
                                   "path": result.path, "failed": [t.message for t in failed[:5]]}
        self.store.put_evaluation(result.model, result.version, result.name, result.passed, data, stored.actor,
                                  details)
        return stored

    def get_evaluation(self, model: str, version: int, name: str) -> epb.EvaluationResult:
        found = self.store.get_evaluation(check.name(model), check.version_number(version),
                                          check.name(name, "evaluation name"))
        return decode_result(found)

    def list_evaluations(self, model: str, version: int = 0, page_size: int = 0, page_token: str = "") -> Page:
        if version < 0:
            raise InvalidArgument(f"version must be >= 0, got {version}")
        page = self.store.list_evaluations(check.name(model), version, check.page_size(page_size), page_token)
        return Page([decode_result(e) for e in page.items], page.next_token)

    # The promotion gate.
    def alias_guard(self, model: str, alias: str, version: int, *, force: bool) -> AliasGuard | None:
        """What `set_alias` runs inside its transaction when `alias` is gated."""
        if alias not in self.gated_aliases:
            return None

        def guard() -> dict[str, Any]:
            problems = self.promotion_problems(model, version)
            if not problems:
                return {}
            if not force:
                raise FailedPrecondition(f"alias {alias!r} of model {model!r} cannot point at version {version}: "
                                         + "; ".join(problems) + " (to move it anyway, force with a reason)")
            return {"forced": True, "bypassed": problems}

        return guard

    def promotion_problems(self, model: str, version: int) -> list[str]:
        """Why the model's evaluation gate refuses the version; empty when it passes (or there is no gate)."""
        try:
            record = self.store.get_record(records.EVALUATION_GATE.kind, model)
        except NotFound:
            return []
        try:
            gate = records.EVALUATION_GATE.decode(record.data, model)
        except AiaasError as exc:
            return [exc.message]
        current = self.store.get_version(model, version)
        return [p for required in gate.required if (p := self._requirement_problem(current, required))]

    def _requirement_problem(self, version: ModelVersion, required: epb.RequiredEvaluation) -> str:
        name = required.name
        try:
            result = decode_result(self.store.get_evaluation(version.model, version.version, name))
        except NotFound:
            return (f"it has no evaluation {name!r}, which the model's evaluation gate requires (aiaas evaluate "
                    f"{version.model} {version.version} --dataset {required.dataset} --spec <its spec>)")
        if result.spec_sha256 != required.spec_sha256:
            return f"its evaluation {name!r} ran with another spec than the gate requires; evaluate it again"
        try:
            dataset = self.store.get_dataset(required.dataset)
        except NotFound:
            return f"the data set {required.dataset!r} of the gate's evaluation {name!r} no longer exists"
        if result.dataset_sha256 != dataset.sha256:
            return f"its evaluation {name!r} ran on other data than data set {required.dataset!r}; evaluate it again"
        if result.artifact_sha256 != version.artifact_sha256:
            return f"its evaluation {name!r} is of other content than the version holds; evaluate it again"
        failed = [t.message for t in result.thresholds if t.outcome == epb.THRESHOLD_OUTCOME_FAILED]
        if not result.passed:
            more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
            return f"its evaluation {name!r} failed: " + "; ".join(failed[:3]) + more
        return ""


def decode_result(stored: StoredEvaluation) -> epb.EvaluationResult:
    return epb.EvaluationResult.FromString(stored.data)
