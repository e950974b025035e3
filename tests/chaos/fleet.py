"""A multi-replica fleet on loopback for the chaos scenarios, every part a real process: the registry
on PostgreSQL, two inference replicas, two gateways (sharing quotas in Redis, reaching the
registry through a `FaultProxy` each), the monitor, and Redis.

Every part can be killed and started again on its own port with its own arguments, so the
others find it where they left it.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from aiaas.gateway_client import GatewayClient
from tests.chaos.load import status_of
from tests.chaos.proxy import FaultProxy
from tests.gateway.stack import ADMIN_TOKEN, PEPPER
from tests.inference import models
from tests.inference.conftest import Registry, inference_args, wait_model
from tests.support.procs import REPO_ROOT, ServiceProcess
from tests.support.servers import PostgresServer, RedisServer

MODEL = "chaos"
# Big enough that a 128-row request keeps a replica busy for a while (the overload scenario),
# small enough that single rows cost nothing.
SIZES = (4, 1024, 1024, 3)
MAX_BATCH = 128
# A replica refuses requests past this queue (RESOURCE_EXHAUSTED) and times out any that waited
# longer than QUEUE_TIMEOUT_US (UNAVAILABLE, as Triton; DEADLINE_EXCEEDED at c9db8bd when the
# caller's deadline is longer, which the gateway does not retry): both send the gateway elsewhere.
MAX_QUEUE = 16
QUEUE_TIMEOUT_US = 1_000_000
# Small, so a feed that was away for a few dozen changes must take a whole new snapshot.
FEED_RETENTION = 50
FOLLOW = "production,canary"


@dataclasses.dataclass
class Fleet:
    directory: Path
    redis: RedisServer
    database_url: str
    registry_proc: ServiceProcess
    registry: Registry
    monitor: ServiceProcess
    replicas: list[ServiceProcess]
    feed_proxies: list[FaultProxy]
    gateways: list[ServiceProcess]
    versions: list[models.Artifact]
    token: str = ""

    @property
    def gateway_addresses(self) -> list[str]:
        return [g.address for g in self.gateways]

    def processes(self) -> dict[str, ServiceProcess]:
        named = {"registry": self.registry_proc, "monitor": self.monitor}
        named.update({f"inference-{i}": p for i, p in enumerate(self.replicas)})
        named.update({f"gateway-{i}": p for i, p in enumerate(self.gateways)})
        return named

    def dead(self) -> dict[str, str]:
        """Processes of the fleet that are no longer running, with the tail of their logs."""
        found = {name: p.log()[-1500:] for name, p in self.processes().items()
                 if p.proc is None or p.proc.poll() is not None}
        if self.redis.proc is None or self.redis.proc.poll() is not None:
            found["redis"] = "redis-server exited"
        return found

    def restart_replica(self, index: int) -> ServiceProcess:
        """A new inference process on the replica's port, with its arguments; returns once it serves."""
        old = self.replicas[index]
        new = ServiceProcess("inference", old.args, port=old.port)
        self.replicas[index] = new.start(timeout=180)
        wait_model(new, MODEL, timeout=180)
        return new

    def restart_registry(self) -> ServiceProcess:
        old = self.registry_proc
        self.registry_proc = ServiceProcess("registry", old.args, port=old.port).start(timeout=120)
        self.registry.proc = self.registry_proc
        return self.registry_proc

    def restart_redis(self) -> None:
        """redis-server again on the same port (empty: it keeps nothing on disk)."""
        self.redis.start()

    def served_by(self, index: int) -> int:
        """Requests replica `index` has answered for the model, every version together."""
        with tc.InferenceServerClient(self.replicas[index].address) as client:
            stats = client.get_inference_statistics(MODEL, as_json=True)
        return sum(int(m.get("inference_stats", {}).get("success", {}).get("count", 0))
                   for m in stats.get("model_stats", []))

    def close(self) -> None:
        for proc in [*self.gateways, *self.replicas, self.monitor, self.registry_proc]:
            proc.stop(timeout=20)
        for proxy in self.feed_proxies:
            proxy.close()
        self.registry.close()
        self.redis.close()


