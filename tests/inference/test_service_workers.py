"""Model workers are processes: one killed with SIGKILL mid-batch fails only that batch, and comes back."""

from __future__ import annotations

import os
import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import tritonclient.grpc as tc

from tests.inference.conftest import Registry, inference_args, start_inference
from tests.inference.models import Artifact, TensorSpec
from tests.support.procs import ServiceProcess


class Spin(torch.nn.Module):
    """Busy for `n` small matmuls (about 25 us each here), then returns x: a batch that takes a while."""

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        a = torch.ones(64, 64) / 64.0
        for _ in range(int(n.max())):
            a = torch.tanh(a @ a)
        return x + a.sum() * 0.0


def write_spin(directory: Path) -> Artifact:
    path = directory / "spin.pt"
    torch.jit.save(torch.jit.script(Spin()), str(path))
    return Artifact(str(path), "torchscript",
                    (TensorSpec("x", "FP32", (-1, 4)), TensorSpec("n", "INT64", (-1, 1))),
                    (TensorSpec("y", "FP32", (-1, 4)),), lambda inputs: {"y": inputs["x"]})


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    registry.register("spin", write_spin(tmp_path_factory.mktemp("models")), alias="production", max_batch_size=4)
    proc = start_inference(inference_args(registry, tmp_path_factory.mktemp("cache")))
    yield proc
    proc.stop()


def worker_pids(proc: ServiceProcess) -> list[int]:
    assert proc.proc is not None
    children = psutil.Process(proc.proc.pid).children(recursive=True)
    return [c.pid for c in children if "_worker_main" in " ".join(c.cmdline())]


def spin_inputs(iterations: int, x: np.ndarray) -> list[tc.InferInput]:
    tx = tc.InferInput("x", [1, 4], "FP32")
    tx.set_data_from_numpy(x)
    tn = tc.InferInput("n", [1, 1], "INT64")
    tn.set_data_from_numpy(np.array([[iterations]], dtype=np.int64))
    return [tx, tn]


def test_worker_killed_mid_batch(server: ServiceProcess) -> None:
    pids = worker_pids(server)
    assert len(pids) == 1
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    with tc.InferenceServerClient(server.address) as client:
        before = client.get_inference_statistics("spin").model_stats[0].inference_stats.fail.count
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.async_infer("spin", spin_inputs(400_000, x), callback=lambda result, error: answers.put((result, error)))
        _wait_busy(pids[0])
        os.kill(pids[0], signal.SIGKILL)
        result, error = answers.get(timeout=30)
        assert result is None
        assert error.status() == "StatusCode.UNAVAILABLE", error
        assert "crashed" in error.message() or "worker" in error.message()

        deadline = time.monotonic() + 90
        while True:  # the pool starts a new worker; until then requests say UNAVAILABLE (retry)
            try:
                ok = client.infer("spin", spin_inputs(10, x))
                break
            except Exception as exc:  # noqa: BLE001 - only UNAVAILABLE is acceptable while it restarts
                assert "UNAVAILABLE" in str(exc.status()), exc
                assert time.monotonic() < deadline, "worker did not come back"
                time.sleep(0.2)
        np.testing.assert_array_equal(ok.as_numpy("y"), x)
        after = client.get_inference_statistics("spin").model_stats[0].inference_stats.fail.count
        assert after > before
    new = worker_pids(server)
    assert len(new) == 1 and new[0] != pids[0]


def _wait_busy(pid: int, timeout: float = 20.0) -> None:
    """Until the worker burns CPU, i.e. the long batch is running inside it."""
    process = psutil.Process(pid)
    process.cpu_percent(None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if process.cpu_percent(None) > 50:
            return
    raise AssertionError("the worker never started the batch")


def test_sigterm_drains_and_stops_every_worker(server: ServiceProcess) -> None:
    pids = worker_pids(server)
    assert pids
    with tc.InferenceServerClient(server.address) as client:
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.async_infer("spin", spin_inputs(40_000, np.ones((1, 4), np.float32)),
                           callback=lambda result, error: answers.put((result, error)))
        _wait_busy(pids[0])
        assert server.stop() == 0  # SIGTERM: the in-flight request finishes first
        result, error = answers.get(timeout=10)
        assert error is None and result.as_numpy("y").shape == (1, 4)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
