"""Closed-loop inference load through every gateway at once, as users send it (`tritonclient.grpc.aio`),
with each request's outcome kept: its status, latency, gateway and serving version.

Each client sends one request, waits for the answer (or its deadline), and sends the next. A
request "fails" when the client gets anything but an answer; the status name says what it got.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter, deque
from collections.abc import Sequence
from types import TracebackType
from typing import Self

import numpy as np
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

# What a client waits for one answer: shorter than the 5 s hang of the SIGSTOP scenario, so a
# request stuck on a hung replica fails unless the gateway hands it to another one in time.
CLIENT_DEADLINE_S = 3.0


@dataclasses.dataclass(frozen=True)
class Outcome:
    gateway: int
    status: str  # "OK" or the failure's status name (grpc's, or the exception's type)
    latency_ms: float
    version: str = ""
    error: str = ""


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def status_of(exc: Exception) -> str:
    if isinstance(exc, InferenceServerException) and exc.status():
        return str(exc.status()).removeprefix("StatusCode.")
    return type(exc).__name__


@dataclasses.dataclass
class LoadStats:
    """What a run of load saw, whole or since a mark."""

    outcomes: list[Outcome]
    seconds: float

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def ok(self) -> int:
        return sum(1 for o in self.outcomes if o.status == "OK")

    @property
    def failed(self) -> int:
        return self.sent - self.ok

    def failed_by_status(self) -> dict[str, int]:
        return dict(Counter(o.status for o in self.outcomes if o.status != "OK"))

    def by_gateway(self) -> dict[int, int]:
        return dict(sorted(Counter(o.gateway for o in self.outcomes).items()))

    def versions(self) -> dict[str, int]:
        return dict(sorted(Counter(o.version for o in self.outcomes if o.status == "OK").items()))

    def latency_ms(self, q: float) -> float:
        """A percentile of every request's latency, failed ones included (a failure took that long too)."""
        return percentile([o.latency_ms for o in self.outcomes], q)

    def errors(self, limit: int = 5) -> list[str]:
        return [f"gateway {o.gateway}: {o.status}: {o.error}" for o in self.outcomes if o.status != "OK"][:limit]


class FleetLoad:
    """`clients_per_gateway` closed-loop clients on each gateway until the `async with` ends."""

    def __init__(self, gateways: Sequence[str], model: str, token: str, *, clients_per_gateway: int = 2,
                 deadline_s: float = CLIENT_DEADLINE_S, rows: int = 1, recent: int = 20) -> None:
        if not gateways or clients_per_gateway < 1:
            raise ValueError("load needs at least one gateway and one client per gateway")
        self.gateways = list(gateways)
        self.model = model
        self.headers = {"authorization": f"Bearer {token}"}
        self.clients_per_gateway = clients_per_gateway
        self.deadline_s = deadline_s
        self.rows = rows
        self.outcomes: list[Outcome] = []
        # The versions of each gateway's last answers, to see when an alias move has reached it.
        self.recent: list[deque[str]] = [deque(maxlen=recent) for _ in self.gateways]
        self._clients: list[tca.InferenceServerClient] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._started = 0.0
        self._stopped = 0.0

    async def __aenter__(self) -> Self:
        self._started = time.monotonic()
        self._clients = [tca.InferenceServerClient(address) for address in self.gateways]
        for index in range(len(self.gateways)):
            for seed in range(self.clients_per_gateway):
                self._tasks.append(asyncio.create_task(self._client(index, seed), name=f"load-{index}-{seed}"))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._stopping = True
        # Every client finishes its request in flight (bounded by its deadline) and stops.
        await asyncio.wait_for(asyncio.gather(*self._tasks), self.deadline_s + 30)
        self._stopped = time.monotonic()
        for client in self._clients:
            await client.close()

    def mark(self) -> int:
        return len(self.outcomes)

    def stats(self, since: int = 0) -> LoadStats:
        end = self._stopped or time.monotonic()
        return LoadStats(self.outcomes[since:], end - self._started)

    def serving(self, version: str) -> bool:
        """Every gateway's last answers all came from `version`."""
        return all(len(r) == r.maxlen and set(r) == {version} for r in self.recent)

    async def wait_for(self, requests: int, timeout: float = 60.0) -> None:
        """Until `requests` more answers have come back (load is flowing)."""
        start = len(self.outcomes)
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < start + requests:
            if time.monotonic() > deadline:
                raise TimeoutError(f"load got {len(self.outcomes) - start} of {requests} answers in {timeout}s")
            await asyncio.sleep(0.05)

    async def _client(self, index: int, seed: int) -> None:
        client = self._clients[index]
        rng = np.random.default_rng(1000 * index + seed)
        while not self._stopping:
            tensor = tca.InferInput("input", [self.rows, 4], "FP32")
            tensor.set_data_from_numpy(rng.standard_normal((self.rows, 4)).astype(np.float32))
            started = time.perf_counter()
            try:
                result = await client.infer(self.model, [tensor], headers=self.headers,
                                            client_timeout=self.deadline_s)
            except Exception as exc:  # noqa: BLE001 - every failure is an outcome to count, whatever its type
                latency = (time.perf_counter() - started) * 1000
                self.outcomes.append(Outcome(index, status_of(exc), latency, error=str(exc)[:200]))
                await asyncio.sleep(0.01)  # a failing gateway answers at once: no hot loop
                continue
            latency = (time.perf_counter() - started) * 1000
            version = result.get_response().model_version
            self.outcomes.append(Outcome(index, "OK", latency, version))
            self.recent[index].append(version)
