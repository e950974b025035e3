"""Every RPC of inference.GRPCInferenceService against a real inference process, with tritonclient."""

from __future__ import annotations

import asyncio
import json
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from aiaas.cli.main import main as cli_main
from tests.inference import models
from tests.inference.conftest import Registry, inference_args, start_inference, wait_model
from tests.support.procs import ServiceProcess


class Models:
    def __init__(self, directory: Path) -> None:
        self.mlp = models.write_mlp(directory, "torchscript")
        self.mlp_export = models.write_mlp(directory, "torch_export", (10, 20, 4), seed=1)
        self.mlp_onnx = models.write_mlp(directory, "onnx", (10, 16, 3), seed=2)
        self.two = models.write_two_in_two_out(directory)
        self.fails = models.write_fails_on_negative(directory)


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(registry: Registry, arts: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    registry.register("mlp", arts.mlp, alias="production", max_batch_size=8, max_queue_delay_us=500)
    registry.register("mlp-export", arts.mlp_export, alias="production")
    registry.register("mlp-onnx", arts.mlp_onnx, alias="production")
    registry.register("two", arts.two, alias="production", max_batch_size=4)
    registry.register("fails", arts.fails, alias="production", max_batch_size=0)
    # Registered, not aliased: only explicit loads bring it in.
    registry.register("spare", arts.mlp, max_batch_size=4)
    registry.register("spare", arts.mlp_export, max_batch_size=4)
    proc = start_inference(inference_args(registry, tmp_path_factory.mktemp("cache")))
    yield proc
    proc.stop()


@pytest.fixture()
def client(server: ServiceProcess) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(server.address) as c:
        yield c


def fp32_input(name: str, array: np.ndarray) -> tc.InferInput:
    tensor = tc.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def error_of(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_server_live_ready_and_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "aiaas"
    assert {"model_repository", "statistics", "schedule_policy", "binary_tensor_data"} <= set(meta.extensions)


def test_model_ready_metadata_and_config(client: tc.InferenceServerClient) -> None:
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    meta = client.get_model_metadata("mlp")
    assert (meta.name, list(meta.versions), meta.platform) == ("mlp", ["1"], "pytorch_libtorch")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 10])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("output", "FP32", [-1, 10])]
    assert client.get_model_metadata("mlp-onnx").platform == "onnxruntime_onnx"
    config = client.get_model_config("mlp").config
    assert config.max_batch_size == 8 and config.platform == "pytorch_libtorch"
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [10])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.instance_group[0].count == 1
    unbatched = client.get_model_config("fails").config
    assert unbatched.max_batch_size == 0 and list(unbatched.input[0].dims) == [-1, -1]


@pytest.mark.parametrize("call", ["is_model_ready", "get_model_metadata", "get_model_config"])
def test_unknown_model_and_version(client: tc.InferenceServerClient, call: str) -> None:
    err = error_of(lambda: getattr(client, call)("nope"))
    assert err.status() == "StatusCode.NOT_FOUND" and "nope" in err.message()
    err = error_of(lambda: getattr(client, call)("mlp", "7"))
    assert err.status() == "StatusCode.NOT_FOUND" and "version 7" in err.message()
    err = error_of(lambda: getattr(client, call)("mlp", "one"))
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "one" in err.message()


@pytest.mark.parametrize("name,attr", [("mlp", "mlp"), ("mlp-export", "mlp_export"), ("mlp-onnx", "mlp_onnx")])
def test_infer_each_format_matches_reference(client: tc.InferenceServerClient, arts: Models, name: str,
                                             attr: str) -> None:
    artifact = getattr(arts, attr)
    x = np.random.default_rng(1).standard_normal((3, 10)).astype(np.float32)
    result = client.infer(name, [fp32_input("input", x)], request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("output"), artifact.expected({"input": x})["output"], rtol=1e-4,
                               atol=1e-5)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-7", name, "1")


def test_requested_outputs_and_two_inputs(client: tc.InferenceServerClient, arts: Models) -> None:
    a = np.random.default_rng(2).standard_normal((2, 5)).astype(np.float32)
    b = np.arange(10, dtype=np.int32).reshape(2, 5)
    ib = tc.InferInput("b", [2, 5], "INT32")
    ib.set_data_from_numpy(b)
    expected = arts.two.expected({"a": a, "b": b})
    both = client.infer("two", [fp32_input("a", a), ib])
    np.testing.assert_allclose(both.as_numpy("total"), expected["total"], rtol=1e-6)
    np.testing.assert_allclose(both.as_numpy("difference"), expected["difference"], rtol=1e-6)
    only = client.infer("two", [fp32_input("a", a), ib], outputs=[tc.InferRequestedOutput("difference")])
    assert [o.name for o in only.get_response().outputs] == ["difference"]
    assert only.as_numpy("total") is None
    np.testing.assert_allclose(only.as_numpy("difference"), expected["difference"], rtol=1e-6)


