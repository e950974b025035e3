"""`aiaas.RegistryClient`: a synchronous Python SDK for the model registry.

    from aiaas import RegistryClient

    with RegistryClient("localhost:50051", actor="alice") as registry:
        v = registry.register("resnet", "model.pt", format="torchscript",
                              signature={"inputs": ["x:FP32:-1,3,224,224"], "outputs": ["y:FP32:-1,1000"]},
                              serving_config={"max_batch_size": 8})
        registry.set_alias("resnet", "production", v.version)

Arguments are plain Python (dicts, lists, strings); results are the registry's protobuf messages
(`aiaas.registry.v1.registry_pb2`), read like objects. Failures raise `RegistryError`, a
`grpc.RpcError` with `.code()` and `.details()`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from aiaas import _registry_convert as conv
from aiaas import manifest
from aiaas._files_download import FilesDownload
from aiaas.errors import AiaasError
from aiaas.formats import ArtifactFormat
from aiaas.identity import ClientIdentity
from aiaas.registry.v1 import registry_pb2 as pb
from aiaas.registry.v1 import registry_pb2_grpc

DEFAULT_TARGET = "localhost:50051"
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Progress = Callable[[int, int], None]
T = TypeVar("T")


class RegistryError(grpc.RpcError):
    """A registry call failed: `.code()` is the gRPC status code, `.details()` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


def _wrap(exc: grpc.RpcError) -> RegistryError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return RegistryError(code or grpc.StatusCode.UNKNOWN, details or "")


def _timestamp(when: datetime | None) -> timestamp_pb2.Timestamp | None:
    if when is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts


