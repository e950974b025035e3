"""Every KServe datatype round-trips through the service (raw and typed contents), BYTES included.

Identity models of each datatype (TorchScript; BYTES through ONNX). This module runs the
service with `--worker-mode thread`, so the in-process runner is exercised end to end too.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.inference import models
from tests.inference.conftest import Registry, inference_args, start_inference
from tests.support.procs import ServiceProcess

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
           "BF16"]
ALL = [*NUMERIC, "BYTES"]
TYPED_FIELD = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
               "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
               "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
               "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def model_name(datatype: str) -> str:
    return f"id-{datatype.lower()}"


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    directory = tmp_path_factory.mktemp("models")
    for datatype in NUMERIC:
        registry.register(model_name(datatype), models.write_identity(directory, "torchscript", datatype),
                          alias="production", max_batch_size=8)
    registry.register(model_name("BYTES"), models.write_identity(directory, "onnx", "BYTES"), alias="production",
                      max_batch_size=8)
    proc = start_inference(inference_args(registry, tmp_path_factory.mktemp("cache"), "--worker-mode", "thread"))
    yield proc
    proc.stop()


@pytest.fixture()
def client(server: ServiceProcess) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(server.address) as c:
        yield c


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = models.random_array(datatype, shape, rng)
    if datatype == "BF16":  # tritonclient wants ml_dtypes.bfloat16 for BF16
        return array.view(ml_dtypes.bfloat16)
    return array


@pytest.mark.parametrize("datatype", ALL)
def test_round_trip_raw(client: tc.InferenceServerClient, datatype: str) -> None:
    array = sample(datatype, (3, 5))
    tensor = tc.InferInput("INPUT0", [3, 5], datatype)
    tensor.set_data_from_numpy(array)
    result = client.infer(model_name(datatype), [tensor])
    out = result.get_response().outputs[0]
    assert (out.name, out.datatype, list(out.shape)) == ("OUTPUT0", datatype, [3, 5])
    got = result.as_numpy("OUTPUT0")
    if datatype == "BYTES":
        assert got.tolist() == array.tolist()
    else:
        np.testing.assert_array_equal(got.view(np.uint16) if datatype == "BF16" else got,
                                      array.view(np.uint16) if datatype == "BF16" else array)


@pytest.mark.parametrize("datatype", list(TYPED_FIELD))
def test_round_trip_typed_contents(server: ServiceProcess, datatype: str) -> None:
    array = sample(datatype, (2, 4), seed=1)
    request = service_pb2.ModelInferRequest(model_name=model_name(datatype))
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=[2, 4])
    getattr(tensor.contents, TYPED_FIELD[datatype]).extend(array.ravel().tolist())
    with grpc.insecure_channel(server.address) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    result = tc.InferResult(reply)
    got = result.as_numpy("OUTPUT0")
    assert got.tolist() == array.tolist()


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_types_need_raw_bytes(server: ServiceProcess, datatype: str) -> None:
    request = service_pb2.ModelInferRequest(model_name=model_name(datatype))
    request.inputs.add(name="INPUT0", datatype=datatype, shape=[1, 2]).contents.fp32_contents.extend([1.0, 2.0])
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in info.value.details()


@pytest.mark.parametrize("raw,fragment", [
    (b"\x05\x00\x00\x00ab\x00\x00", "declares 5 bytes"),
    (b"\x01\x00", "length prefix"),
    (b"\x01\x00\x00\x00a\x00\x00\x00\x00zz", "trailing"),
])
def test_malformed_bytes_tensor(server: ServiceProcess, raw: bytes, fragment: str) -> None:
    request = service_pb2.ModelInferRequest(model_name=model_name("BYTES"))
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2])
    request.raw_input_contents.append(raw)
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'INPUT0'" in info.value.details() and fragment in info.value.details()


def test_bytes_with_empty_and_unicode_elements(client: tc.InferenceServerClient) -> None:
    array = np.array([[b"", b"\x00a", "h\u00e9llo \u2603".encode()]], dtype=object)
    tensor = tc.InferInput("INPUT0", [1, 3], "BYTES")
    tensor.set_data_from_numpy(array)
    assert client.infer(model_name("BYTES"), [tensor]).as_numpy("OUTPUT0").tolist() == array.tolist()
    # ONNX Runtime holds strings, not bytes: non-UTF-8 input is refused with a clear message.
    binary = np.array([[b"\xff\xfe"]], dtype=object)
    tensor = tc.InferInput("INPUT0", [1, 1], "BYTES")
    tensor.set_data_from_numpy(binary)
    with pytest.raises(InferenceServerException) as info:
        client.infer(model_name("BYTES"), [tensor])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "UTF-8" in info.value.message()


def test_metadata_reports_each_datatype(client: tc.InferenceServerClient) -> None:
    for datatype in ALL:
        meta = client.get_model_metadata(model_name(datatype))
        assert [(t.datatype, list(t.shape)) for t in meta.inputs] == [(datatype, [-1, -1])]
        config = client.get_model_config(model_name(datatype)).config
        expected = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
        assert model_config_pb2.DataType.Name(config.input[0].data_type) == expected
