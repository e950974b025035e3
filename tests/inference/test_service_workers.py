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
from tritonclient.utils import InferenceServerException

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
    artifact = write_spin(tmp_path_factory.mktemp("models"))
    registry.register("spin", artifact, alias="production", max_batch_size=4)
    # No batching: one request at a time, so the order the queue serves them in shows.
    registry.register("spin-serial", artifact, alias="production", max_batch_size=0)
    proc = start_inference(inference_args(registry, tmp_path_factory.mktemp("cache"), "--priority-levels", "2"))
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
    assert len(pids) == 2  # one per version
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    with tc.InferenceServerClient(server.address) as client:
        before = client.get_inference_statistics("spin").model_stats[0].inference_stats.fail.count
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.async_infer("spin", spin_inputs(400_000, x), callback=lambda result, error: answers.put((result, error)))
        busy = _wait_busy(pids)
        os.kill(busy, signal.SIGKILL)
        result, error = answers.get(timeout=30)
        assert result is None
        assert error.status() == "StatusCode.UNAVAILABLE", error
        assert "crashed" in error.message() or "worker" in error.message()

        deadline = time.monotonic() + 90
        while True:  # the pool starts a new worker; until then requests say UNAVAILABLE (retry)
            try:
                ok = client.infer("spin", spin_inputs(10, x))
                break
            except InferenceServerException as exc:  # only UNAVAILABLE is acceptable while it restarts
                assert "UNAVAILABLE" in str(exc.status()), exc
                assert time.monotonic() < deadline, "worker did not come back"
                time.sleep(0.2)
        np.testing.assert_array_equal(ok.as_numpy("y"), x)
        after = client.get_inference_statistics("spin").model_stats[0].inference_stats.fail.count
        assert after > before
    new = worker_pids(server)
    assert len(new) == 2 and busy not in new and set(pids) - {busy} <= set(new)


def _wait_busy(pids: list[int], timeout: float = 20.0, answers: queue.Queue[tuple[Any, Any]] | None = None) -> int:
    """The worker that starts burning CPU, i.e. the one running the long batch (0.1 s of CPU: idle
    workers spend next to none); with `answers`, a request that already ended says how."""
    processes = [psutil.Process(pid) for pid in pids]

    def used(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    # CPU time spent since now, not a share of the last interval: on a saturated machine a busy
    # worker may never get half a core in 0.1 s, but it keeps accumulating CPU time.
    before = {process.pid: used(process) for process in processes}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        for process in processes:
            if used(process) - before[process.pid] > 0.1:
                return process.pid
        if answers is not None and not answers.empty():
            raise AssertionError(f"the long batch ended before a worker was seen running it: {answers.get()}")
    raise AssertionError("no worker started the batch")


def test_priority_parameter_orders_the_queue(server: ServiceProcess) -> None:
    x = np.ones((1, 4), np.float32)
    finished: queue.Queue[str] = queue.Queue()

    def send(client: tc.InferenceServerClient, name: str, iterations: int, priority: int = 0) -> None:
        client.async_infer("spin-serial", spin_inputs(iterations, x), request_id=name, priority=priority,
                           callback=lambda result, error: finished.put(error.message() if error else name))

    with tc.InferenceServerClient(server.address) as client:
        config = client.get_model_config("spin-serial").config
        assert (config.dynamic_batching.priority_levels, config.dynamic_batching.default_priority_level) == (2, 2)
        send(client, "first", 60_000)  # occupies the only worker
        _wait_busy(worker_pids(server))
        for name in ("low-1", "low-2", "low-3"):
            send(client, name, 10)
        send(client, "high", 10, priority=1)
        order = [finished.get(timeout=30) for _ in range(5)]
    assert order[0] == "first"
    assert order[1] == "high", order


def test_sigterm_drains_and_stops_every_worker(server: ServiceProcess) -> None:
    pids = worker_pids(server)
    assert pids
    with tc.InferenceServerClient(server.address) as client:
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.async_infer("spin", spin_inputs(40_000, np.ones((1, 4), np.float32)),
                           callback=lambda result, error: answers.put((result, error)))
        _wait_busy(pids, answers=answers)
        assert server.stop() == 0  # SIGTERM: the in-flight request finishes first
        result, error = answers.get(timeout=10)
        assert error is None and result.as_numpy("y").shape == (1, 4)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
