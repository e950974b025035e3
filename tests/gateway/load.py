"""For the replica-failure tests: a small closed-loop load through the gateway (a few threads, each
sending ModelInfer with `tritonclient.grpc` one request after another, counting answers and failures)
and what they ask a replica directly (its health, how many requests it served)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Self

import grpc
import numpy as np
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ClosedLoop:
    """`workers` threads sending ModelInfer through the gateway one after another, until stopped."""

    def __init__(self, address: str, token: str, workers: int = 2, pause_s: float = 0.01) -> None:
        self.address, self.headers, self.pause_s = address, {"authorization": f"Bearer {token}"}, pause_s
        # (start, seconds) of each answered request, in the order they were answered.
        self.answered: list[tuple[float, float]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self) -> None:
        tensor = tc.InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        with tc.InferenceServerClient(self.address) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    client.infer("mlp", [tensor], headers=self.headers, client_timeout=20.0)
                    self.answered.append((started, time.monotonic() - started))
                except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                    self.failures.append(str(exc))
                self._stop.wait(self.pause_s)

    @property
    def sent(self) -> int:
        return len(self.answered) + len(self.failures)

    def latencies(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """Latencies of the answered requests that started within [since, until)."""
        return [seconds for started, seconds in self.answered if since <= started < until]

    def p99(self, since: float = 0.0, until: float = float("inf")) -> float:
        latencies = self.latencies(since, until)
        return float(np.percentile(latencies, 99)) if latencies else 0.0


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def served(address: str) -> int:
    """ModelInfer requests the replica has served since it started (0 before the model is loaded)."""
    with tc.InferenceServerClient(address) as client:
        try:
            stats = client.get_inference_statistics("mlp")
        except tc.InferenceServerException:
            return 0
    return sum(int(s.inference_stats.success.count) for s in stats.model_stats)


def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    """The monotonic time at which `condition` first held (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic()
