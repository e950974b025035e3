"""Every service's one composition root, `create_service(settings)`, and its lifecycle.

In process: the four services wired by their roots into one stack (registry, inference following
it, monitor, gateway over both), each started, SERVING on the port it reports, then stopped.
As processes: SIGTERM while a service is still starting (its registry is not up) stops it there
and it exits 0, through `python -m services.<name>` -> `serve_main` -> `create_service(...).run()`.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import Service
from services.gateway.dataplane import DataPlane
from services.gateway.server import create_service as create_gateway
from services.gateway.settings import GatewaySettings
from services.inference.repository import ModelRepository
from services.inference.server import create_service as create_inference
from services.inference.settings import InferenceSettings
from services.monitor.core import MonitorCore
from services.monitor.server import create_service as create_monitor
from services.monitor.settings import MonitorSettings
from services.registry.core import RegistryCore
from services.registry.server import create_service as create_registry
from services.registry.settings import RegistrySettings
from tests.support.identity import session_identities
from tests.support.procs import ServiceProcess
from tests.support.servers import free_port


async def _health(port: int) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def test_each_root_builds_a_service_that_starts_serves_and_stops(tmp_path: Path) -> None:
    # Identities required, as in production: each service presents the session's admin token.
    ids = session_identities()
    common: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "grace_period_s": 1.0, "require_identity": True,
                              "identity_token_key": str(ids.public_key),
                              "identity_token_file": str(ids.token_file("admin"))}
    registry = create_registry(RegistrySettings(
        **common, database_url=f"sqlite:///{tmp_path / 'registry.db'}", artifact_dir=str(tmp_path / "artifacts")),
        configure_process=False)
    await registry.start()
    registry_url = f"127.0.0.1:{registry.port}"
    inference = create_inference(InferenceSettings(
        **common, registry_url=registry_url, follow_aliases=("production",), model_cache_dir=str(tmp_path / "cache")),
        configure_process=False)
    monitor = create_monitor(MonitorSettings(**common, registry_url=registry_url), configure_process=False)
    started: list[Service[Any]] = [registry]
    try:
        for runnable in (inference, monitor):
            assert await runnable.start() == runnable.port > 0
            started.append(runnable)
        gateway = create_gateway(GatewaySettings(
            **common, registry_url=registry_url, inference_targets=(f"127.0.0.1:{inference.port}",),
            key_pepper="lifecycle-pepper", openai_port=0), configure_process=False)
        assert await gateway.start() == gateway.port > 0
        started.append(gateway)
        # Its OpenAI-compatible door opened beside it (port 0: a free one).
        assert gateway.openai is not None and gateway.openai.port > 0
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.openai.port)
        writer.close()

        assert isinstance(registry.core, RegistryCore)
        assert isinstance(inference.core, ModelRepository)
        assert isinstance(monitor.core, MonitorCore)
        assert isinstance(gateway.core, DataPlane)
        for service in started:
            assert await _health(service.port) == "SERVING", service.app.name
    finally:
        for service in reversed(started):
            await service.stop()
    for service in started:
        assert await _health(service.port) == "UNAVAILABLE", service.app.name
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", gateway.openai.port)


def _wait_for_log(proc: ServiceProcess, line: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in proc.log():
        if proc.proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} never logged {line!r}:\n{proc.log()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize("name", ["gateway", "inference"])
def test_sigterm_during_start_up_stops_there_and_exits_0(name: str, tmp_path: Path) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # no registry here: start-up waits for it
    if name == "gateway":
        args = ["--registry-url", nobody, "--inference-targets", f"127.0.0.1:{free_port()}",
                "--key-pepper", "lifecycle-pepper"]
        waiting = f"gateway feed: registry at {nobody} unreachable"
    else:
        args = ["--registry-url", nobody, "--load-models", "m", "--model-cache-dir", str(tmp_path / "cache"),
                "--reconnect-min-s", "0.05"]
        waiting = "start-up load of m waits for its source"
    proc = ServiceProcess(name, args=args).start(wait=False)
    try:
        _wait_for_log(proc, waiting)
        proc.signal(signal.SIGTERM)
        assert proc.proc is not None
        assert proc.proc.wait(15) == 0, proc.log()[-3000:]
        assert f"{name} stopped during start-up" in proc.log()
        assert "listening on" not in proc.log()
    finally:
        proc.kill()
