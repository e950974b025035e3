"""The registry's data set, evaluation and evaluation-gate calls, on an `aiaas.RegistryClient`.

Data sets stream like artifacts: the upload declares size and sha256 first and sends 1 MiB chunks;
the download lands in a temporary file beside its destination and is renamed into place only once
its sha256 matches. Failures raise `RegistryError` (`.code()`, `.details()`), as the SDK does.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from aiaas import records
from aiaas.eval.formats import DatasetFormat
from aiaas.registry.v1 import evaluation_pb2 as epb
from aiaas.registry.v1 import registry_pb2 as pb
from aiaas.registry_client import CHUNK_BYTES, Progress, RegistryClient, RegistryError

T = TypeVar("T")


def _error(exc: grpc.RpcError) -> RegistryError:
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)  # type: ignore[attr-defined]
    return RegistryError(code or grpc.StatusCode.UNKNOWN, details or "")


def _call(method: Callable[..., T], request: Any, timeout: float) -> T:
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise exc if isinstance(exc, RegistryError) else _error(exc) from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def upload_dataset(client: RegistryClient, name: str, path: str | os.PathLike[str], *, labels: Sequence[str],
                   model: str, version: int | str | None = None, fmt: DatasetFormat | str | None = None,
                   description: str = "", progress: Progress | None = None,
                   timeout: float | None = None) -> tuple[epb.Dataset, bool]:
    """Upload a data set file checked against `model`'s version (number or alias; default the latest).

    Returns (data set, deduplicated)."""
    file = Path(path)
    chosen = DatasetFormat.of_path(file) if fmt is None else DatasetFormat.parse(fmt)
    number, alias = (int(version), "") if isinstance(version, int) or (isinstance(version, str) and
                                                                        version.isdigit()) else (0, version or "")
    header = epb.UploadDatasetHeader(
        name=name, format=chosen.pb, sha256=_sha256(file), size=file.stat().st_size, label_columns=list(labels),
        model=model, model_version=number, model_alias=alias, description=description, actor=client.actor)

    def requests() -> Iterator[epb.UploadDatasetRequest]:
        yield epb.UploadDatasetRequest(header=header)
        sent = 0
        with file.open("rb") as handle:
            while block := handle.read(CHUNK_BYTES):
                yield epb.UploadDatasetRequest(chunk=block)
                sent += len(block)
                if progress is not None:
                    progress(sent, header.size)

    reply = _call(client.stub.UploadDataset, requests(), timeout or max(client.timeout, 3600.0))
    return reply.dataset, reply.deduplicated


def get_dataset(client: RegistryClient, name: str) -> epb.Dataset:
    return _call(client.stub.GetDataset, epb.GetDatasetRequest(name=name), client.timeout).dataset


def list_datasets(client: RegistryClient, page_size: int = 100) -> Iterator[epb.Dataset]:
    request = epb.ListDatasetsRequest(page_size=page_size)
    while True:
        reply = _call(client.stub.ListDatasets, request, client.timeout)
        yield from reply.datasets
        if not reply.next_page_token:
            return
        request.page_token = reply.next_page_token


def delete_dataset(client: RegistryClient, name: str) -> None:
    _call(client.stub.DeleteDataset, epb.DeleteDatasetRequest(name=name, actor=client.actor), client.timeout)


def download_dataset(client: RegistryClient, name: str, dest: str | os.PathLike[str], *,
                     progress: Progress | None = None, timeout: float | None = None) -> epb.Dataset:
    """Stream the data set's file into `dest`, verified against its sha256; returns the data set."""
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".download-", dir=target.parent)
    tmp = Path(tmp_name)
    found: epb.Dataset | None = None
    digest = hashlib.sha256()
    received = 0
    stream = client.stub.DownloadDataset(epb.DownloadDatasetRequest(name=name),
                                         timeout=timeout or max(client.timeout, 3600.0))
    try:
        with os.fdopen(fd, "wb") as handle:
            for message in stream:
                if message.HasField("dataset"):
                    found = message.dataset
                    continue
                if found is None:
                    raise RegistryError(grpc.StatusCode.INTERNAL, "the download sent data before the data set")
                handle.write(message.chunk)
                digest.update(message.chunk)
                received += len(message.chunk)
                if progress is not None:
                    progress(received, found.size)
        if found is None:
            raise RegistryError(grpc.StatusCode.INTERNAL, "the download ended without a data set")
        if digest.hexdigest() != found.sha256 or received != found.size:
            raise RegistryError(grpc.StatusCode.DATA_LOSS, f"downloaded data set does not match sha256 {found.sha256}")
        os.replace(tmp, target)
        return found
    except grpc.RpcError as exc:
        raise exc if isinstance(exc, RegistryError) else _error(exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def put_evaluation(client: RegistryClient, result: epb.EvaluationResult) -> epb.EvaluationResult:
    request = epb.PutEvaluationRequest(result=result, actor=client.actor)
    return _call(client.stub.PutEvaluation, request, client.timeout).result


def get_evaluation(client: RegistryClient, model: str, version: int, name: str) -> epb.EvaluationResult:
    request = epb.GetEvaluationRequest(model=model, version=version, name=name)
    return _call(client.stub.GetEvaluation, request, client.timeout).result


def list_evaluations(client: RegistryClient, model: str, version: int = 0) -> Iterator[epb.EvaluationResult]:
    request = epb.ListEvaluationsRequest(model=model, version=version)
    while True:
        reply = _call(client.stub.ListEvaluations, request, client.timeout)
        yield from reply.results
        if not reply.next_page_token:
            return
        request.page_token = reply.next_page_token


def get_gate(client: RegistryClient, model: str) -> epb.EvaluationGate:
    """The model's evaluation gate; empty when it has none."""
    try:
        record = client.get_record(records.EVALUATION_GATE.kind, model)
    except RegistryError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return epb.EvaluationGate()
        raise
    return records.EVALUATION_GATE.decode(record.data, model)


def put_gate(client: RegistryClient, model: str, gate: epb.EvaluationGate) -> pb.Record:
    if not gate.required:
        try:
            client.delete_record(records.EVALUATION_GATE.kind, model)
        except RegistryError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        return pb.Record(kind=records.EVALUATION_GATE.kind, name=model)
    return client.put_record(records.EVALUATION_GATE.kind, model, records.EVALUATION_GATE.encode(gate))
