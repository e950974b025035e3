"""services.common.registry_client against a real registry (in this process, on SQLite) and a real
gRPC server that is unavailable for a while: paging, compare-and-set, downloads, retries, errors."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aiaas.errors import Aborted, NotFound, Unavailable
from aiaas.gateway.v1 import gateway_pb2
from aiaas.records import ROUTE
from aiaas.registry.v1 import registry_pb2 as rpb
from aiaas.registry_client import RegistryClient as SyncRegistryClient
from services.common.registry_client import RegistryClient
from services.registry.server import create_service
from services.registry.settings import RegistrySettings
from tests.support.blobs import onnx_blob
from tests.support.servers import free_port


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[str]:
    settings = RegistrySettings(host="127.0.0.1", port=0, require_identity=False, database_url=f"sqlite:///{tmp_path / 'registry.db'}",
                                artifact_dir=str(tmp_path / "artifacts"), grace_period_s=1.0)
    service = create_service(settings, configure_process=False)
    port = await service.start()
    yield f"127.0.0.1:{port}"
    await service.stop()


async def test_records_page_and_compare_and_set(registry: str) -> None:
    client = RegistryClient.connect(registry, page_size=2)
    try:
        for i in range(5):
            route = gateway_pb2.Route(model=f"m{i}")
            await client.put_record(ROUTE.record(f"m{i}", route), expected_revision=0, actor="tests")
        listed = await client.list_records(ROUTE.kind)
        assert [r.name for r in listed] == [f"m{i}" for i in range(5)]
        assert ROUTE.decode(listed[3].data) == gateway_pb2.Route(model="m3")

        with pytest.raises(Aborted, match="is at revision"):
            await client.put_record(ROUTE.record("m0", gateway_pb2.Route(model="m0")), expected_revision=0,
                                    actor="tests")
        await client.delete_record(ROUTE.kind, "m0", actor="tests")
        with pytest.raises(NotFound, match="^record route/m0 not found"):
            await client.get_record(ROUTE.kind, "m0")
        with pytest.raises(NotFound, match="^looking up: "):
            await client.get_record(ROUTE.kind, "m0", context="looking up")
    finally:
        await client.close()


async def test_versions_and_downloads(registry: str) -> None:
    data = onnx_blob("registry-client")

    def upload() -> int:
        with SyncRegistryClient(registry, actor="tests") as sdk:
            return sdk.upload_version("tiny", data, format="onnx",
                                      signature={"inputs": ["x:FP32:-1,4"], "outputs": ["y:FP32:-1,4"]}).version

    version = await asyncio.to_thread(upload)
    client = RegistryClient.connect(registry)
    try:
        found = await client.get_version("tiny", version)
        assert found.artifact_sha256 == hashlib.sha256(data).hexdigest()
        assert (await client.get_model("tiny")).latest_version == version
        assert [m.name async for m in client.models()] == ["tiny"]
        chunks = [c async for c in client.download("tiny", version, chunk_size=64)]
        assert len(chunks) > 1 and b"".join(chunks) == data
        with pytest.raises(NotFound, match="^fetching: "):
            async for _ in client.download("tiny", version + 1, context="fetching"):
                pass
    finally:
        await client.close()


class Flaky:
    """A registry that answers UNAVAILABLE `failures` times, then serves one record."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def get_record(self, request: rpb.GetRecordRequest, context: Any) -> rpb.GetRecordResponse:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return rpb.GetRecordResponse(record=rpb.Record(kind=request.kind, name=request.name, revision=7))

    async def put_record(self, request: rpb.PutRecordRequest, context: Any) -> rpb.PutRecordResponse:
        self.calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        raise AssertionError("abort raises")


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[str, Flaky]]:
    registry = Flaky(failures=2)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("aiaas.registry.v1.ModelRegistry", {
        "GetRecord": grpc.unary_unary_rpc_method_handler(
            registry.get_record, request_deserializer=rpb.GetRecordRequest.FromString,
            response_serializer=rpb.GetRecordResponse.SerializeToString),
        "PutRecord": grpc.unary_unary_rpc_method_handler(
            registry.put_record, request_deserializer=rpb.PutRecordRequest.FromString,
            response_serializer=rpb.PutRecordResponse.SerializeToString),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", registry
    await server.stop(None)


async def test_reads_are_retried_while_the_registry_is_unavailable(flaky: tuple[str, Flaky]) -> None:
    address, registry = flaky
    client = RegistryClient.connect(address, attempts=3, backoff_s=0.01)
    try:
        record = await client.get_record("route", "m")
        assert (record.name, record.revision, registry.calls) == ("m", 7, 3)
    finally:
        await client.close()


async def test_reads_give_up_after_their_attempts(flaky: tuple[str, Flaky]) -> None:
    address, registry = flaky
    client = RegistryClient.connect(address, attempts=2, backoff_s=0.01, context="reading routes")
    try:
        with pytest.raises(Unavailable, match=r"^registry unreachable \(reading routes\): warming up$"):
            await client.get_record("route", "m")
        assert registry.calls == 2
    finally:
        await client.close()


async def test_writes_are_not_retried(flaky: tuple[str, Flaky]) -> None:
    address, registry = flaky
    client = RegistryClient.connect(address, attempts=5, backoff_s=0.01)
    try:
        with pytest.raises(Unavailable, match="registry unreachable: warming up"):
            await client.put_record(rpb.Record(kind="route", name="m"), expected_revision=0, actor="tests")
        assert registry.calls == 1
    finally:
        await client.close()


async def test_a_registry_that_is_not_there_is_unavailable() -> None:
    client = RegistryClient.connect(f"127.0.0.1:{free_port()}", attempts=2, backoff_s=0.01, timeout_s=5)
    try:
        with pytest.raises(Unavailable, match="registry unreachable"):
            await client.get_model("m")
    finally:
        await client.close()