def answer(address: str, token: str) -> str:
    """What the gateway at `address` answers `token` for one request: "OK" or the status name."""
    tensor = tc.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4), np.float32))
    with tc.InferenceServerClient(address) as client:
        try:
            client.infer(MODEL, [tensor], headers={"authorization": f"Bearer {token}"}, client_timeout=5)
        except InferenceServerException as exc:
            return status_of(exc)
    return "OK"


def registry_args(database_url: str, directory: Path) -> list[str]:
    return ["--database-url", database_url, "--artifact-dir", str(directory / "artifacts"),
            "--feed-retention", str(FEED_RETENTION), "--grace-period-s", "2"]


def gateway_args(registry_url: str, replicas: list[ServiceProcess], redis: RedisServer, monitor: str) -> list[str]:
    # Quotas on every key (high enough never to refuse) so every request goes through Redis.
    return ["--registry-url", registry_url, "--inference-targets", ",".join(r.address for r in replicas),
            "--key-pepper", PEPPER, "--bootstrap-admin-key", ADMIN_TOKEN, "--grace-period-s", "2",
            "--eject-base-s", "0.5", "--redis-url", redis.url, "--redis-timeout-ms", "500",
            "--gateway-replicas", "2", "--default-key-rps", "100000", "--monitor-url", monitor]


def register(registry: Registry, artifact: models.Artifact, alias: str | None = None) -> int:
    return registry.register(MODEL, artifact, max_batch_size=MAX_BATCH, max_queue_delay_us=500,
                             max_queue_size=MAX_QUEUE, default_timeout_us=QUEUE_TIMEOUT_US, alias=alias)


def start_fleet(directory: Path, postgres: PostgresServer) -> Fleet:
    """Start every part and wait until the whole fleet serves the model through both gateways."""
    redis = RedisServer().start()
    started: list[ServiceProcess] = []
    proxies: list[FaultProxy] = []
    try:
        database_url = postgres.create_database("chaos_registry")
        registry_proc = ServiceProcess("registry", registry_args(database_url, directory)).start(timeout=120)
        started.append(registry_proc)
        registry = Registry(registry_proc)
        versions = [models.write_mlp(_folder(directory / f"v{seed}"), "torchscript", sizes=SIZES, seed=seed)
                    for seed in (1, 2, 3)]
        register(registry, versions[0], alias="production")

        monitor = ServiceProcess("monitor", ["--registry-url", registry.address, "--redis-url", redis.url,
                                             "--metrics-port", "0", "--grace-period-s", "1"])
        replicas = [ServiceProcess("inference", inference_args(
            registry, directory / f"cache-{i}", "--worker-mode", "thread", "--monitor-url", monitor.address,
            follow=FOLLOW)) for i in range(2)]
        for proc in (monitor, *replicas):
            started.append(proc.start(wait=False))
        monitor.wait_ready(timeout=120)
        for replica in replicas:
            replica.wait_ready(timeout=180)
            wait_model(replica, MODEL, timeout=180)

        proxies = [FaultProxy(registry_proc.port).start() for _ in range(2)]
        gateways = [ServiceProcess("gateway", gateway_args(p.address, replicas, redis, monitor.address))
                    for p in proxies]
        for gateway in gateways:
            started.append(gateway.start(wait=False))
        for gateway in gateways:
            gateway.wait_ready(timeout=120)
        fleet = Fleet(directory, redis, database_url, registry_proc, registry, monitor, replicas, proxies, gateways,
                      versions)
        with GatewayClient(gateways[0].address, api_key=ADMIN_TOKEN) as admin:
            _, fleet.token = admin.create_key("chaos-load", models=[MODEL], roles=["infer", "read"])
        return fleet
    except BaseException:
        for proc in reversed(started):
            proc.kill()
        for proxy in proxies:
            proxy.close()
        redis.close()
        raise


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_flood(target: str, *, seconds: float, concurrency: int, rows: int) -> subprocess.Popen[str]:
    """The overload: `python -m tests.chaos.flood` straight at one replica, in a process of its own
    (so its work does not slow the test's own load); its JSON result comes on stdout."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.chaos.flood", "--target", target, "--model", MODEL,
         "--seconds", str(seconds), "--concurrency", str(concurrency), "--rows", str(rows)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