def test_classification_output(client: tc.InferenceServerClient, arts: Models) -> None:
    x = np.random.default_rng(3).standard_normal((2, 10)).astype(np.float32)
    result = client.infer("mlp", [fp32_input("input", x)], outputs=[tc.InferRequestedOutput("output", class_count=3)])
    top = result.as_numpy("output")
    assert top.shape == (2, 3)
    reference = arts.mlp.expected({"input": x})["output"]
    for row in range(2):
        assert [int(item.decode().split(":")[1]) for item in top[row]] == list(np.argsort(-reference[row])[:3])


def test_typed_contents_are_accepted(server: ServiceProcess, arts: Models) -> None:
    x = np.random.default_rng(4).standard_normal((2, 10)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 10])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(server.address) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    output = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(list(reply.outputs[0].shape))
    np.testing.assert_allclose(output, arts.mlp.expected({"input": x})["output"], rtol=1e-4, atol=1e-5)


def test_model_execution_failure_is_internal(client: tc.InferenceServerClient) -> None:
    x = -np.ones((2, 3), dtype=np.float32)
    err = error_of(lambda: client.infer("fails", [fp32_input("x", x)]))
    assert err.status() == "StatusCode.INTERNAL" and "negative input rejected" in err.message()
    ok = client.infer("fails", [fp32_input("x", -x)])
    np.testing.assert_array_equal(ok.as_numpy("y"), -x * 2)


def test_stream_in_band_errors_and_clean_half_close(client: tc.InferenceServerClient, arts: Models) -> None:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    x = np.ones((1, 10), dtype=np.float32)
    for index in range(6):
        client.async_stream_infer("nope" if index == 2 else "mlp", [fp32_input("input", x * index)],
                                  request_id=f"s{index}")
    client.stop_stream()  # returns only when the server ends the call after the half-close
    answers = [results.get(timeout=1) for _ in range(6)]
    assert results.empty()
    errors = [e for r, e in answers if e is not None]
    assert len(errors) == 1 and "nope" in errors[0].message() and errors[0].status() is None
    ok = {r.get_response().id: r.as_numpy("output") for r, e in answers if e is None}
    assert set(ok) == {"s0", "s1", "s3", "s4", "s5"}
    np.testing.assert_allclose(ok["s4"], arts.mlp.expected({"input": x * 4})["output"], rtol=1e-4, atol=1e-5)


def test_aio_client_infer_and_stream(server: ServiceProcess, arts: Models) -> None:
    async def scenario() -> None:
        async with tca.InferenceServerClient(server.address) as aclient:
            assert await aclient.is_server_ready()
            assert (await aclient.get_model_metadata("mlp")).name == "mlp"
            xs = [np.full((1, 10), i, dtype=np.float32) for i in range(16)]

            def inputs(x: np.ndarray) -> list[tca.InferInput]:
                tensor = tca.InferInput("input", [1, 10], "FP32")
                tensor.set_data_from_numpy(x)
                return [tensor]

            results = await asyncio.gather(*(aclient.infer("mlp", inputs(x), request_id=str(i))
                                             for i, x in enumerate(xs)))
            for i, result in enumerate(results):
                assert result.get_response().id == str(i)
                np.testing.assert_allclose(result.as_numpy("output"), arts.mlp.expected({"input": xs[i]})["output"],
                                           rtol=1e-4, atol=1e-5)

            async def requests() -> Any:
                for i in range(4):
                    yield {"model_name": "mlp", "inputs": inputs(xs[i]), "request_id": f"a{i}"}

            seen = []
            async for result, error in aclient.stream_infer(requests()):
                assert error is None
                seen.append(result.get_response().id)
                if len(seen) == 4:
                    break
            assert sorted(seen) == ["a0", "a1", "a2", "a3"]

    asyncio.run(scenario())


