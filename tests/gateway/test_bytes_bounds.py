"""The gateway checks BYTES inputs against the bytes they came with before forwarding anything.

Issue 10's shape lie (a 27-byte ModelInfer declaring a BYTES input of shape [1, 67108864]) used to
pass the gateway untouched. The gateway runs in process on a real gRPC server with its
interceptors; the replica behind it is the echo double, which records whatever reaches it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from aiaas.api_keys import make_key
from services.common.datatypes import MAX_BYTES_ELEMENTS
from services.common.server import ServiceApp
from services.gateway.balancer import Balancer
from services.gateway.dataplane import DataPlane
from services.gateway.entities import Role
from services.gateway.keys import KeyRing
from services.gateway.quotas import QuotaEnforcer
from services.gateway.router import Catalog
from services.gateway.servicer import INFERENCE_SERVICE, InferenceProxy, add_inference_proxy
from services.gateway.settings import GatewaySettings
from services.gateway.upstream import InferenceUpstream
from tests.gateway.upstream_double import EchoReplica

PEPPER = b"pepper"


@dataclass
class Gateway:
    address: str
    replica: EchoReplica
    token: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    replica = await EchoReplica(aliases={"production": "1"}).start()
    catalog = Catalog()
    catalog.add_version("words", 1)
    catalog.move_alias("words", "production", 1)
    ring = KeyRing(PEPPER)
    entry, token = make_key(PEPPER, roles=frozenset({Role.INFER}))
    ring.put(entry)
    upstream = InferenceUpstream([replica.address], Balancer(), max_message_bytes=64 << 20)
    await upstream.start()
    plane = DataPlane(catalog=catalog, ring=ring, quotas=QuotaEnforcer(), upstream=upstream, default_timeout_s=5.0)
    app = ServiceApp("gateway", GatewaySettings(host="127.0.0.1", port=0, require_identity=False, key_pepper="x"), configure_process=False)
    app.add_service(INFERENCE_SERVICE, add_inference_proxy, InferenceProxy(plane))
    port = await app.start()
    yield Gateway(f"127.0.0.1:{port}", replica, token)
    await app.server.stop(0)
    await upstream.close()
    await replica.stop()


def request(*tensors: tuple[str, str, list[int], bytes]) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="words")
    for name, datatype, shape, raw in tensors:
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        message.raw_input_contents.append(raw)
    return message


async def infer(gateway: Gateway, message: pb.ModelInferRequest) -> pb.ModelInferResponse:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(gateway.address, options=options) as channel:
        call = channel.unary_unary(f"/{INFERENCE_SERVICE}/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        return await call(message, metadata=gateway.metadata, timeout=30)


async def refused(gateway: Gateway, message: pb.ModelInferRequest) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await infer(gateway, message)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.details() or ""


async def test_the_shape_lie_is_refused_before_forwarding(gateway: Gateway) -> None:
    lie = request(("INPUT0", "BYTES", [1, 67108864], b""))
    assert lie.ByteSize() < 40
    for _ in range(3):
        details = await refused(gateway, lie)
        assert "input 'INPUT0' for model 'words'" in details
        assert "[1,67108864] declares 67108864 BYTES elements" in details
        assert "need at least 268435456 bytes" in details and "holds 0 bytes" in details
    assert gateway.replica.seen == []
    # A normal request right after is forwarded and answered.
    answer = await infer(gateway, request(("x", "FP32", [1, 2], np.array([1, 2], np.float32).tobytes())))
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [1.0, 2.0]
    assert len(gateway.replica.seen) == 1


async def test_the_requests_bytes_inputs_share_one_element_cap(gateway: Gateway) -> None:
    half = MAX_BYTES_ELEMENTS // 2 + 1
    empty = b"\0\0\0\0" * half  # `half` empty strings, each its 4-byte length
    two = request(("a", "BYTES", [1, half], empty), ("b", "BYTES", [1, half], empty))
    details = await refused(gateway, two)
    # 'a' alone is within the cap; with 'b' the request is over it.
    assert f"input 'b' for model 'words': the request's BYTES inputs declare {2 * half} elements" in details
    assert f"over the limit of {MAX_BYTES_ELEMENTS} per request" in details
    assert gateway.replica.seen == []


async def test_a_well_formed_bytes_input_is_forwarded_untouched(gateway: Gateway) -> None:
    raw = b"".join(len(w).to_bytes(4, "little") + w for w in (b"abc", b"", b"hello"))
    # The echo double sends input 0's bytes back (read as FP32: 20 bytes make 5 of them).
    answer = await infer(gateway, request(("INPUT0", "BYTES", [1, 3], raw)))
    assert answer.raw_output_contents[0] == raw
    assert len(gateway.replica.seen) == 1


async def test_a_lie_on_a_stream_is_answered_in_band(gateway: Gateway) -> None:
    messages = [request(("INPUT0", "BYTES", [1, 67108864], b"")),
                request(("x", "FP32", [1, 1], np.array([7], np.float32).tobytes()))]
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stream = channel.stream_stream(f"/{INFERENCE_SERVICE}/ModelStreamInfer",
                                       request_serializer=pb.ModelInferRequest.SerializeToString,
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        answers = [answer async for answer in stream(iter(messages), metadata=gateway.metadata, timeout=30)]
    assert len(answers) == 2
    assert "declares 67108864 BYTES elements" in answers[0].error_message
    assert answers[1].error_message == ""
    assert np.frombuffer(answers[1].infer_response.raw_output_contents[0], np.float32).tolist() == [7.0]
    assert len(gateway.replica.seen) == 1
