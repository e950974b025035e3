"""The gateway on several processes (docs/gateway.md, "Processes"): real Redis, registry, an
inference replica and a gateway started with `--processes 3`, driven with tritonclient and plain
HTTP. Each process accepts on both ports; quotas are shared through Redis; a process that dies
is replaced; SIGTERM drains them all; one whose first process is gone stops by itself."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from aiaas.gateway_client import GatewayClient
from services.common import cpus
from services.common.errors import InvalidArgument
from services.gateway.server import settings_from_json, settings_to_json
from services.gateway.settings import GatewaySettings
from tests.gateway.stack import (
    ADMIN_TOKEN,
    Registry,
    start_gateway,
    start_inference_replica,
    start_registry,
    wait_model,
    wait_until,
    write_versions,
)
from tests.support.procs import ServiceProcess
from tests.support.servers import RedisServer, free_port

MODEL = "tiny"
PROCESSES = 3


@dataclass
class Stack:
    redis: RedisServer
    registry: Registry
    replica: ServiceProcess
    gateway: ServiceProcess
    metrics_port: int
    token: str

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {token or self.token}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    redis = RedisServer().start()
    registry = Registry(start_registry(tmp_path_factory.mktemp("registry")))
    artifact = write_versions(tmp_path_factory.mktemp("models"))[0]
    registry.register(MODEL, artifact, alias="production", max_batch_size=8)
    replica = start_inference_replica(registry, tmp_path_factory.mktemp("cache"))
    wait_model(replica, MODEL)
    metrics_port = free_port()
    gateway = start_gateway(registry, [replica], redis, "--processes", str(PROCESSES), "--redis-timeout-ms", "500",
                            "--metrics-port", str(metrics_port))
    with GatewayClient(gateway.address, api_key=ADMIN_TOKEN) as admin:
        _, token = admin.create_key("processes", models=[MODEL], roles=["infer", "read"])
    yield Stack(redis, registry, replica, gateway, metrics_port, token)
    for proc in (gateway, replica):
        proc.stop()
    registry.close()
    registry.proc.stop()
    redis.close()


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def listeners(port: int) -> int:
    """Sockets listening on `port`, from /proc/net/tcp and tcp6 (grpc binds 127.0.0.1 as a v4-mapped
    IPv6 socket): one per process that accepts there."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                count += 1
    return count


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for this purpose.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"


def infer_once(stack: Stack, token: str | None = None) -> None:
    """One ModelInfer on a connection of its own (the kernel picks the process per connection)."""
    data = np.ones((1, 4), dtype=np.float32)
    tensor = tc.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(data)
    with tc.InferenceServerClient(stack.gateway.address) as client:
        assert client.infer(MODEL, [tensor], headers=stack.headers(token)).as_numpy("output").shape == (1, 3)


