"""Bad inputs of every kind, timeouts, deadlines, cancellation and a full queue, with their status codes."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.inference import models
from tests.inference.conftest import Registry, inference_args, start_inference
from tests.support.procs import ServiceProcess

HOLD_US = 3_000_000  # the "held" models wait this long for a full batch: requests sit in the queue


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    directory = tmp_path_factory.mktemp("models")
    mlp = models.write_mlp(directory, "torchscript")
    registry.register("mlp", mlp, alias="production", max_batch_size=8)
    registry.register("two", models.write_two_in_two_out(directory), alias="production", max_batch_size=4)
    registry.register("held", mlp, alias="production", max_batch_size=64, max_queue_delay_us=HOLD_US,
                      strict_queue_delay=True,
                      max_queue_size=4)
    registry.register("held-timeout", mlp, alias="production", max_batch_size=64, max_queue_delay_us=HOLD_US,
                      strict_queue_delay=True,
                      default_timeout_us=300_000)
    proc = start_inference(inference_args(registry, tmp_path_factory.mktemp("cache"),
                                          "--max-message-bytes", str(2 * 1024 * 1024)))
    yield proc
    proc.stop()


@pytest.fixture()
def stub(server: ServiceProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture()
def client(server: ServiceProcess) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(server.address) as c:
        yield c


def request_for(model: str, *tensors: tuple[str, str, list[int], bytes]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def mlp_request(rows: int = 2) -> service_pb2.ModelInferRequest:
    return request_for("mlp", ("input", "FP32", [rows, 10], np.zeros((rows, 10), np.float32).tobytes()))


def expect(stub: service_pb2_grpc.GRPCInferenceServiceStub, request: service_pb2.ModelInferRequest,
           code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()


def a_b(rows: int = 2) -> tuple[tuple[str, str, list[int], bytes], tuple[str, str, list[int], bytes]]:
    return (("a", "FP32", [rows, 3], np.zeros((rows, 3), np.float32).tobytes()),
            ("b", "INT32", [rows, 3], np.zeros((rows, 3), np.int32).tobytes()))


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_input_name(stub: Any) -> None:
    expect(stub, request_for("mlp", ("nope", "FP32", [1, 10], bytes(40))), INVALID, "'nope'", "'input'")


def test_missing_and_extra_inputs(stub: Any) -> None:
    a, b = a_b()
    expect(stub, request_for("two", a), INVALID, "expected 2 inputs", "'b'")
    expect(stub, request_for("two", a, b, ("c", "FP32", [2, 3], bytes(24))), INVALID, "expected 2 inputs")
    expect(stub, request_for("two", a, a), INVALID)


def test_wrong_datatype(stub: Any) -> None:
    expect(stub, request_for("mlp", ("input", "FP64", [1, 10], bytes(80))), INVALID, "'input'", "FP64", "FP32")
    expect(stub, request_for("mlp", ("input", "FLOAT32", [1, 10], bytes(40))), INVALID, "FLOAT32")


@pytest.mark.parametrize("shape,fragment", [([10], "Expected [-1,10], got [10]"), ([1, 11], "got [1,11]"),
                                            ([1, 10, 1], "got [1,10,1]"), ([0, 10], "batch-size"),
                                            ([-1, 10], "got [-1,10]")])
def test_wrong_shape(stub: Any, shape: list[int], fragment: str) -> None:
    expect(stub, request_for("mlp", ("input", "FP32", shape, bytes(40))), INVALID, "'input'", fragment)


def test_batch_over_max_batch_size(stub: Any) -> None:
    rows = 9
    expect(stub, request_for("mlp", ("input", "FP32", [rows, 10], bytes(rows * 40))), INVALID,
           "batch-size must be <= 8")


def test_inputs_disagree_on_batch(stub: Any) -> None:
    a, _ = a_b(2)
    _, b = a_b(3)
    expect(stub, request_for("two", a, b), INVALID, "'b'", "batch")


def test_wrong_byte_size(stub: Any) -> None:
    expect(stub, request_for("mlp", ("input", "FP32", [2, 10], bytes(79))), INVALID, "'input'", "expected 80 bytes",
           "got 79")


def test_raw_entry_count_mismatch(stub: Any) -> None:
    request = mlp_request()
    request.raw_input_contents.append(b"extra")
    expect(stub, request, INVALID, "raw_input_contents")


def test_contents_together_with_raw(stub: Any) -> None:
    request = mlp_request(1)
    request.inputs[0].contents.fp32_contents.extend([0.0] * 10)
    expect(stub, request, INVALID, "contents", "'input'")


def test_no_data_for_input(stub: Any) -> None:
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 10])
    expect(stub, request, INVALID, "unable to find data for input tensor 'input'")


def test_typed_contents_checked(stub: Any) -> None:
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 10]).contents.fp32_contents.extend([1.0] * 9)
    expect(stub, request, INVALID, "expected 10 values", "got 9")
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 10]).contents.int_contents.extend([1] * 10)
    expect(stub, request, INVALID, "fp32_contents")


@pytest.mark.parametrize("key,setter,fragment", [
    ("priority", lambda p: setattr(p, "string_param", "high"), "priority"),
    ("priority", lambda p: setattr(p, "int64_param", -1), "priority"),
    ("timeout", lambda p: setattr(p, "bool_param", True), "timeout"),
    ("triton_something", lambda p: setattr(p, "bool_param", True), "reserved"),
    ("custom", lambda p: setattr(p, "uint64_param", 3), "custom"),
    ("sequence_start", lambda p: setattr(p, "int64_param", 1), "sequence_start"),
])
def test_bad_parameters(stub: Any, key: str, setter: Callable[[Any], None], fragment: str) -> None:
    request = mlp_request()
    setter(request.parameters[key])
    expect(stub, request, INVALID, fragment)


def test_custom_parameters_are_accepted(client: tc.InferenceServerClient) -> None:
    tensor = tc.InferInput("input", [1, 10], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 10), np.float32))
    result = client.infer("mlp", [tensor], priority=1, timeout=10_000_000,
                          parameters={"custom": "x", "n": 2, "f": 0.5, "flag": True})
    assert result.as_numpy("output").shape == (1, 10)


def test_unknown_requested_output(stub: Any) -> None:
    request = mlp_request()
    request.outputs.add(name="nope")
    expect(stub, request, INVALID, "'nope'", "'output'")


@pytest.mark.parametrize("model,version,code,fragment", [
    ("nope", "", grpc.StatusCode.NOT_FOUND, "'nope'"),
    ("mlp", "9", grpc.StatusCode.NOT_FOUND, "version 9"),
    ("mlp", "x1", INVALID, "x1"),
    ("mlp", "0", INVALID, "'0'"),
    ("mlp", "-1", INVALID, "'-1'"),
])
def test_unknown_model_or_version(stub: Any, model: str, version: str, code: grpc.StatusCode, fragment: str) -> None:
    request = mlp_request()
    request.model_name, request.model_version = model, version
    expect(stub, request, code, fragment)


def test_message_over_the_configured_limit(stub: Any) -> None:
    rows = 8
    big = ("input", "FP32", [rows, 10], bytes(3 * 1024 * 1024))
    expect(stub, request_for("mlp", big), grpc.StatusCode.RESOURCE_EXHAUSTED)


def _ones(name: str = "input", rows: int = 1) -> tc.InferInput:
    tensor = tc.InferInput(name, [rows, 10], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, 10), np.float32))
    return tensor


def test_timeout_parameter_expires_in_queue(client: tc.InferenceServerClient) -> None:
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        client.infer("held", [_ones()], timeout=200_000)
    elapsed = time.monotonic() - started
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "timeout expired" in info.value.message()
    assert 0.15 < elapsed < 2.0


def test_default_timeout_from_serving_config(client: tc.InferenceServerClient) -> None:
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        client.infer("held-timeout", [_ones()])
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert 0.25 < time.monotonic() - started < 2.0


@pytest.mark.parametrize("model, parameter_us, deadline_s, status", [
    # The serving config's queue timeout (300 ms) comes first: Triton's UNAVAILABLE, deadline or not.
    ("held-timeout", None, 5.0, "UNAVAILABLE"),
    # The request's own `timeout` parameter comes first: UNAVAILABLE too.
    ("held", 200_000, 5.0, "UNAVAILABLE"),
    ("held-timeout", 200_000, 5.0, "UNAVAILABLE"),
    # The caller's deadline comes first: DEADLINE_EXCEEDED.
    ("held-timeout", None, 0.1, "DEADLINE_EXCEEDED"),
    ("held", 2_000_000, 0.2, "DEADLINE_EXCEEDED"),
])
def test_queue_timeout_or_caller_deadline_whichever_comes_first(
    client: tc.InferenceServerClient, model: str, parameter_us: int | None, deadline_s: float, status: str
) -> None:
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, [_ones()], timeout=parameter_us, client_timeout=deadline_s)
    assert info.value.status() == f"StatusCode.{status}", info.value.message()
    if status == "UNAVAILABLE":
        assert info.value.message() == "Request timeout expired"
    assert time.monotonic() - started < 3.0  # long before the held batch would run


def test_caller_deadline_passes_in_queue(client: tc.InferenceServerClient) -> None:
    before = client.get_inference_statistics("held").model_stats[0].inference_stats.fail.count
    with pytest.raises(InferenceServerException) as info:
        client.infer("held", [_ones()], client_timeout=0.3)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    _wait_for(lambda: client.get_inference_statistics("held").model_stats[0].inference_stats.fail.count > before)


def test_cancelled_request_is_dropped_before_the_model_runs(client: tc.InferenceServerClient) -> None:
    stats = client.get_inference_statistics("held").model_stats[0]
    answers: queue.Queue[Any] = queue.Queue()
    call = client.async_infer("held", [_ones()], callback=lambda result, error: answers.put(error))
    time.sleep(0.2)
    call.cancel()
    error = answers.get(timeout=10)
    assert error is not None and error.status() == "StatusCode.CANCELLED"
    _wait_for(lambda: client.get_inference_statistics("held").model_stats[0].inference_stats.fail.count
              > stats.inference_stats.fail.count)
    time.sleep(HOLD_US / 1e6 + 0.3)  # the batch it would have joined would have run by now
    after = client.get_inference_statistics("held").model_stats[0]
    assert after.execution_count == stats.execution_count
    assert after.inference_count == stats.inference_count


def test_full_queue_is_rejected_at_once(client: tc.InferenceServerClient) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    for index in range(4):
        client.async_infer("held", [_ones()], request_id=str(index),
                           callback=lambda result, error: answers.put((result, error)))
    time.sleep(0.5)  # the four are on the wire; nothing observable says they are queued yet
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        client.infer("held", [_ones()])
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "queue" in info.value.message()
    assert time.monotonic() - started < 1.0
    results = [answers.get(timeout=HOLD_US / 1e6 + 10) for _ in range(4)]
    assert all(error is None for _, error in results)
    assert sorted(r.get_response().id for r, _ in results) == ["0", "1", "2", "3"]
    batches = {b.batch_size for b in client.get_inference_statistics("held").model_stats[0].batch_stats}
    assert 4 in batches


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
