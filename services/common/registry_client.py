"""The services' one async client of the registry: typed calls, paging, retries and error mapping.

Gateway (records), inference (versions and artifacts) and monitor (SLOs, baselines, routes) call
the registry through this. Every failure is the `AiaasError` of its status (`error_from_rpc`),
its message prefixed with the call's context. Reads are retried with exponential backoff while the
registry answers UNAVAILABLE; writes are not (a compare-and-set or an audit event must not be
applied twice). A registry that stays unavailable, or does not answer within `timeout_s`, is
Unavailable to the caller: it is this service's dependency that failed, not the caller's deadline;
the log gets one line when the registry stops answering, at most one a minute while it stays
down, and one when it answers again (`services.common.outages.OutageLog`). The change feed
(WatchModels) is followed by each service's own follower, not here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self, TypeVar

import grpc
from google.protobuf import struct_pb2

from aiaas.errors import AiaasError, Unavailable, error_from_rpc
from aiaas.identity import ClientIdentity
from aiaas.registry.v1 import registry_pb2 as rpb
from aiaas.registry.v1 import registry_pb2_grpc as rpb_grpc
from services.common.outages import OutageLog

log = logging.getLogger("aiaas.registry_client")

T = TypeVar("T")
PAGE_SIZE = 1000
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class RegistryClient:
    """`channel` is the caller's (it closes it) unless the client was made with `connect`; `address`
    names the registry in the log (`connect` passes its target)."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float = 10.0, context: str = "",
                 attempts: int = 3, backoff_s: float = 0.1, page_size: int = PAGE_SIZE, address: str = "") -> None:
        self.stub = rpb_grpc.ModelRegistryStub(channel)
        self.timeout_s = timeout_s
        self.context = context
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.page_size = page_size
        self._channel = channel
        self._owned = False
        self.outage = OutageLog(log, "registry", address)

    @classmethod
    def connect(cls, target: str, *, credentials: grpc.ChannelCredentials | None = None,
                identity: ClientIdentity | None = None,
                options: list[tuple[str, Any]] | None = None, **kwargs: Any) -> Self:
        if identity is not None:
            channel = identity.aio_channel(target, options)
        elif credentials is not None:
            channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        kwargs.setdefault("address", target)
        client = cls(channel, **kwargs)
        client._owned = True
        return client

    async def close(self) -> None:
        if self._owned:
            await self._channel.close()

    def _error(self, exc: grpc.RpcError, context: str) -> AiaasError:
        where = context or self.context
        if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _UNREACHABLE:
            self.outage.failed(exc)
            detail = exc.details() or exc.code().name
            return Unavailable(f"registry unreachable ({where}): {detail}" if where else
                               f"registry unreachable: {detail}")
        self.outage.recovered()  # it answered, if only to say no
        return error_from_rpc(exc, where)

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, *, context: str = "",
                    retry: bool = True) -> T:
        attempts = self.attempts if retry else 1
        for attempt in range(attempts):
            try:
                reply = await method(request, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                unavailable = isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE
                if not unavailable or attempt + 1 == attempts:
                    raise self._error(exc, context) from None
            else:
                self.outage.recovered()
                return reply
            await asyncio.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    # Versions and models ------------------------------------------------------------------

    async def get_version(self, model: str, version: int = 0, alias: str = "", *,
                          context: str = "") -> rpb.ModelVersion:
        reply = await self._call(self.stub.GetVersion, rpb.GetVersionRequest(model=model, version=version, alias=alias),
                                 context=context)
        return reply.version

    async def get_model(self, name: str, *, context: str = "") -> rpb.Model:
        reply = await self._call(self.stub.GetModel, rpb.GetModelRequest(name=name), context=context)
        return reply.model

    async def models(self, *, context: str = "") -> AsyncIterator[rpb.Model]:
        """Every model, page by page."""
        token = ""
        while True:
            page = await self._call(self.stub.ListModels,
                                    rpb.ListModelsRequest(page_size=self.page_size, page_token=token), context=context)
            for model in page.models:
                yield model
            token = page.next_page_token
            if not token:
                return

    async def download(self, model: str, version: int, *, chunk_size: int = 4 * 1024 * 1024,
                       context: str = "") -> AsyncIterator[bytes]:
        """The artifact's bytes, chunk by chunk (not retried: the caller verifies and starts over)."""
        request = rpb.DownloadArtifactRequest(model=model, version=version, chunk_size=chunk_size)
        try:
            async for message in self.stub.DownloadArtifact(request):
                self.outage.recovered()
                if message.WhichOneof("payload") == "chunk":
                    yield message.chunk
        except grpc.RpcError as exc:
            raise self._error(exc, context) from None

    async def download_files(self, model: str, version: int, *, path: str = "", offset: int = 0,
                             chunk_size: int = 4 * 1024 * 1024,
                             context: str = "") -> AsyncIterator[rpb.DownloadFilesResponse]:
        """A multi-file version's DownloadFiles messages (version, then each file's start and chunks)."""
        request = rpb.DownloadFilesRequest(model=model, version=version, chunk_size=chunk_size, path=path,
                                           offset=offset)
        try:
            async for message in self.stub.DownloadFiles(request):
                self.outage.recovered()
                yield message
        except grpc.RpcError as exc:
            raise self._error(exc, context) from None

    # Records and the audit log ------------------------------------------------------------

    async def get_record(self, kind: str, name: str, *, context: str = "") -> rpb.Record:
        reply = await self._call(self.stub.GetRecord, rpb.GetRecordRequest(kind=kind, name=name), context=context)
        return reply.record

    async def records(self, kind: str, *, context: str = "") -> AsyncIterator[rpb.Record]:
        """Every record of `kind`, page by page."""
        token = ""
        while True:
            page = await self._call(self.stub.ListRecords,
                                    rpb.ListRecordsRequest(kind=kind, page_size=self.page_size, page_token=token),
                                    context=context)
            for record in page.records:
                yield record
            token = page.next_page_token
            if not token:
                return

    async def list_records(self, kind: str, *, context: str = "") -> list[rpb.Record]:
        return [record async for record in self.records(kind, context=context)]

    async def put_record(self, record: rpb.Record, *, expected_revision: int, actor: str,
                         context: str = "") -> rpb.Record:
        """Compare-and-set on the revision: 0 creates, -1 writes whatever is there, N replaces revision N."""
        reply = await self._call(self.stub.PutRecord, rpb.PutRecordRequest(
            record=record, expected_revision=expected_revision, actor=actor), context=context, retry=False)
        return reply.record

    async def delete_record(self, kind: str, name: str, *, actor: str, context: str = "") -> None:
        await self._call(self.stub.DeleteRecord, rpb.DeleteRecordRequest(kind=kind, name=name, actor=actor),
                         context=context, retry=False)

    async def append_audit(self, *, actor: str, action: str, model: str = "", version: int = 0,
                           details: dict[str, Any] | None = None, context: str = "") -> None:
        info = struct_pb2.Struct()
        info.update(details or {})
        await self._call(self.stub.AppendAuditEvent, rpb.AppendAuditEventRequest(
            actor=actor, action=action, model=model, version=version, details=info), context=context, retry=False)