def test_statistics_count_like_triton(client: tc.InferenceServerClient) -> None:
    before = client.get_inference_statistics("mlp-export").model_stats[0]
    x = np.ones((3, 10), dtype=np.float32)
    for _ in range(4):
        client.infer("mlp-export", [fp32_input("input", x)])
    error_of(lambda: client.infer("mlp-export", [fp32_input("input", np.ones((3, 9), np.float32))]))
    after = client.get_inference_statistics("mlp-export", "1").model_stats[0]
    assert (after.name, after.version) == ("mlp-export", "1")
    assert after.inference_stats.success.count - before.inference_stats.success.count == 4
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_count - before.inference_count == 12
    assert after.execution_count - before.execution_count == 4
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_stats.compute_infer.count == after.inference_stats.success.count
    assert after.inference_stats.queue.count == after.inference_stats.success.count
    sizes = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    assert sizes.get(3, 0) >= 4
    assert after.last_inference > 0
    everything = client.get_inference_statistics()
    assert {"mlp", "mlp-export", "mlp-onnx", "two", "fails"} <= {s.name for s in everything.model_stats}
    err = error_of(lambda: client.get_inference_statistics("nope"))
    assert err.status() == "StatusCode.NOT_FOUND"


def test_repository_index_load_and_unload(client: tc.InferenceServerClient, server: ServiceProcess) -> None:
    index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert index[("mlp", "1")] == "READY"
    assert index[("spare", "")] == "UNAVAILABLE"  # in the registry, not loaded
    err = error_of(lambda: client.is_model_ready("spare"))
    assert err.status() == "StatusCode.NOT_FOUND"

    client.load_model("spare")  # no alias: the latest version
    assert client.get_model_metadata("spare").versions == ["2"]
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.RepositoryModelLoadRequest(model_name="spare")
        request.parameters["version"].int64_param = 1
        stub.RepositoryModelLoad(request, timeout=60)
    wait_model(server, "spare", 1)
    assert sorted(client.get_model_metadata("spare").versions) == ["1", "2"]
    x = np.ones((1, 10), dtype=np.float32)
    assert client.infer("spare", [fp32_input("input", x)], model_version="1").as_numpy("output").shape == (1, 10)
    assert client.infer("spare", [fp32_input("input", x)], model_version="2").as_numpy("output").shape == (1, 4)
    ready = {(m.name, m.version) for m in client.get_model_repository_index().models if m.state == "READY"}
    assert {("spare", "1"), ("spare", "2")} <= ready

    client.unload_model("spare")
    err = error_of(lambda: client.is_model_ready("spare"))
    assert err.status() == "StatusCode.NOT_FOUND"
    err = error_of(lambda: client.unload_model("spare"))
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    err = error_of(lambda: client.load_model("not-in-registry"))
    assert err.status() == "StatusCode.NOT_FOUND"
    err = error_of(lambda: client.load_model("spare", config=json.dumps({"max_batch_size": 2})))
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "config" in err.message()


def test_unsupported_rpcs_are_unimplemented(client: tc.InferenceServerClient) -> None:
    for call in (client.get_system_shared_memory_status, client.get_cuda_shared_memory_status,
                 lambda: client.unregister_system_shared_memory(), lambda: client.get_trace_settings(),
                 client.get_log_settings):
        err = error_of(call)
        assert err.status() == "StatusCode.UNIMPLEMENTED"
        assert "not supported" in err.message()


def test_health_has_one_entry_per_model_and_version(server: ServiceProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "mlp", "mlp/1", "two/1"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope/1"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_models_stats_and_infer(server: ServiceProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["inference", "models", "--url", server.address, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"model": "mlp", "version": "1", "state": "READY", "reason": ""} in listed
    assert cli_main(["inference", "stats", "mlp", "--url", server.address, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats[0]["model"] == "mlp" and stats[0]["success"] >= 1
    payload = json.dumps({"input": [[0.5] * 10]})
    assert cli_main(["inference", "infer", "mlp", "--url", server.address, "--inputs", payload, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_version"] == "1" and len(out["outputs"]["output"]["data"]) == 10
    assert cli_main(["inference", "infer", "nope", "--url", server.address, "--inputs", payload]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_stream_with_triton_grpc_error_ends_on_first_error(server: ServiceProcess) -> None:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with tc.InferenceServerClient(server.address) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)),
                            headers={"triton_grpc_error": "true"})
        client.async_stream_infer("nope", [fp32_input("input", np.ones((1, 10), np.float32))])
        _, error = results.get(timeout=10)
        assert error is not None and error.status() == "StatusCode.NOT_FOUND"
        client.stop_stream()
