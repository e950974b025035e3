"""Per-model, per-version Prometheus metrics from a real inference process."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tc

from tests.inference.conftest import Registry, inference_args, start_inference, wait_model
from tests.inference.models import write_mlp
from tests.support.procs import ServiceProcess
from tests.support.servers import free_port


@pytest.fixture(scope="module")
def served(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, int]]:
    tmp = tmp_path_factory.mktemp("metrics")
    registry.register("metered", write_mlp(tmp, "torchscript"), alias="production")
    registry.register("metered", write_mlp(tmp, "torchscript", seed=1), alias="canary")
    port = free_port()
    proc = start_inference(inference_args(registry, tmp / "cache", "--metrics-port", str(port),
                                          follow="production,canary"))
    wait_model(proc, "metered", 1)
    wait_model(proc, "metered", 2)
    yield proc, port
    proc.stop()


def _samples(port: int, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} ([0-9.e+-]+)$", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(1))))
            found[labels] = float(match.group(2))
    return found


def _count(samples: dict[tuple[tuple[str, str], ...], float], **want: str) -> float:
    return sum(v for labels, v in samples.items() if want.items() <= dict(labels).items())


def test_requests_are_counted_per_version_and_status(served: tuple[ServiceProcess, int]) -> None:
    proc, port = served
    client = tc.InferenceServerClient(proc.address)
    x = tc.InferInput("input", [1, 10], "FP32")
    x.set_data_from_numpy(np.ones((1, 10), np.float32))
    for _ in range(5):
        client.infer("metered", [x], model_version="1")
    for _ in range(3):
        client.infer("metered", [x], model_version="2")
    bad = tc.InferInput("input", [1, 11], "FP32")
    bad.set_data_from_numpy(np.ones((1, 11), np.float32))
    with pytest.raises(tc.InferenceServerException):
        client.infer("metered", [bad], model_version="2")

    counts = _samples(port, "aiaas_model_request_duration_milliseconds_count")
    assert _count(counts, model="metered", version="1", status="OK", source="inference") == 5
    assert _count(counts, model="metered", version="2", status="OK") == 3
    assert _count(counts, model="metered", version="2", status="INVALID_ARGUMENT") == 1
    batches = _samples(port, "aiaas_model_batch_size_count")
    assert _count(batches, model="metered", version="1") == 5
