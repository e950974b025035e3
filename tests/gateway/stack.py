"""A whole serving stack as real processes for the gateway's end-to-end tests and benchmark:
Redis, registry, inference replicas, gateways."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.inference import models
from tests.inference.conftest import Registry, inference_args, start_inference, start_registry, wait_model
from tests.support.procs import ServiceProcess
from tests.support.servers import RedisServer

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


__all__ = ["ADMIN_TOKEN", "PEPPER", "Registry", "start_gateway", "start_inference_replica", "start_registry",
           "wait_model", "wait_until", "write_versions"]
