"""Hot swaps driven by the registry feed: an alias moved under steady load fails no request.

Also: versions that appear, aliases that are deleted, and a registry restart (the feed resumes
from its last revision and the next move still swaps).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np
import psutil
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca

from tests.inference import models
from tests.inference.conftest import Registry, inference_args, start_inference, start_registry, wait_model
from tests.support.procs import ServiceProcess


class Env:
    def __init__(self, registry: Registry, inference: ServiceProcess, arts: dict[int, Any], tmp: Path) -> None:
        self.registry = registry
        self.inference = inference
        self.arts = arts
        self.tmp = tmp


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("swap")
    registry = Registry(start_registry(tmp))
    arts = {1: models.write_mlp(tmp, "torchscript", seed=0),
            2: models.write_mlp(tmp, "torch_export", seed=1)}
    registry.register("swap", arts[1], alias="production", max_batch_size=8, max_queue_delay_us=200)
    registry.register("swap", arts[2], max_batch_size=8, max_queue_delay_us=200)
    inference = start_inference(inference_args(registry, tmp / "cache", "--reconnect-min-s", "0.1",
                                               "--reconnect-max-s", "0.5"))
    yield Env(registry, inference, arts, tmp)
    inference.stop()
    registry.close()
    registry.proc.stop()


class SteadyLoad:
    """`concurrency` aio callers sending requests back to back, in a thread, until stopped."""

    def __init__(self, address: str, model: str, concurrency: int = 8) -> None:
        self.address = address
        self.model = model
        self.concurrency = concurrency
        self.versions: Counter[str] = Counter()
        self.errors: list[str] = []
        self.mismatches = 0
        self.check: Callable[[str, np.ndarray, np.ndarray], bool] = lambda v, x, y: True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        async with tca.InferenceServerClient(self.address) as client:
            async def caller(seed: int) -> None:
                rng = np.random.default_rng(seed)
                while not self._stop.is_set():
                    x = rng.standard_normal((1, 10)).astype(np.float32)
                    tensor = tca.InferInput("input", [1, 10], "FP32")
                    tensor.set_data_from_numpy(x)
                    try:
                        result = await client.infer(self.model, [tensor], client_timeout=30)
                    except Exception as exc:  # noqa: BLE001 - every failure is recorded and asserted on
                        self.errors.append(str(exc))
                        continue
                    version = result.get_response().model_version
                    self.versions[version] += 1
                    if not self.check(version, x, result.as_numpy("output")):
                        self.mismatches += 1

            await asyncio.gather(*(caller(i) for i in range(self.concurrency)))

    def wait_for_version(self, version: str, count: int = 50, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        start = self.versions[version]
        while self.versions[version] - start < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no answers from version {version} in {timeout}s: {self.versions}")
            time.sleep(0.05)


def index(address: str) -> dict[tuple[str, str], str]:
    """Loaded versions and their states (registry models that are not loaded have no version)."""
    with tc.InferenceServerClient(address) as client:
        return {(m.name, m.version): m.state for m in client.get_model_repository_index().models if m.version}


def workers_of(proc: ServiceProcess) -> int:
    assert proc.proc is not None
    children = psutil.Process(proc.proc.pid).children(recursive=True)
    return sum(1 for c in children if "_worker_main" in " ".join(c.cmdline()))


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_alias_moves_under_steady_load_fail_nothing(env: Env) -> None:
    address = env.inference.address
    assert index(address) == {("swap", "1"): "READY"}
    assert workers_of(env.inference) == 1

    def matches(version: str, x: np.ndarray, y: np.ndarray) -> bool:
        expected = env.arts[int(version)].expected({"input": x})["output"]
        return bool(np.allclose(y, expected, rtol=1e-4, atol=1e-5))

    with SteadyLoad(address, "swap") as load:
        load.check = matches
        load.wait_for_version("1")
        env.registry.set_alias("swap", "production", 2)
        load.wait_for_version("2")
        wait_until(lambda: ("swap", "1") not in index(address), what="version 1 to be unloaded")
        wait_until(lambda: workers_of(env.inference) == 1, what="version 1's worker to exit")
        env.registry.set_alias("swap", "production", 1)  # and back: a rollback is a move too
        load.wait_for_version("1")
        wait_until(lambda: ("swap", "2") not in index(address), what="version 2 to be unloaded")
    assert load.errors == []
    assert load.mismatches == 0
    assert load.versions["1"] > 100 and load.versions["2"] > 50
    assert index(address) == {("swap", "1"): "READY"}


def test_new_alias_target_and_deleted_alias(env: Env) -> None:
    artifact = models.write_mlp(env.tmp, "onnx", (10, 6, 2), seed=3)
    version = env.registry.register("late", artifact, alias="production", max_batch_size=4)
    wait_model(env.inference, "late", version)
    with tc.InferenceServerClient(env.inference.address) as client:
        x = np.ones((1, 10), np.float32)
        tensor = tc.InferInput("input", [1, 10], "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_allclose(client.infer("late", [tensor]).as_numpy("output"),
                                   artifact.expected({"input": x})["output"], rtol=1e-4, atol=1e-5)
    from aiaas.registry.v1 import registry_pb2

    env.registry.stub.DeleteAlias(registry_pb2.DeleteAliasRequest(model="late", alias="production", actor="tests"))
    wait_until(lambda: ("late", str(version)) not in index(env.inference.address), what="late to be unloaded")


def test_feed_resumes_after_a_registry_restart(env: Env) -> None:
    port = env.registry.proc.port
    env.registry.proc.stop()
    restarted = start_registry(env.tmp, port=port)
    env.registry.proc = restarted
    with SteadyLoad(env.inference.address, "swap", concurrency=4) as load:
        load.wait_for_version("1", count=20)
        env.registry.set_alias("swap", "production", 2)
        load.wait_for_version("2")
    assert load.errors == []
    wait_until(lambda: index(env.inference.address) == {("swap", "2"): "READY"}, what="only version 2 left")
