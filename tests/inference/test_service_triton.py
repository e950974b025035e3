"""The Triton-delegating backend, pointed at a second aiaas inference process (same protocol)."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
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
