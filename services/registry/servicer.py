"""gRPC servicer of aiaas.registry.v1.ModelRegistry: convert, call the core in a thread, convert back.

Errors raised by the core travel as `AiaasError`s to the one interceptor, which maps them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from aiaas.registry.v1 import registry_pb2 as pb
from aiaas.registry.v1 import registry_pb2_grpc
from services.common.authz import audit_actor
from services.common.errors import DeadlineExceeded, InvalidArgument
from services.registry import convert
from services.registry.core import MAX_UPLOAD_HEADER_BYTES, RegistryCore
from services.registry.feed import FeedHub

run = asyncio.to_thread


@dataclasses.dataclass(frozen=True)
class UploadLimits:
    idle_timeout_s: float = 60.0
    max_duration_s: float = 3600.0


class UploadStream:
    """The messages of one upload, each awaited no longer than the idle timeout and the overall bound.

    Only artifact bytes count as progress: empty messages do not keep an upload alive."""

    def __init__(self, messages: AsyncIterator[pb.UploadVersionRequest], limits: UploadLimits) -> None:
        self._messages = aiter(messages)
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._ends_at = self._loop.time() + limits.max_duration_s
        self._progress_at = self._loop.time()

    def progressed(self) -> None:
        self._progress_at = self._loop.time()

    async def next(self) -> pb.UploadVersionRequest | None:
        idle_ends_at = self._progress_at + self._limits.idle_timeout_s
        try:
            async with asyncio.timeout_at(min(idle_ends_at, self._ends_at)):
                return await anext(self._messages, None)
        except TimeoutError:
            if idle_ends_at <= self._ends_at:
                raise DeadlineExceeded(
                    f"the upload sent no artifact bytes for {self._limits.idle_timeout_s:g} s (setting "
                    "upload_idle_timeout_s) and was aborted; nothing was stored: send chunks without long "
                    "pauses and retry") from None
            raise DeadlineExceeded(
                f"the upload ran longer than {self._limits.max_duration_s:g} s (setting upload_max_duration_s) "
                "and was aborted; nothing was stored") from None


async def receive_upload(stream: UploadStream, upload: Any) -> Any:
    """The chunks after the header into `upload` (write / finish / abort), then its `finish()`."""
    try:
        stream.progressed()
        while (message := await stream.next()) is not None:
            if message.HasField("header"):
                raise InvalidArgument("the upload stream carries a header twice; send it once, first")
            if message.chunk:
                await run(upload.write, message.chunk)
                stream.progressed()
        return await run(upload.finish)
    finally:
        # A broken, idle or cancelled stream leaves no temporary file behind. In a thread: it waits
        # for a chunk still being written.
        await run(upload.abort)


class RegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    def __init__(self, core: RegistryCore, hub: FeedHub, limits: UploadLimits | None = None, *,
                 feed_kinds: Callable[[], frozenset[str] | None] = lambda: None) -> None:
        self.core = core
        self.hub = hub
        self.limits = limits or UploadLimits()
        # The record kinds whose data the current caller may read from the feed (None: all).
        self.feed_kinds = feed_kinds

    # Models.
    async def CreateModel(self, request: pb.CreateModelRequest, context: Any) -> pb.CreateModelResponse:
        found = await run(self.core.create_model, request.name, request.description, dict(request.labels),
                          audit_actor(request.actor))
        return pb.CreateModelResponse(model=convert.model(found))

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=convert.model(await run(self.core.get_model, request.name)))

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        page = await run(self.core.list_models, request.page_size, request.page_token)
        return pb.ListModelsResponse(models=[convert.model(m) for m in page.items], next_page_token=page.next_token)

    async def UpdateModel(self, request: pb.UpdateModelRequest, context: Any) -> pb.UpdateModelResponse:
        found = await run(
            lambda: self.core.update_model(
                request.name,
                description=request.description if request.update_description else None,
                labels=dict(request.labels) if request.update_labels else None,
                actor=audit_actor(request.actor)))
        return pb.UpdateModelResponse(model=convert.model(found))

    async def DeleteModel(self, request: pb.DeleteModelRequest, context: Any) -> pb.DeleteModelResponse:
        await run(self.core.delete_model, request.name, audit_actor(request.actor))
        return pb.DeleteModelResponse()

    # Versions.
    async def UploadVersion(self, request_iterator: AsyncIterator[pb.UploadVersionRequest],
                            context: Any) -> pb.UploadVersionResponse:
        # The slot is taken before anything is read: a refused upload holds no file and no thread.
        with self.core.upload_slots.hold():
            stream = UploadStream(request_iterator, self.limits)
            first = await stream.next()
            if first is None or not first.HasField("header"):
                raise InvalidArgument("the upload stream must start with a header message, then send chunks")
            if (size := first.header.ByteSize()) > MAX_UPLOAD_HEADER_BYTES:
                raise InvalidArgument(f"the upload header is {size} bytes; the limit is {MAX_UPLOAD_HEADER_BYTES}: "
                                      "attach large reports after the upload with AttachReport")
            spec = dataclasses.replace(convert.version_spec(first.header), actor=audit_actor(first.header.actor))
            upload = await run(self.core.begin_upload, spec)
            found, deduplicated = await receive_upload(stream, upload)
        return pb.UploadVersionResponse(version=convert.version(found), deduplicated=deduplicated)

    async def GetVersion(self, request: pb.GetVersionRequest, context: Any) -> pb.GetVersionResponse:
        found = await run(self.core.get_version, request.model, request.version, request.alias)
        return pb.GetVersionResponse(version=convert.version(found))

    async def ListVersions(self, request: pb.ListVersionsRequest, context: Any) -> pb.ListVersionsResponse:
        page = await run(self.core.list_versions, request.model, request.page_size, request.page_token)
        return pb.ListVersionsResponse(versions=[convert.version(v) for v in page.items],
                                       next_page_token=page.next_token)

    async def DeleteVersion(self, request: pb.DeleteVersionRequest, context: Any) -> pb.DeleteVersionResponse:
        await run(self.core.delete_version, request.model, request.version, audit_actor(request.actor))
        return pb.DeleteVersionResponse()

    async def DownloadArtifact(self, request: pb.DownloadArtifactRequest,
                               context: Any) -> AsyncIterator[pb.DownloadArtifactResponse]:
        found, chunks = await run(self.core.read_artifact, request.model, request.version, request.alias,
                                  request.chunk_size, request.offset)
        try:
            yield pb.DownloadArtifactResponse(version=convert.version(found))
            while (chunk := await run(next, chunks, None)) is not None:
                yield pb.DownloadArtifactResponse(chunk=chunk)
        finally:
            chunks.close()  # type: ignore[attr-defined]

    async def DownloadFiles(self, request: pb.DownloadFilesRequest,
                            context: Any) -> AsyncIterator[pb.DownloadFilesResponse]:
        found, parts = await run(self.core.read_files, request.model, request.version, request.alias,
                                 request.chunk_size, request.path, request.offset)
        try:
            yield pb.DownloadFilesResponse(version=convert.version(found))
            while (part := await run(next, parts, None)) is not None:
                yield convert.file_part(part)
        finally:
            parts.close()  # type: ignore[attr-defined]

    async def AttachReport(self, request: pb.AttachReportRequest, context: Any) -> pb.AttachReportResponse:
        found = await run(self.core.attach_report, request.model, request.version, request.name,
                          convert.from_struct(request.report), audit_actor(request.actor))
        return pb.AttachReportResponse(version=convert.version(found))

    # Aliases.
    async def SetAlias(self, request: pb.SetAliasRequest, context: Any) -> pb.SetAliasResponse:
        move = await run(self.core.set_alias, request.model, request.alias, request.version,
                         request.expected_version, audit_actor(request.actor), request.reason, request.force)
        return pb.SetAliasResponse(move=convert.alias_move(move))

    async def DeleteAlias(self, request: pb.DeleteAliasRequest, context: Any) -> pb.DeleteAliasResponse:
        move = await run(self.core.delete_alias, request.model, request.alias, audit_actor(request.actor),
                         request.reason)
        return pb.DeleteAliasResponse(move=convert.alias_move(move))

    async def RollbackAlias(self, request: pb.RollbackAliasRequest, context: Any) -> pb.RollbackAliasResponse:
        move = await run(self.core.rollback_alias, request.model, request.alias, audit_actor(request.actor),
                         request.reason)
        return pb.RollbackAliasResponse(move=convert.alias_move(move))

    async def GetAliasHistory(self, request: pb.GetAliasHistoryRequest, context: Any) -> pb.GetAliasHistoryResponse:
        moves = await run(self.core.alias_history, request.model, request.alias, request.limit)
        return pb.GetAliasHistoryResponse(moves=[convert.alias_move(m) for m in moves])

    # Records.
    async def PutRecord(self, request: pb.PutRecordRequest, context: Any) -> pb.PutRecordResponse:
        rec = request.record
        stored = await run(self.core.put_record, rec.kind, rec.name, rec.data, request.expected_revision,
                           audit_actor(request.actor))
        return pb.PutRecordResponse(record=convert.record(stored))

    async def GetRecord(self, request: pb.GetRecordRequest, context: Any) -> pb.GetRecordResponse:
        return pb.GetRecordResponse(record=convert.record(await run(self.core.get_record, request.kind, request.name)))

    async def ListRecords(self, request: pb.ListRecordsRequest, context: Any) -> pb.ListRecordsResponse:
        page = await run(self.core.list_records, request.kind, request.page_size, request.page_token)
        return pb.ListRecordsResponse(records=[convert.record(r) for r in page.items], next_page_token=page.next_token)

    async def DeleteRecord(self, request: pb.DeleteRecordRequest, context: Any) -> pb.DeleteRecordResponse:
        await run(self.core.delete_record, request.kind, request.name, audit_actor(request.actor))
        return pb.DeleteRecordResponse()

    # Audit.
    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Any) -> pb.ListAuditEventsResponse:
        since = convert.from_timestamp(request.since) if request.HasField("since") else None
        until = convert.from_timestamp(request.until) if request.HasField("until") else None
        page = await run(self.core.list_audit, request.model, since, until, request.page_size, request.page_token)
        return pb.ListAuditEventsResponse(events=[convert.audit_event(e) for e in page.items],
                                          next_page_token=page.next_token)

    async def AppendAuditEvent(self, request: pb.AppendAuditEventRequest,
                               context: Any) -> pb.AppendAuditEventResponse:
        event = await run(self.core.append_audit, audit_actor(request.actor), request.action, request.model,
                          request.version, convert.from_struct(request.details))
        return pb.AppendAuditEventResponse(event=convert.audit_event(event))

    # Change feed.
    async def WatchModels(self, request: pb.WatchModelsRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchModelsResponse]:
        readable = self.feed_kinds()
        async for event in self.hub.watch(request.after_revision, list(request.models)):
            message = convert.change_event(event)
            if readable is not None and message.HasField("record") and message.record.kind not in readable:
                # The caller follows the feed but may not read this kind (API keys): it learns that
                # the revision moved, not what the record holds.
                message.record.ClearField("data")
            yield pb.WatchModelsResponse(event=message)