class RegistryClient:
    def __init__(self, target: str = DEFAULT_TARGET, *, actor: str = "", timeout: float = 30.0,
                 credentials: grpc.ChannelCredentials | None = None, channel: grpc.Channel | None = None,
                 identity: ClientIdentity | None = None) -> None:
        self.target = target
        self.actor = actor or os.environ.get("AIAAS_ACTOR") or os.environ.get("USER", "")
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if channel is not None:
            self._channel = channel
        elif credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            # The caller's identity from the environment (mTLS certificate or development token).
            self._channel = (identity or ClientIdentity.from_env()).channel(target, options)
        self.stub = registry_pb2_grpc.ModelRegistryStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def _pages(self, method: Callable[..., Any], request: Any, field: str) -> Iterator[Any]:
        while True:
            reply = self._call(method, request)
            yield from getattr(reply, field)
            if not reply.next_page_token:
                return
            request.page_token = reply.next_page_token

    # Models.
    def create_model(self, name: str, description: str = "", labels: Mapping[str, str] | None = None) -> pb.Model:
        request = pb.CreateModelRequest(name=name, description=description, labels=dict(labels or {}),
                                        actor=self.actor)
        return self._call(self.stub.CreateModel, request).model

    def get_model(self, name: str) -> pb.Model:
        return self._call(self.stub.GetModel, pb.GetModelRequest(name=name)).model

    def list_models(self, page_size: int = 100) -> Iterator[pb.Model]:
        return self._pages(self.stub.ListModels, pb.ListModelsRequest(page_size=page_size), "models")

    def update_model(self, name: str, *, description: str | None = None,
                     labels: Mapping[str, str] | None = None) -> pb.Model:
        request = pb.UpdateModelRequest(name=name, description=description or "",
                                        update_description=description is not None, labels=dict(labels or {}),
                                        update_labels=labels is not None, actor=self.actor)
        return self._call(self.stub.UpdateModel, request).model

    def delete_model(self, name: str) -> None:
        self._call(self.stub.DeleteModel, pb.DeleteModelRequest(name=name, actor=self.actor))

    # Versions.
    def upload_version(self, model: str, artifact: str | os.PathLike[str] | bytes, *, format: str,
                       signature: conv.SignatureLike | None = None, serving_config: Mapping[str, Any] | None = None,
                       metadata: Mapping[str, Any] | None = None, lineage: Mapping[str, Any] | None = None,
                       reports: Mapping[str, Mapping[str, Any]] | None = None, create_model: bool = True,
                       progress: Progress | None = None, chunk_size: int = CHUNK_BYTES,
                       timeout: float | None = None) -> pb.ModelVersion:
        """Upload an artifact (a path or bytes) as the model's next version and return it.

        A directory (a checkpoint of format hf_causal_lm) is uploaded as its files, each hashed first;
        hidden names ('.cache', '.gitattributes') are left out.
        """
        header = pb.UploadVersionHeader(
            model=model, format=conv.artifact_format(format), signature=conv.signature(signature),
            serving_config=conv.serving_config(serving_config), metadata=conv.struct(metadata),
            lineage=conv.lineage(lineage), actor=self.actor, create_model=create_model,
            reports={k: conv.struct(v) for k, v in (reports or {}).items()},
        )
        is_directory = not isinstance(artifact, bytes) and Path(artifact).is_dir()
        if ArtifactFormat.from_pb(header.format).multi_file and not is_directory:
            shown = "these bytes" if isinstance(artifact, bytes) else str(artifact)
            raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a {format} artifact is a checkpoint directory, and {shown} is not one")
        sources: list[bytes | Path]
        if isinstance(artifact, bytes):
            header.artifact_sha256 = hashlib.sha256(artifact).hexdigest()
            header.artifact_size = total = len(artifact)
            sources = [artifact]
        elif is_directory:
            try:
                files, located = manifest.scan(artifact)
            except AiaasError as exc:
                raise RegistryError(grpc.StatusCode[exc.code.status_name], exc.message) from None
            header.files.extend(pb.ArtifactFile(path=f.path, sha256=f.sha256, size=f.size) for f in files)
            header.artifact_sha256, header.artifact_size = manifest.digest(files)
            total = manifest.total_size(files)
            sources = [located[f.path] for f in files]
        else:
            header.artifact_sha256, header.artifact_size = manifest.hash_file(artifact)
            total = header.artifact_size
            sources = [Path(artifact)]

        def requests() -> Iterator[pb.UploadVersionRequest]:
            yield pb.UploadVersionRequest(header=header)
            sent = 0
            for source in sources:
                for chunk in self._chunks(source, chunk_size):
                    yield pb.UploadVersionRequest(chunk=chunk)
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent, total)

        reply = self._call(self.stub.UploadVersion, requests(), timeout=timeout or max(self.timeout, 3600.0))
        return reply.version

    register = upload_version

    @staticmethod
    def _chunks(artifact: Path | bytes, chunk_size: int) -> Iterator[bytes]:
        if isinstance(artifact, bytes):
            for start in range(0, len(artifact), chunk_size):
                yield artifact[start:start + chunk_size]
            return
        with Path(artifact).open("rb") as handle:
            while block := handle.read(chunk_size):
                yield block

    def get_version(self, model: str, version: int | str | None = None, *, alias: str = "") -> pb.ModelVersion:
        """A version by number, or by alias (`get_version("m", "production")` or `alias="production"`)."""
        if isinstance(version, str):
            version, alias = (int(version), "") if version.isdigit() else (0, version)
        request = pb.GetVersionRequest(model=model, version=version or 0, alias=alias)
        return self._call(self.stub.GetVersion, request).version

    def list_versions(self, model: str, page_size: int = 100) -> Iterator[pb.ModelVersion]:
        return self._pages(self.stub.ListVersions, pb.ListVersionsRequest(model=model, page_size=page_size),
                           "versions")

    def delete_version(self, model: str, version: int) -> None:
        self._call(self.stub.DeleteVersion, pb.DeleteVersionRequest(model=model, version=version, actor=self.actor))

    def attach_report(self, model: str, version: int, name: str, report: Mapping[str, Any]) -> pb.ModelVersion:
        request = pb.AttachReportRequest(model=model, version=version, name=name, report=conv.struct(report),
                                         actor=self.actor)
        return self._call(self.stub.AttachReport, request).version

    def download_artifact(self, model: str, version: int | str | None = None, dest: str | os.PathLike[str] | None = None,
                          *, progress: Progress | None = None, timeout: float | None = None) -> pb.ModelVersion:
        """Download into `dest` (a file path), verified against the recorded sha256; returns the version.

        Without `dest` the artifact lands in the current directory, named after its model and version.
        """
        alias = ""
        if isinstance(version, str):
            version, alias = (int(version), "") if version.isdigit() else (0, version)
        request = pb.DownloadArtifactRequest(model=model, version=version or 0, alias=alias)
        stream = self.stub.DownloadArtifact(request, timeout=timeout or max(self.timeout, 3600.0))
        found: pb.ModelVersion | None = None
        digest = hashlib.sha256()
        received = 0
        tmp_path: Path | None = None
        try:
            for message in stream:
                if message.HasField("version"):
                    found = message.version
                    target = Path(dest) if dest else Path(f"{found.model}-v{found.version}.bin")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    fd, name = tempfile.mkstemp(prefix=".download-", dir=target.parent)
                    tmp_path = Path(name)
                    handle = os.fdopen(fd, "wb")
                    continue
                if found is None:
                    raise RegistryError(grpc.StatusCode.INTERNAL, "the download sent data before the version")
                handle.write(message.chunk)
                digest.update(message.chunk)
                received += len(message.chunk)
                if progress is not None:
                    progress(received, found.artifact_size)
            if found is None or tmp_path is None:
                raise RegistryError(grpc.StatusCode.INTERNAL, "the download ended without a version")
            handle.close()
            if digest.hexdigest() != found.artifact_sha256 or received != found.artifact_size:
                raise RegistryError(grpc.StatusCode.DATA_LOSS,
                                    f"downloaded artifact does not match sha256 {found.artifact_sha256}")
            os.replace(tmp_path, target)
            tmp_path = None
            return found
        except grpc.RpcError as exc:
            raise exc if isinstance(exc, RegistryError) else _wrap(exc) from None
        finally:
            if tmp_path is not None:
                if not handle.closed:
                    handle.close()
                tmp_path.unlink(missing_ok=True)

    def download_files(self, model: str, version: int | str | None = None,
                       dest: str | os.PathLike[str] | None = None, *, progress: Progress | None = None,
                       chunk_size: int = 0, timeout: float | None = None) -> pb.ModelVersion:
        """Download a multi-file version (a checkpoint) into the directory `dest`; returns the version.

        Each file is verified against its sha256 and renamed into place once complete. An interrupted
        download resumes where it stopped when called again with the same `dest`: complete files are
        re-verified and kept, a partial one (kept as a hidden `.NAME.part` beside it) continues from its
        size. Without `dest` the files land in `<model>-v<version>` in the current directory.
        """
        found = self.get_version(model, version)
        if not found.files:
            raise RegistryError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"version {found.version} of model {model!r} is a single file; use download_artifact")
        try:
            download = FilesDownload(found, Path(dest) if dest else Path(f"{found.model}-v{found.version}"), progress)
            start = download.resume_point()
            if start is None:
                return found
            request = pb.DownloadFilesRequest(model=found.model, version=found.version, path=start[0],
                                              offset=start[1], chunk_size=chunk_size)
            try:
                for message in self.stub.DownloadFiles(request, timeout=timeout or max(self.timeout, 3600.0)):
                    download.receive(message)
                download.finish()
            finally:
                download.close()
        except grpc.RpcError as exc:
            raise exc if isinstance(exc, RegistryError) else _wrap(exc) from None
        except AiaasError as exc:
            raise RegistryError(grpc.StatusCode[exc.code.status_name], exc.message) from None
        return found

    # Aliases.
    def set_alias(self, model: str, alias: str, version: int, *, expected_version: int | None = None,
                  reason: str = "", force: bool = False) -> pb.AliasMove:
        """Point `alias` at `version`. With `expected_version` (0 = must be new) it is a compare-and-set.

        `force` moves a gated alias (production) past the model's evaluation gate; it needs a `reason`."""
        request = pb.SetAliasRequest(model=model, alias=alias, version=version,
                                     expected_version=-1 if expected_version is None else expected_version,
                                     actor=self.actor, reason=reason, force=force)
        return self._call(self.stub.SetAlias, request).move

    def delete_alias(self, model: str, alias: str, reason: str = "") -> pb.AliasMove:
        request = pb.DeleteAliasRequest(model=model, alias=alias, actor=self.actor, reason=reason)
        return self._call(self.stub.DeleteAlias, request).move

    def rollback_alias(self, model: str, alias: str, reason: str = "") -> pb.AliasMove:
        request = pb.RollbackAliasRequest(model=model, alias=alias, actor=self.actor, reason=reason)
        return self._call(self.stub.RollbackAlias, request).move

    def alias_history(self, model: str, alias: str = "", limit: int = 100) -> list[pb.AliasMove]:
        request = pb.GetAliasHistoryRequest(model=model, alias=alias, limit=limit)
        return list(self._call(self.stub.GetAliasHistory, request).moves)

    # Audit.
    def audit_events(self, model: str = "", since: datetime | None = None, until: datetime | None = None,
                     page_size: int = 100) -> Iterator[pb.AuditEvent]:
        """The audit log, newest first."""
        request = pb.ListAuditEventsRequest(model=model, page_size=page_size, since=_timestamp(since),
                                            until=_timestamp(until))
        return self._pages(self.stub.ListAuditEvents, request, "events")

    def append_audit_event(self, action: str, model: str = "", version: int = 0,
                           details: Mapping[str, Any] | None = None) -> pb.AuditEvent:
        request = pb.AppendAuditEventRequest(actor=self.actor, action=action, model=model, version=version,
                                             details=conv.struct(details))
        return self._call(self.stub.AppendAuditEvent, request).event

    # Control-plane records.
    def put_record(self, kind: str, name: str, data: bytes | str, *,
                   expected_revision: int | None = None) -> pb.Record:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        request = pb.PutRecordRequest(record=pb.Record(kind=kind, name=name, data=raw),
                                      expected_revision=-1 if expected_revision is None else expected_revision,
                                      actor=self.actor)
        return self._call(self.stub.PutRecord, request).record

    def get_record(self, kind: str, name: str) -> pb.Record:
        return self._call(self.stub.GetRecord, pb.GetRecordRequest(kind=kind, name=name)).record

    def list_records(self, kind: str, page_size: int = 100) -> Iterator[pb.Record]:
        return self._pages(self.stub.ListRecords, pb.ListRecordsRequest(kind=kind, page_size=page_size), "records")

    def delete_record(self, kind: str, name: str) -> None:
        self._call(self.stub.DeleteRecord, pb.DeleteRecordRequest(kind=kind, name=name, actor=self.actor))

    # Change feed.
    def watch(self, after_revision: int = 0, models: Sequence[str] = (),
              timeout: float | None = None) -> Iterator[pb.ChangeEvent]:
        """Change events after `after_revision` (0: a snapshot first). Closing the iterator ends the call.

        A FAILED_PRECONDITION "resync required" error means the revision is too old: watch from 0.
        """
        call = self.stub.WatchModels(pb.WatchModelsRequest(after_revision=after_revision, models=list(models)),
                                     timeout=timeout)
        try:
            for reply in call:
                yield reply.event
        except grpc.RpcError as exc:
            raise _wrap(exc) from None
        finally:
            call.cancel()
