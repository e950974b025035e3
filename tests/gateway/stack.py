"""A whole serving stack as real processes for the gateway's end-to-end tests and benchmark:
Redis, registry, inference replicas, gateways."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from aiaas.gateway_client import GatewayClient
from tests.inference import models
from tests.inference.conftest import Registry, inference_args, start_inference, start_registry, wait_model
from tests.support.procs import ServiceProcess
from tests.support.servers import RedisServer

if TYPE_CHECKING:
    import pytest

PEPPER = "e2e-pepper"
ADMIN_TOKEN = "aiaas_b00751a9_bootstrap-admin-secret-for-tests"
FOLLOW = "production,canary,shadow"


def write_versions(directory: Path) -> list[models.Artifact]:
    """Three versions of one small MLP (4 -> 8 -> 3) with different weights."""
    versions = []
    for seed in (1, 2, 3):
        folder = directory / f"v{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        versions.append(models.write_mlp(folder, "torchscript", sizes=(4, 8, 3), seed=seed))
    return versions


def start_inference_replica(registry: Registry, cache: Path, port: int | None = None) -> ServiceProcess:
    args = inference_args(registry, cache, "--worker-mode", "thread", follow=FOLLOW)
    if port is None:
        return start_inference(args)
    return ServiceProcess("inference", args=args, port=port).start(timeout=120)


def start_gateway(registry: Registry, replicas: list[ServiceProcess], redis: RedisServer | None,
                  *extra: str, monitor: str | None = None) -> ServiceProcess:
    args = ["--registry-url", registry.address, "--inference-targets", ",".join(r.address for r in replicas),
            "--key-pepper", PEPPER, "--bootstrap-admin-key", ADMIN_TOKEN, "--grace-period-s", "2",
            "--eject-base-s", "0.5", *extra]
    if redis is not None:
        args += ["--redis-url", redis.url]
    if monitor:
        args += ["--monitor-url", monitor]
    return ServiceProcess("gateway", args=args).start(timeout=60)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> float:
    """Seconds it took `condition` to hold; raises TimeoutError after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


@dataclasses.dataclass
class MlpStack:
    """A gateway over inference replicas serving "mlp" (4 -> 8 -> 3), and a key that may infer."""

    gateway: ServiceProcess
    replicas: list[ServiceProcess]
    token: str


@contextlib.contextmanager
def mlp_behind_a_gateway(tmp: pytest.TempPathFactory, *gateway_args: str, replicas: int = 2) -> Iterator[MlpStack]:
    registry = Registry(start_registry(tmp.mktemp("registry")))
    procs: list[ServiceProcess] = []
    try:
        registry.register("mlp", models.write_mlp(tmp.mktemp("models"), "torchscript", sizes=(4, 8, 3)),
                          alias="production", max_batch_size=8)
        procs += [start_inference_replica(registry, tmp.mktemp("cache")) for _ in range(replicas)]
        for replica in procs:
            wait_model(replica, "mlp")
        gateway = start_gateway(registry, procs, None, *gateway_args)
        procs.append(gateway)
        with GatewayClient(gateway.address, api_key=ADMIN_TOKEN) as admin:
            _, token = admin.create_key("replica-failures", models=["mlp"], roles=["infer"])
        yield MlpStack(gateway, procs[:replicas], token)
    finally:
        for proc in reversed(procs):
            proc.stop()
        registry.close()
        registry.proc.stop()


__all__ = [
    "ADMIN_TOKEN",
    "PEPPER",
    "MlpStack",
    "Registry",
    "mlp_behind_a_gateway",
    "start_gateway",
    "start_inference_replica",
    "start_registry",
    "wait_model",
    "wait_until",
    "write_versions",
]