def infer_counts(port: int) -> dict[str, float]:
    """ModelInfer calls served so far, by the `process` label of the replica's one /metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    counts: dict[str, float] = {}
    for labels, value in re.findall(r'^rpc_server_duration_milliseconds_count\{([^}]*ModelInfer[^}]*)\} (\S+)$',
                                    text, re.MULTILINE):
        process = re.search(r'process="(\d+)"', labels)
        assert process is not None, labels
        counts[process.group(1)] = counts.get(process.group(1), 0.0) + float(value)
    return counts


def test_every_process_accepts_on_both_ports(stack: Stack) -> None:
    assert len(children(stack.gateway.proc.pid)) == PROCESSES - 1  # type: ignore[union-attr]
    assert listeners(stack.gateway.port) == PROCESSES
    assert stack.gateway.openai_port is not None and listeners(stack.gateway.openai_port) == PROCESSES


def test_connections_spread_over_processes_and_one_endpoint_exports_them_all(stack: Stack) -> None:
    assert listeners(stack.metrics_port) == 1  # the others' exporters are on loopback ports of their own
    before = infer_counts(stack.metrics_port)
    calls = 40
    for _ in range(calls):
        infer_once(stack)
    after = infer_counts(stack.metrics_port)
    served = {p: after[p] - before.get(p, 0.0) for p in after}
    assert set(served) == {str(i) for i in range(PROCESSES)}, served
    assert sum(served.values()) == calls and all(s > 0 for s in served.values()), served


def test_a_quota_is_shared_by_every_process(stack: Stack) -> None:
    with GatewayClient(stack.gateway.address, api_key=ADMIN_TOKEN) as admin:
        _, token = admin.create_key("burst-4", models=[MODEL], roles=["infer"], rps=0.01, burst=4)
    wait_until(lambda: _admitted(stack, token), timeout=10)  # the new key reached every process
    outcomes = []
    for _ in range(12):
        try:
            infer_once(stack, token)
            outcomes.append("OK")
        except InferenceServerException as exc:
            outcomes.append(str(exc.status()))
    # One bucket in Redis for all processes: 4 in all (one spent above), not 4 per process.
    assert outcomes.count("OK") == 3 and outcomes.count("StatusCode.RESOURCE_EXHAUSTED") == 9, outcomes


def _admitted(stack: Stack, token: str) -> bool:
    try:
        infer_once(stack, token)
        return True
    except InferenceServerException as exc:
        assert str(exc.status()) == "StatusCode.UNAUTHENTICATED", exc
        return False


def test_the_openai_door_answers_on_every_connection(stack: Stack) -> None:
    for _ in range(12):
        request = urllib.request.Request(f"http://127.0.0.1:{stack.gateway.openai_port}/v1/models",
                                         headers=stack.headers())
        with urllib.request.urlopen(request, timeout=10) as reply:
            # Generative models only: the tensor model is not listed.
            assert reply.status == 200 and json.loads(reply.read()) == {"object": "list", "data": []}
    request = urllib.request.Request(f"http://127.0.0.1:{stack.gateway.openai_port}/v1/models",
                                     headers=stack.headers("aiaas_00000000_not-a-key"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401


def test_a_killed_process_is_replaced(stack: Stack) -> None:
    leader = stack.gateway.proc.pid  # type: ignore[union-attr]
    first = children(leader)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    # Replaced: the victim reaped (a zombie is still listed as a child), a new process in its place
    # and listening. On a loaded machine the listener count can read PROCESSES for a moment before
    # the leader has reaped the victim, so every part is waited for together.
    wait_until(lambda: not alive(victim) and victim not in (now := children(leader))
               and len(now) == PROCESSES - 1 and listeners(stack.gateway.port) == PROCESSES,
               timeout=30, interval=0.1)
    for _ in range(10):
        infer_once(stack)
    assert "gateway process" in stack.gateway.log() and "restarting" in stack.gateway.log()


def test_processes_stop_with_the_first_one(stack: Stack) -> None:
    """SIGKILL of the first process (no drain): the others see their stdin close and stop."""
    other = start_gateway(stack.registry, [stack.replica], stack.redis, "--processes", "2")
    leader = other.proc.pid  # type: ignore[union-attr]
    (sibling,) = children(leader)
    os.kill(leader, signal.SIGKILL)
    other.proc.wait(10)  # type: ignore[union-attr]
    wait_until(lambda: not alive(sibling), timeout=30, interval=0.1)
    assert listeners(other.port) == 0


def test_sigterm_drains_every_process(stack: Stack) -> None:
    other = start_gateway(stack.registry, [stack.replica], stack.redis, "--processes", "2")
    pids = children(other.proc.pid)  # type: ignore[union-attr]
    assert len(pids) == 1
    started = time.monotonic()
    assert other.stop() == 0
    assert time.monotonic() - started < 20
    wait_until(lambda: not any(alive(p) for p in pids), timeout=10, interval=0.1)
    assert listeners(other.port) == 0 and "gateway process" in other.log()


def test_more_than_one_process_needs_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidArgument, match="redis_url"):
        GatewaySettings(key_pepper="p", processes=2).validate()
    GatewaySettings(key_pepper="p", processes=2, redis_url="redis://127.0.0.1:6379/0").validate()
    monkeypatch.setattr(cpus, "available_cores", lambda: 8)
    assert GatewaySettings(key_pepper="p").process_count == 1  # auto, no Redis: one process
    assert GatewaySettings(key_pepper="p", redis_url="redis://x:6379/0").process_count == 8
    monkeypatch.setattr(cpus, "available_cores", lambda: 2)
    assert GatewaySettings(key_pepper="p", redis_url="redis://x:6379/0").process_count == 1


def test_settings_travel_to_the_other_processes_whole() -> None:
    settings = GatewaySettings(key_pepper="secret", redis_url="redis://r:6379/0", processes=4,
                               inference_targets=("a:1", "b:2"), bootstrap_admin_key=ADMIN_TOKEN)
    assert settings_from_json(settings_to_json(settings)) == settings
