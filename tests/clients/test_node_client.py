"""The Node.js client (clients/node, @grpc/grpc-js) against a real stack: registry, inference and
a gateway with authentication on, serving the demo `aiaas up` serves. Its answer equals
tritonclient's for the same input; a wrong key is refused with UNAUTHENTICATED."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from aiaas.demo import DEMO_FEATURES, DEMO_INPUT, DEMO_MODEL, DEMO_OUTPUT
from aiaas.gateway_client import GatewayClient
from aiaas.up import ensure_demo, wait_model_ready
from tests.clients.conftest import NODE_CLIENT
from tests.gateway.stack import ADMIN_TOKEN, Registry, start_gateway, start_registry
from tests.inference.conftest import inference_args, wait_model
from tests.support.procs import REPO_ROOT, ServiceProcess

# The row `aiaas up` prints for `aiaas predict demo`, and infer.js's default input.
DEMO_ROW = [0.5, -1.2, 0.3, 0.9, -0.4, 1.1, 0.0, -0.7, 0.2, 0.8]


@dataclass
class Stack:
    gateway: str
    key: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    registry = Registry(start_registry(tmp_path_factory.mktemp("registry")))
    procs: list[ServiceProcess] = []
    try:
        # The replica and the gateway start while this process trains and registers the demo.
        cache = tmp_path_factory.mktemp("cache")
        replica = ServiceProcess("inference", inference_args(registry, cache, "--worker-mode", "thread"))
        procs.append(replica.start(wait=False))
        with ThreadPoolExecutor(1) as pool:
            starting = pool.submit(start_gateway, registry, [replica], None)
            ensure_demo(registry.address)
            procs.append(starting.result())
        gateway = procs[-1]
        replica.wait_ready(timeout=120)
        wait_model(replica, DEMO_MODEL)
        wait_model_ready(gateway.address, DEMO_MODEL, time.monotonic() + 60, threading.Event(), ADMIN_TOKEN)
        with GatewayClient(gateway.address, api_key=ADMIN_TOKEN) as admin:
            _, key = admin.create_key("node-client", models=[DEMO_MODEL], roles=["infer", "read"])
        yield Stack(gateway.address, key)
    finally:
        for proc in reversed(procs):
            proc.stop()
        registry.close()
        registry.proc.stop()


def node_infer(*args: str) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node is not None
    return subprocess.run([node, str(NODE_CLIENT / "infer.js"), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=30, check=False)


def tritonclient_answer(stack: Stack, rows: np.ndarray) -> np.ndarray:
    with grpcclient.InferenceServerClient(stack.gateway) as client:
        tensor = grpcclient.InferInput(DEMO_INPUT, list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        result = client.infer(DEMO_MODEL, [tensor], headers={"authorization": f"Bearer {stack.key}"})
        answer: np.ndarray = result.as_numpy(DEMO_OUTPUT)
        return answer


def node_answer(done: subprocess.CompletedProcess[str]) -> tuple[dict[str, Any], np.ndarray]:
    assert done.returncode == 0, done.stderr
    reply: dict[str, Any] = json.loads(done.stdout)
    output = reply["outputs"][DEMO_OUTPUT]
    assert output["datatype"] == "FP32"
    return reply, np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def test_the_node_client_gets_the_demos_answer(stack: Stack, node_modules: Path) -> None:
    reply, scores = node_answer(node_infer(stack.gateway, stack.key))
    assert reply["ready"] is True and reply["model"] == DEMO_MODEL and reply["version"] == "1"
    assert scores.shape == (1, DEMO_FEATURES)
    expected = tritonclient_answer(stack, np.asarray([DEMO_ROW], dtype=np.float32))
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)


def test_a_batch_from_node_equals_tritonclients(stack: Stack, node_modules: Path) -> None:
    rows = np.random.default_rng(7).normal(size=(5, DEMO_FEATURES)).astype(np.float32)
    _, scores = node_answer(node_infer(stack.gateway, stack.key, "--input", json.dumps(rows.tolist())))
    expected = tritonclient_answer(stack, rows)
    assert scores.shape == expected.shape == (5, DEMO_FEATURES)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)
    assert len(set(scores.argmax(axis=1).tolist())) > 1, "five random rows should not all be one class"


def test_a_wrong_key_is_refused(stack: Stack, node_modules: Path) -> None:
    done = node_infer(stack.gateway, "aiaas_0000aaaa_not-a-real-secret")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("UNAUTHENTICATED: "), done.stderr
