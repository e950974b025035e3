"""The Triton-delegating backend, pointed at a second aiaas inference process (same protocol)."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.inference import models
from tests.inference.conftest import Registry, inference_args, start_inference, write_triton_backends
from tests.support.procs import ServiceProcess


class Pair:
    def __init__(self, upstream: ServiceProcess, front: ServiceProcess, artifact: Any) -> None:
        self.upstream = upstream
        self.front = front
        self.artifact = artifact


@pytest.fixture(scope="module")
def pair(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("triton")
    artifact = models.write_mlp(tmp, "torchscript")
    registry.register("mlp", artifact, alias="production", max_batch_size=8)
    upstream = start_inference(inference_args(registry, tmp / "cache-upstream"))
    backends = write_triton_backends(tmp / "backends.json", {
        "remote-mlp": {"url": upstream.address, "model_name": "mlp"},
        "remote-missing": {"url": upstream.address, "model_name": "not-there"},
    })
    # The front replica follows nothing: all it serves comes from the Triton backend config.
    front = start_inference(inference_args(registry, tmp / "cache-front", "--triton-backends", backends,
                                           follow=""))
    yield Pair(upstream, front, artifact)
    front.stop()
    upstream.stop()


def fp32(x: np.ndarray) -> tc.InferInput:
    tensor = tc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_delegated_model_serves_and_describes_itself(pair: Pair) -> None:
    with tc.InferenceServerClient(pair.front.address) as client:
        assert client.is_model_ready("remote-mlp")
        meta = client.get_model_metadata("remote-mlp")
        assert (meta.name, list(meta.versions), meta.platform) == ("remote-mlp", ["1"], "pytorch_libtorch")
        assert [(t.name, list(t.shape)) for t in meta.inputs] == [("input", [-1, 10])]
        assert client.get_model_config("remote-mlp").config.max_batch_size == 8
        x = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
        result = client.infer("remote-mlp", [fp32(x)], request_id="via-front")
        np.testing.assert_allclose(result.as_numpy("output"), pair.artifact.expected({"input": x})["output"],
                                   rtol=1e-4, atol=1e-5)
        assert (result.get_response().model_name, result.get_response().id) == ("remote-mlp", "via-front")
        stats = client.get_inference_statistics("remote-mlp").model_stats[0]
        assert stats.inference_stats.success.count >= 1 and stats.inference_count >= 3
    with tc.InferenceServerClient(pair.upstream.address) as client:
        assert client.get_inference_statistics("mlp").model_stats[0].inference_count >= 3


def test_delegated_model_errors_and_stream(pair: Pair) -> None:
    with tc.InferenceServerClient(pair.front.address) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer("remote-mlp", [fp32(np.ones((2, 9), np.float32))])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for index in range(3):
            client.async_stream_infer("remote-mlp", [fp32(np.full((1, 10), index, np.float32))],
                                      request_id=str(index))
        client.stop_stream()
        got = [answers.get(timeout=1) for _ in range(3)]
        assert all(error is None for _, error in got)
        assert sorted(r.get_response().id for r, _ in got) == ["0", "1", "2"]


def test_unreachable_remote_model_is_listed_unavailable(pair: Pair) -> None:
    with tc.InferenceServerClient(pair.front.address) as client:
        with pytest.raises(InferenceServerException) as info:
            client.is_model_ready("remote-missing")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as info:
            client.load_model("remote-missing")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        assert "not-there" in info.value.message()


def raw_request(model: str, x: np.ndarray, **fields: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


class Stubs:
    def __init__(self, front: Any, upstream: Any) -> None:
        self.front = front
        self.upstream = upstream


@pytest.fixture
def stubs(pair: Pair) -> Iterator[Stubs]:
    with grpc.insecure_channel(pair.front.address) as front, grpc.insecure_channel(pair.upstream.address) as upstream:
        yield Stubs(service_pb2_grpc.GRPCInferenceServiceStub(front), service_pb2_grpc.GRPCInferenceServiceStub(upstream))


def inference_counts(stub: Any, model: str) -> tuple[int, int]:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10).model_stats[0]
    return stats.inference_stats.success.count, stats.inference_stats.fail.count


def test_raw_requests_are_forwarded_whole_and_answered_as_upstream_answers(pair: Pair, stubs: Stubs) -> None:
    """The raw path: the front's answer carries the upstream's output bytes unchanged, under the local name."""
    x = np.random.default_rng(1).standard_normal((4, 10)).astype(np.float32)
    front_stub, upstream_stub = stubs.front, stubs.upstream
    before = inference_counts(upstream_stub, "mlp")
    front_before = inference_counts(front_stub, "remote-mlp")
    request = raw_request("remote-mlp", x, id="raw-1")
    request.outputs.add(name="output")
    request.parameters["priority"].uint64_param = 1
    via_front = front_stub.ModelInfer(request, timeout=30)
    direct = upstream_stub.ModelInfer(raw_request("mlp", x), timeout=30)
    assert (via_front.model_name, via_front.model_version, via_front.id) == ("remote-mlp", "1", "raw-1")
    assert [(t.name, t.datatype, list(t.shape)) for t in via_front.outputs] == [("output", "FP32", [4, 10])]
    assert via_front.raw_output_contents[0] == direct.raw_output_contents[0]
    np.testing.assert_allclose(np.frombuffer(via_front.raw_output_contents[0], np.float32).reshape(4, 10),
                               pair.artifact.expected({"input": x})["output"], rtol=1e-4, atol=1e-5)
    assert inference_counts(upstream_stub, "mlp")[0] == before[0] + 2
    assert inference_counts(front_stub, "remote-mlp") == (front_before[0] + 1, front_before[1])
    # Typed contents take the decoding path and get the same answer.
    typed = pb.ModelInferRequest(model_name="remote-mlp")
    tensor = typed.inputs.add(name="input", datatype="FP32", shape=[4, 10])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    assert front_stub.ModelInfer(typed, timeout=30).raw_output_contents[0] == direct.raw_output_contents[0]


def test_bad_raw_requests_are_refused_before_anything_is_forwarded(stubs: Stubs) -> None:
    front_stub, upstream_stub = stubs.front, stubs.upstream
    good = np.ones((1, 10), np.float32)
    wrong_type = raw_request("remote-mlp", good.astype(np.float64))
    wrong_type.inputs[0].datatype = "FP64"
    unknown_name = raw_request("remote-mlp", good)
    unknown_name.inputs[0].name = "inputs"
    short = raw_request("remote-mlp", good)
    short.raw_input_contents[0] = good.tobytes()[:-4]
    too_many_rows = raw_request("remote-mlp", np.ones((9, 10), np.float32))
    extra_raw = raw_request("remote-mlp", good)
    extra_raw.raw_input_contents.append(good.tobytes())
    bad_priority = raw_request("remote-mlp", good)
    bad_priority.parameters["priority"].string_param = "high"
    unknown_output = raw_request("remote-mlp", good)
    unknown_output.outputs.add(name="logits")
    cases = {
        "data-type is 'FP64', but model 'remote-mlp' expects 'FP32'": wrong_type,
        "unexpected inference input 'inputs'": unknown_name,
        "declares 10 elements (40 bytes) but raw_input_contents holds 36 bytes": short,
        "batch-size must be <= 8": too_many_rows,
        "1 inputs but 2 raw_input_contents entries": extra_raw,
        "parameter 'priority' must be": bad_priority,
        "unexpected inference output 'logits'": unknown_output,
    }
    upstream_before = inference_counts(upstream_stub, "mlp")
    front_before = inference_counts(front_stub, "remote-mlp")
    for message, request in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            front_stub.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in (info.value.details() or ""), info.value.details()
    # Nothing reached the upstream server; the front counted every refusal as a failure.
    assert inference_counts(upstream_stub, "mlp") == upstream_before
    assert inference_counts(front_stub, "remote-mlp") == (front_before[0], front_before[1] + len(cases))


def test_concurrent_raw_requests_merge_and_each_gets_its_own_answer(pair: Pair, stubs: Stubs) -> None:
    """64 requests at once (1-3 rows each): while 2 calls run, the waiting ones go to the upstream merged;
    each answer holds exactly its own rows and id."""
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((1 + i % 3, 10)).astype(np.float32) for i in range(64)]

    def executions(stub: Any, model: str) -> tuple[int, int]:
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10).model_stats[0]
        return stats.inference_stats.success.count, stats.execution_count

    async def send_all() -> list[pb.ModelInferResponse]:
        async with grpc.aio.insecure_channel(pair.front.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            return list(await asyncio.gather(*(
                stub.ModelInfer(raw_request("remote-mlp", x, id=f"r{i}"), timeout=30) for i, x in enumerate(inputs))))

    before = executions(stubs.front, "remote-mlp")
    answers = asyncio.run(send_all())
    after = executions(stubs.front, "remote-mlp")
    for i, (x, answer) in enumerate(zip(inputs, answers, strict=True)):
        assert (answer.id, answer.model_name, list(answer.outputs[0].shape)) == (f"r{i}", "remote-mlp", [len(x), 10])
        np.testing.assert_allclose(np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(len(x), 10),
                                   pair.artifact.expected({"input": x})["output"], rtol=1e-4, atol=1e-5)
    requests, calls = after[0] - before[0], after[1] - before[1]
    assert requests == 64 and calls < requests  # executions are the calls made to the upstream
    # A request with parameters is never merged, and still answered.
    alone = raw_request("remote-mlp", inputs[0], id="alone")
    alone.parameters["custom"].string_param = "kept"
    assert stubs.front.ModelInfer(alone, timeout=30).id == "alone"


def test_upstream_errors_pass_through(pair: Pair, stubs: Stubs) -> None:
    """Runs last: it unloads the upstream model, then loads it back."""
    request = raw_request("remote-mlp", np.ones((1, 10), np.float32))
    stubs.upstream.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mlp"), timeout=60)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stubs.front.ModelInfer(request, timeout=30)
        assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
        assert "mlp" in (info.value.details() or "")
    finally:
        stubs.upstream.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"), timeout=60)
    assert stubs.front.ModelInfer(request, timeout=30).raw_output_contents


def test_backend_file_checks_max_in_flight(tmp_path: Path) -> None:
    from services.common.errors import InvalidArgument
    from services.inference.triton_backend import load_backends

    good = write_triton_backends(tmp_path / "good.json", {"m": {"url": "h:1", "max_in_flight": 0}})  # type: ignore[dict-item]
    assert load_backends(good)["m"].max_in_flight == 0
    assert load_backends(write_triton_backends(tmp_path / "default.json", {"m": {"url": "h:1"}}))["m"].max_in_flight == 2
    for bad in (-1, 65, "2", True):
        path = write_triton_backends(tmp_path / "bad.json", {"m": {"url": "h:1", "max_in_flight": bad}})  # type: ignore[dict-item]
        with pytest.raises(InvalidArgument, match="max_in_flight must be an integer"):
            load_backends(path)
