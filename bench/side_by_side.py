"""aiaas side by side with Triton (PyTriton), TorchServe and MLServer, on one machine, in one run.

    python -m bench.side_by_side [--short] [--servers ...] [--out bench/results/side_by_side.md]
    make bench-peers            # the same, full length

Every peer comes from its own package, in a throwaway virtual environment under the cache directory
(`--cache-dir`, default ~/.cache/aiaas/bench-peers; reused when it imports what it needs):
nvidia-pytriton (Triton Inference Server inside), torchserve + torch-model-archiver (needs Java
11+), mlserver (with uvloop<0.22: MLServer 1.7.1's workers die with later uvloop). A peer that
cannot be installed or started is reported as such, with the reason, and left out of the table.

Every server serves the same two TorchScript files, built once here by `bench_inference.build_mlp`
(seed 0): tiny 10-50-10 and heavy 256-2048-2048-256, FP32. Every server: dynamic batching up to 32
rows with a 2 ms queue delay, one model instance, `--torch-threads` intra-op threads (default 2).
aiaas runs as bench/bench_inference.py runs it (registry + inference as real processes), plus a
gateway in front of it (an API key; a second one with `--processes` and a third with merging off,
`--merge-max-in-flight 0`, the gateway as it was before merging) and a second inference replica that
delegates both models to the Triton server above (`--triton-backends`): the delegating path next to
Triton directly.

Every server gets the same load: `bench.lean_client` (a bare grpc.aio channel, pre-serialized
single-row requests, closed loop) at concurrency 1, 16 and 64. The servers run at the same time and
the runs are interleaved (each repetition cycles through every server, starting one further on), so
a neighbour's burst on a shared machine hits them alike; the median repetition is reported. Before
each run the machine's busy cores over half a second are recorded (our servers sit idle then); a
run that started on a machine more than 0.5 cores busy is flagged, and the load average before and
after is printed with the table. Before any load, each server's answer to a 3-row request is
compared with the model run in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import lean_client
from bench.bench_inference import build_mlp, register
from services.common.cpus import available_cores

MODELS = {"tiny": (10, 50, 10), "heavy": (256, 2048, 2048, 256)}
CONCURRENCY = (1, 16, 64)
FULL: dict[str, Any] = {"requests": (300, 2000, 4000), "reps": 3, "cap_s": 10.0, "warmup": 100}
SHORT: dict[str, Any] = {"requests": (150, 600, 1200), "reps": 1, "cap_s": 5.0, "warmup": 50}
MAX_BATCH = 32
QUEUE_DELAY_US = 2000
BUSY_CORES = 0.5
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "side_by_side.md"

# Columns, in table order: label -> heading.
COLUMNS = {
    "aiaas": "aiaas inference",
    "single": "aiaas inference, 1 process",
    "gateway": "aiaas via gateway",
    "gateways": "aiaas via gateway, {v} processes",
    "unmerged": "aiaas via gateway, merging off",
    "delegating": "aiaas -> Triton (delegating)",
    "triton": "Triton (PyTriton {v})",
    "torchserve": "TorchServe {v} (gRPC)",
    "mlserver": "MLServer {v}",
}
PEER_PACKAGES = {
    # venv name: (pip install steps, import probe, package whose version is shown)
    "pytriton": ([["torch==2.13.0"], ["nvidia-pytriton==0.7.0"]], "import pytriton, torch", "nvidia-pytriton"),
    "torchserve": ([["torch==2.13.0"], ["torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml", "numpy"]],
                   "import ts, torch, yaml", "torchserve"),
    "mlserver": ([["torch==2.13.0"], ["mlserver==1.7.1", "uvloop<0.22"]], "import mlserver, torch, uvloop", "mlserver"),
}
PIP_TIMEOUT_S = 1200


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Unavailable(Exception):
    """A peer that cannot be installed or started here; the message says why."""


# ---- the machine ---------------------------------------------------------------------------------


def busy_cores(seconds: float = 0.5) -> float:
    def sample() -> tuple[float, float]:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
        return sum(fields) - idle, time.monotonic()

    (busy0, t0) = sample()
    time.sleep(seconds)
    (busy1, t1) = sample()
    return (busy1 - busy0) / os.sysconf("SC_CLK_TCK") / (t1 - t0)


def cpus() -> float:
    """The cores this process may use: the cgroup's CPU limit when it has one, else the affinity mask."""
    count = float(len(os.sched_getaffinity(0)))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, int(quota) / int(period))
    return count


# ---- virtual environments ------------------------------------------------------------------------


def ensure_venv(cache: Path, name: str) -> Path:
    """The venv's python; created (or completed) when it cannot import what the peer needs."""
    steps, probe, _ = PEER_PACKAGES[name]
    venv = cache / name
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", probe], check=False, capture_output=True, timeout=120).returncode == 0:
        log(f"{name}: reusing {venv}")
        return python
    log(f"{name}: creating {venv} (a few minutes)")
    if not python.exists():
        subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True, timeout=300)
    for packages in steps:
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=False,
                              capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        if done.returncode != 0:
            tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise Unavailable(f"pip install {' '.join(packages)} failed: {tail[-400:]}")
    if subprocess.run([str(python), "-c", probe], check=False, capture_output=True, timeout=120).returncode != 0:
        raise Unavailable(f"installed, but `{probe}` fails in {venv}")
    return python


def _base_python() -> str:
    """The interpreter this venv was made from (a peer venv must not inherit aiaas's packages)."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base) if base.exists() else "python3"


def package_version(python: Path, package: str) -> str:
    done = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                          check=False, capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or "?"


def java_major() -> int:
    java = shutil.which("java")
    if java is None:
        raise Unavailable("TorchServe needs Java 11+; no `java` on PATH")
    text = subprocess.run([java, "-version"], check=False, capture_output=True, text=True, timeout=60).stderr
    try:
        version = text.split('"')[1]
        major = int(version.split(".")[1] if version.startswith("1.") else version.split(".")[0])
    except (IndexError, ValueError):
        raise Unavailable(f"TorchServe needs Java 11+; cannot read `java -version`: {text[:200]}") from None
    if major < 11:
        raise Unavailable(f"TorchServe needs Java 11+; found Java {major}")
    return major


# ---- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    from tests.support.servers import free_port as pick

    return pick()


class Process:
    """A peer server started in its own process group, so that stopping it stops what it spawned."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-1500:]
            raise Unavailable(f"{self.name} exited with {self.proc.returncode}: {tail}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # what the leader left behind in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def wait_for(what: str, ready: Callable[[], bool], process: Process | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            process.check_alive()
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.5)
    raise Unavailable(f"{what} not ready after {timeout:.0f}s" + (f"; log: {process.log_path}" if process else ""))


def kserve_ready(address: str, models: list[str]) -> Callable[[], bool]:
    def ready() -> bool:
        import tritonclient.grpc as tc

        with tc.InferenceServerClient(address) as client:
            return all(client.is_model_ready(m) for m in models)

    return ready


def start_pytriton(python: Path, files: dict[str, Path], work: Path, threads: int) -> tuple[Process, str]:
    libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            check=False, capture_output=True, text=True, timeout=60).stdout.strip()
    grpc_port = free_port()
    argv = [str(python), str(HERE / "peers" / "pytriton_server.py"), "--grpc-port", str(grpc_port),
            "--http-port", str(free_port()), "--metrics-port", str(free_port()), "--threads", str(threads),
            "--max-batch", str(MAX_BATCH), "--queue-delay-us", str(QUEUE_DELAY_US)]
    argv += [f"{name}={files[name]}:{MODELS[name][0]}:{MODELS[name][-1]}" for name in files]
    env = {"LD_LIBRARY_PATH": libdir + (":" + os.environ["LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH") else "")}
    process = Process("triton", argv, work / "pytriton.log", env=env, cwd=work)
    address = f"127.0.0.1:{grpc_port}"
    try:
        wait_for("Triton (PyTriton)", kserve_ready(address, list(files)), process, 240)
    except BaseException:
        process.stop()
        raise
    return process, address


def start_torchserve(python: Path, files: dict[str, Path], work: Path, threads: int) -> tuple[Process, str]:
    java_major()
    bindir = python.parent
    store = work / "torchserve-store"
    tmp = work / "torchserve-tmp"
    for folder in (store, tmp):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for name, path in files.items():
        config = work / f"{name}-config.yaml"
        config.write_text(f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {MAX_BATCH}\n"
                          f"maxBatchDelay: {max(1, QUEUE_DELAY_US // 1000)}\nresponseTimeout: 120\n")
        subprocess.run([str(bindir / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
                        "--serialized-file", str(path), "--handler", str(HERE / "peers" / "torchserve_handler.py"),
                        "--config-file", str(config), "--export-path", str(store), "--force"],
                       check=True, capture_output=True, timeout=300)
    ports = {key: free_port() for key in ("http", "mgmt", "metrics", "grpc", "grpc_mgmt")}
    properties = work / "torchserve.properties"
    properties.write_text("\n".join([
        f"inference_address=http://127.0.0.1:{ports['http']}", f"management_address=http://127.0.0.1:{ports['mgmt']}",
        f"metrics_address=http://127.0.0.1:{ports['metrics']}", "grpc_inference_address=127.0.0.1",
        "grpc_management_address=127.0.0.1", f"grpc_inference_port={ports['grpc']}",
        f"grpc_management_port={ports['grpc_mgmt']}", "enable_grpc_ssl=false", f"model_store={store}",
        "load_models=" + ",".join(f"{name}.mar" for name in files), "default_workers_per_model=1",
        "disable_system_metrics=true", "enable_metrics_api=false", "async_logging=true",
        "disable_token_authorization=true", "enable_envvars_config=false", "job_queue_size=1000",
        "install_py_dep_per_model=false", "vmargs=-XX:-UsePerfData -XX:+UseG1GC -XX:MaxRAMPercentage=25",
    ]) + "\n")
    env = {"TMPDIR": str(tmp), "TEMP": str(tmp), "SBS_TORCH_THREADS": str(threads), "LOG_LOCATION": str(work / "ts-logs"),
           "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
    process = Process("torchserve", [str(bindir / "torchserve"), "--start", "--foreground", "--ncs",
                                     "--ts-config", str(properties), "--model-store", str(store)],
                      work / "torchserve.log", env=env, cwd=work)
    address = f"127.0.0.1:{ports['grpc']}"

    def ready() -> bool:
        for name in files:
            target = lean_client.Target("torchserve", address, name, MODELS[name][0], protocol="torchserve")
            asyncio.run(lean_client.check(target, np.zeros((1, MODELS[name][0]), np.float32)))
        return True

    try:
        wait_for("TorchServe", ready, process, 240)
    except BaseException:
        process.stop()
        raise
    return process, address


def start_mlserver(python: Path, files: dict[str, Path], work: Path, threads: int) -> tuple[Process, str]:
    models = work / "mlserver-models"
    run_dir = work / "mlserver-run"
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = {key: free_port() for key in ("http", "grpc", "metrics")}
    (models / "settings.json").write_text(json.dumps({
        "debug": False, "host": "127.0.0.1", "http_port": ports["http"], "grpc_port": ports["grpc"],
        "metrics_port": ports["metrics"], "metrics_dir": str(run_dir / ".metrics"),
        "environments_dir": str(run_dir / ".envs"), "parallel_workers": 1, "load_models_at_startup": True}))
    for name, path in files.items():
        (models / name).mkdir()
        (models / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_runtime.TorchMLP", "max_batch_size": MAX_BATCH,
            "max_batch_time": QUEUE_DELAY_US / 1e6, "parameters": {"uri": str(path)},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, MODELS[name][0]]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, MODELS[name][-1]]}]}))
    env = {"PYTHONPATH": str(HERE / "peers"), "PYTHONDONTWRITEBYTECODE": "1", "SBS_TORCH_THREADS": str(threads)}
    env.update({k: "" for k in os.environ if k.startswith("MLSERVER_")})
    process = Process("mlserver", [str(python.parent / "mlserver"), "start", str(models)], work / "mlserver.log",
                      env=env, cwd=run_dir)
    address = f"127.0.0.1:{ports['grpc']}"
    try:
        wait_for("MLServer", kserve_ready(address, list(files)), process, 240)
    except BaseException:
        process.stop()
        raise
    return process, address


class Aiaas:
    """Registry, inference and gateway as bench/ starts them; a delegating replica once Triton is up."""

    def __init__(self, files: dict[str, Path], work: Path, threads: int, frontends: int = 0,
                 merge_max_in_flight: int | None = None) -> None:
        from tests.gateway.stack import ADMIN_TOKEN, PEPPER
        from tests.support.procs import ServiceProcess

        self._started: list[Any] = []
        self.redis: Any = None
        self.gateways: Any = None
        self.unmerged: Any = None
        self.registry = self._start(ServiceProcess("registry", args=[
            "--database-url", f"sqlite:///{work}/registry.db", "--artifact-dir", str(work / "artifacts"),
            "--log-level", "warning"]))
        for name, path in files.items():
            register(self.registry.address, name, path, MODELS[name], MAX_BATCH, QUEUE_DELAY_US)
        self.inference = self._start(ServiceProcess("inference", args=[
            "--registry-url", self.registry.address, "--model-cache-dir", str(work / "cache"),
            "--torch-threads", str(threads), "--frontends", str(frontends), "--log-level", "warning"]), timeout=300)
        for name in files:
            self.inference.wait_ready(name, timeout=300)
        self.single: Any = None
        self._threads = threads
        self.gateway = self._start(ServiceProcess("gateway", args=[
            "--registry-url", self.registry.address, "--inference-targets", self.inference.address,
            "--key-pepper", PEPPER, "--bootstrap-admin-key", ADMIN_TOKEN, "--grace-period-s", "2",
            *([] if merge_max_in_flight is None else ["--merge-max-in-flight", str(merge_max_in_flight)]),
            "--log-level", "warning"]), timeout=120)
        from aiaas.gateway_client import GatewayClient

        with GatewayClient(self.gateway.address, api_key=ADMIN_TOKEN) as admin:
            _, self.token = admin.create_key("bench", models=list(files), roles=["infer"])
        self.delegating: Any = None
        self._work = work

    def _start(self, service: Any, timeout: float = 90.0) -> Any:
        self._started.append(service)
        return service.start(timeout=timeout)

    def start_gateways(self, processes: int) -> None:
        """A second gateway like the first, on `processes` processes (they share quotas through Redis)."""
        from tests.gateway.stack import PEPPER
        from tests.support.procs import ServiceProcess
        from tests.support.servers import RedisServer

        self.redis = RedisServer().start()
        self.gateways = self._start(ServiceProcess("gateway", args=[
            "--registry-url", self.registry.address, "--inference-targets", self.inference.address,
            "--key-pepper", PEPPER, "--grace-period-s", "2", "--redis-url", self.redis.url,
            "--processes", str(processes), "--log-level", "warning"]), timeout=120)

    def start_unmerged(self) -> None:
        """A gateway like the first that forwards every request on its own (`--merge-max-in-flight 0`)."""
        from tests.gateway.stack import PEPPER
        from tests.support.procs import ServiceProcess

        self.unmerged = self._start(ServiceProcess("gateway", args=[
            "--registry-url", self.registry.address, "--inference-targets", self.inference.address,
            "--key-pepper", PEPPER, "--grace-period-s", "2", "--merge-max-in-flight", "0",
            "--log-level", "warning"]), timeout=120)

    def start_single(self, models: list[str]) -> None:
        """A second inference replica of the same versions that accepts in one process (`--frontends 1`)."""
        from tests.support.procs import ServiceProcess

        self.single = self._start(ServiceProcess("inference", args=[
            "--registry-url", self.registry.address, "--model-cache-dir", str(self._work / "cache-single"),
            "--torch-threads", str(self._threads), "--frontends", "1", "--log-level", "warning"]), timeout=300)
        for name in models:
            self.single.wait_ready(name, timeout=300)

    def start_delegating(self, triton: str, models: list[str], max_in_flight: int) -> None:
        from tests.support.procs import ServiceProcess

        backends = self._work / "triton-backends.json"
        backends.write_text(json.dumps({m: {"url": triton, "model_name": m, "max_in_flight": max_in_flight}
                                          for m in models}))
        self.delegating = self._start(ServiceProcess("inference", args=[
            "--follow-aliases", "", "--registry-url", "", "--triton-backends", str(backends),
            "--model-cache-dir", str(self._work / "cache-delegating"), "--log-level", "warning"]), timeout=120)
        for name in models:
            self.delegating.wait_ready(name, timeout=120)

    def stop(self) -> None:
        for service in reversed(self._started):
            with contextlib.suppress(Exception):
                service.stop()
        if self.redis is not None:
            self.redis.close()


# ---- the run -------------------------------------------------------------------------------------


PEER_START = {"triton": ("pytriton", start_pytriton), "torchserve": ("torchserve", start_torchserve),
              "mlserver": ("mlserver", start_mlserver)}


def start_peers(servers: list[str], cache: Path, files: dict[str, Path], work: Path, threads: int,
                processes: list[Process], targets: dict[str, dict[str, lean_client.Target]], versions: dict[str, str],
                unavailable: dict[str, str], pids: dict[str, list[int]]) -> str:
    """Install (or reuse) and start the peers asked for; returns Triton's address ("" without it).
    `pids` gets each started peer's process (its tree is the server's CPU)."""
    triton_address = ""
    for label in ("triton", "torchserve", "mlserver"):
        if label not in servers and not (label == "triton" and "delegating" in servers):
            continue
        venv, start = PEER_START[label]
        try:
            python = ensure_venv(cache, venv)
            versions[label] = package_version(python, PEER_PACKAGES[venv][2])
            log(f"starting {label}")
            process, address = start(python, files, work, threads)
        except (Unavailable, subprocess.SubprocessError, OSError) as exc:
            unavailable[label] = str(exc)[:600]
            log(f"{label} not available: {exc}")
            continue
        processes.append(process)
        pids[label] = [process.proc.pid]
        if label == "triton":
            triton_address = address
        if label in servers:
            protocol = "torchserve" if label == "torchserve" else "kserve"
            targets[label] = {m: lean_client.Target(label, address, m, MODELS[m][0], protocol=protocol)
                              for m in files}
    return triton_address


def reference(files: dict[str, Path], x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    from aiaas.artifact_gate import load_torchscript

    out = {}
    with torch.inference_mode():
        for name, path in files.items():
            out[name] = load_torchscript(str(path)).eval()(torch.from_numpy(x[name])).numpy()
    return out


def check_answers(targets: dict[str, dict[str, lean_client.Target]], files: dict[str, Path],
                  wrong: dict[str, str]) -> None:
    """Every server's answer to one 3-row request, against the model run here; a wrong one is left out."""
    rng = np.random.default_rng(7)
    x = {m: rng.standard_normal((3, MODELS[m][0]), dtype=np.float32) for m in files}
    expected = reference(files, x)
    for label in list(targets):
        for model, target in targets[label].items():
            try:
                got = asyncio.run(lean_client.check(target, x[model]))
                np.testing.assert_allclose(got, expected[model], rtol=1e-4, atol=1e-5)
            except Exception as exc:  # noqa: BLE001 - reported, the server is left out
                wrong[label] = f"{model}: {str(exc)[:300]}"
                del targets[label]
                break


def requests_at(level: int, plan: dict[str, Any]) -> int:
    """Requests per run at a concurrency level: the plan's count for the largest default level at
    or below it (so `--concurrency 64` alone runs as long as 64 does in the full set)."""
    counts = dict(zip(CONCURRENCY, plan["requests"], strict=True))
    return counts[max([c for c in CONCURRENCY if c <= level] or [CONCURRENCY[0]])]


def measure(targets: dict[str, dict[str, lean_client.Target]], models: list[str], levels: list[int],
            plan: dict[str, Any], connections: int = 1, pids: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """Each point's runs alternate the servers; a row holds the median run's figures, and the
    median of the server CPU per request over the runs (the server's processes; `pids`)."""
    rows = []
    labels = list(targets)
    for name in models:
        for level in levels:
            requests = requests_at(level, plan)
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
            for rep in range(plan["reps"]):
                order = labels[rep % len(labels):] + labels[:rep % len(labels)]
                for label in order:
                    before = busy_cores()
                    load0 = os.getloadavg()[0]
                    result = asyncio.run(lean_client.run(targets[label][name], level, requests,
                                                         warmup=plan["warmup"], cap_s=plan["cap_s"],
                                                         connections=min(connections, level),
                                                         server_pids=(pids or {}).get(label, ())))
                    result.update(busy_before=before, load_before=load0, load_after=os.getloadavg()[0],
                                  rep=rep + 1, label=label)
                    runs[label].append(result)
                    log(f"{name} c={level} {label:<10} {result['rps']:7.0f} req/s  p50 {result['p50_ms']:6.2f} ms  "
                        f"errors {result['errors']}  busy before {before:.2f} cores"
                        + ("  BUSY" if before > BUSY_CORES else ""))
            for label, results in runs.items():
                ordered = sorted(results, key=lambda r: r["rps"])
                median = ordered[len(ordered) // 2]
                cpu = sorted(r["server_cpu_us"] for r in results if r.get("server_cpu_us") is not None)
                rows.append({
                    "model": name, "concurrency": level, "label": label, "rps": median["rps"],
                    "rps_min": ordered[0]["rps"], "rps_max": ordered[-1]["rps"], "p50_ms": median["p50_ms"],
                    "p99_ms": median["p99_ms"], "errors": sum(r["errors"] for r in results),
                    "server_cpu_us": cpu[len(cpu) // 2] if cpu else None,
                    "client_cores": median["client_cores"],
                    "error_samples": [s for r in results for s in r["error_samples"]][:3],
                    "busy_runs": sum(r["busy_before"] > BUSY_CORES for r in results), "runs": len(results),
                    "max_busy_before": max(r["busy_before"] for r in results)})
    return rows


def render(rows: list[dict[str, Any]], headings: dict[str, str], info: dict[str, Any]) -> str:
    labels = [label for label in COLUMNS if label in headings]
    cell: dict[tuple[str, int, str], dict[str, Any]] = {(r["model"], r["concurrency"], r["label"]): r for r in rows}
    points = list(dict.fromkeys((r["model"], r["concurrency"]) for r in rows))

    def fmt(row: dict[str, Any] | None) -> str:
        if row is None:
            return "-"
        text = f"{row['rps']:,.0f} ({row['p50_ms']:.2f})"
        if row["errors"]:
            text += f" {row['errors']} errors"
        if row["busy_runs"]:
            text += " *"
        return text

    lines = [f"# Side by side, one machine, one run ({info['started']} - {info['finished']} UTC)", "",
             f"Machine: {info['cpus']:g} cores usable ({info['cpu_model']}), {info['mode']} run "
             f"({info['reps']} repetition(s) per point, median shown), torch {info['torch_threads']} threads per "
             f"model instance, max batch {MAX_BATCH}, queue delay {QUEUE_DELAY_US} us, one instance. "
             f"Load average before {info['load_before']}, after {info['load_after']}. "
             f"{info['busy_runs']} of {info['runs']} runs started with the machine more than {BUSY_CORES} cores busy "
             f"(marked *; the busiest {info['max_busy']:.2f} cores): "
             + ("the machine was busy, read the figures as such." if info["busy_runs"] else "a quiet machine."),
             ""]
    if rows:
        lines += [("req/s (p50 ms), the same lean closed-loop gRPC client (`bench/lean_client.py`, callers spread "
                   f"over up to {info['connections']} connections) for every server; aiaas inference with "
                   f"{info['frontends']} processes on its port; * marks a point where a run started on a busy machine"),
                  "",
                  "| model | c | " + " | ".join(headings[label] for label in labels) + " |",
                  "|---|---|" + "---|" * len(labels)]
    else:
        lines.append("No server could be measured in this run.")
    for model, level in points:
        lines.append(f"| {model} | {level} | " + " | ".join(fmt(cell.get((model, level, label))) for label in labels)
                     + " |")
    if rows:
        lines += ["", ("| model | c | aiaas / TorchServe | aiaas / aiaas in 1 process | gateway / aiaas (added p50 ms) | "
                       "gateway, N processes / 1 | gateway / merging off | delegating / Triton (added p50 ms) |"),
                  "|---|---|---|---|---|---|---|---|"]

    def ratio(a: str, b: str, model: str, level: int, added: bool = False) -> str:
        x, y = cell.get((model, level, a)), cell.get((model, level, b))
        if x is None or y is None or not y["rps"]:
            return "-"
        text = f"{x['rps'] / y['rps']:.2f}x"
        return text + f" ({x['p50_ms'] - y['p50_ms']:+.2f})" if added else text

    for model, level in points:
        lines.append(f"| {model} | {level} | {ratio('aiaas', 'torchserve', model, level)} | "
                     f"{ratio('aiaas', 'single', model, level)} | {ratio('gateway', 'aiaas', model, level, True)} | "
                     f"{ratio('gateways', 'gateway', model, level)} | {ratio('gateway', 'unmerged', model, level)} | "
                     f"{ratio('delegating', 'triton', model, level, True)} |")
    if any(r.get("server_cpu_us") is not None for r in rows):
        lines += ["", ("Server CPU per answered request, µs (user + system of the server's processes, all of them, "
                       "over the measured window, from /proc; median of the runs). Through the gateway: the gateway "
                       "and the inference replica together; delegating: the aiaas replica and Triton together. "
                       "The client's own CPU is not in it."),
                  "", "| model | c | " + " | ".join(headings[label] for label in labels) + " |",
                  "|---|---|" + "---|" * len(labels)]
        for model, level in points:
            cpus_at = [cell.get((model, level, label)) for label in labels]
            lines.append(f"| {model} | {level} | " + " | ".join(
                "-" if row is None or row.get("server_cpu_us") is None else f"{row['server_cpu_us']:,.0f}"
                for row in cpus_at) + " |")
    if info["unavailable"]:
        lines += ["", "Not in this run:"]
        lines += [f"- {label}: {reason}" for label, reason in info["unavailable"].items()]
    if info["wrong"]:
        lines += ["", "Left out for wrong answers:"]
        lines += [f"- {label}: {reason}" for label, reason in info["wrong"].items()]
    lines += ["", f"Command: `{info['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="fewer requests, one repetition (a quick run)")
    parser.add_argument("--servers", default=",".join(COLUMNS), help="any of " + ",".join(COLUMNS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--reps", type=int, help="repetitions per point (default: 3, --short: 1)")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--max-in-flight", type=int, default=2,
                        help="the delegating replica's max_in_flight per model (0: no merging)")
    parser.add_argument("--cache-dir", default=os.environ.get("AIAAS_BENCH_CACHE",
                                                              str(Path.home() / ".cache" / "aiaas" / "bench-peers")))
    parser.add_argument("--connections", type=int, default=8,
                        help="TCP connections the client spreads its callers over (at most one per caller)")
    parser.add_argument("--frontends", type=int, default=available_cores(),
                        help="processes on the port of the `aiaas` column (default: one per available core; "
                             "the `single` column always has one)")
    parser.add_argument("--gateway-processes", type=int, default=max(2, available_cores()),
                        help="processes of the `gateways` column's gateway (default: one per available core, "
                             "at least 2; the `gateway` column has one)")
    parser.add_argument("--merge-max-in-flight", type=int, default=None,
                        help="the `gateway` column's --merge-max-in-flight (default: the gateway's own, 1)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the table (markdown); a .json beside it")
    args = parser.parse_args(argv)
    plan = dict(SHORT if args.short else FULL)
    if args.reps:
        plan["reps"] = max(1, args.reps)
    servers = [s for s in args.servers.split(",") if s]
    unknown = set(servers) - set(COLUMNS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    models = [m for m in args.models.split(",") if m]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    if not levels or min(levels) < 1:
        parser.error("--concurrency takes levels of 1 or more")
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC)
    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="aiaas-sbs-"))
    files = {name: work / f"{name}.pt" for name in models}
    for name, path in files.items():
        build_mlp(MODELS[name], path)
    unavailable: dict[str, str] = {}
    wrong: dict[str, str] = {}
    versions: dict[str, str] = {}
    processes: list[Process] = []
    stack: Aiaas | None = None
    targets: dict[str, dict[str, lean_client.Target]] = {}

    def kserve(label: str, address: str, metadata: tuple[tuple[str, str], ...] = ()) -> dict[str, lean_client.Target]:
        return {m: lean_client.Target(label, address, m, MODELS[m][0], metadata=metadata) for m in models}

    try:
        pids: dict[str, list[int]] = {}
        triton_address = start_peers(servers, cache, files, work, args.torch_threads, processes, targets, versions,
                                     unavailable, pids)
        if {"aiaas", "single", "gateway", "gateways", "unmerged", "delegating"} & set(servers):
            log("starting aiaas (registry, inference, gateway)")
            stack = Aiaas(files, work, args.torch_threads, args.frontends, args.merge_max_in_flight)
            inference_pid = stack.inference.proc.pid
            pids["aiaas"] = [inference_pid]
            if "aiaas" in servers:
                targets["aiaas"] = kserve("aiaas", stack.inference.address)
            if "single" in servers:
                stack.start_single(models)
                targets["single"] = kserve("single", stack.single.address)
                pids["single"] = [stack.single.proc.pid]
            pids["gateway"] = [stack.gateway.proc.pid, inference_pid]
            if "gateway" in servers:
                targets["gateway"] = kserve("gateway", stack.gateway.address,
                                            (("authorization", f"Bearer {stack.token}"),))
            if "gateways" in servers:
                stack.start_gateways(args.gateway_processes)
                versions["gateways"] = str(args.gateway_processes)
                pids["gateways"] = [stack.gateways.proc.pid, inference_pid]
                targets["gateways"] = kserve("gateways", stack.gateways.address,
                                             (("authorization", f"Bearer {stack.token}"),))
            if "unmerged" in servers:
                stack.start_unmerged()
                pids["unmerged"] = [stack.unmerged.proc.pid, inference_pid]
                targets["unmerged"] = kserve("unmerged", stack.unmerged.address,
                                             (("authorization", f"Bearer {stack.token}"),))
            if "delegating" in servers:
                if triton_address:
                    stack.start_delegating(triton_address, models, args.max_in_flight)
                    targets["delegating"] = kserve("delegating", stack.delegating.address)
                    pids["delegating"] = [stack.delegating.proc.pid, *pids.get("triton", [])]
                else:
                    unavailable["delegating"] = "needs the Triton peer, which is not available"
        check_answers(targets, files, wrong)
        ordered = {label: targets[label] for label in COLUMNS if label in targets}
        rows = measure(ordered, models, levels, plan, args.connections, pids) if ordered else []
    finally:
        if stack is not None:
            stack.stop()
        for process in processes:
            process.stop()
        shutil.rmtree(work, ignore_errors=True)
    finished = datetime.datetime.now(datetime.UTC)
    headings = {label: COLUMNS[label].format(v=versions.get(label, "")) for label in ordered}
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "?")
    info = {
        "started": started.strftime("%Y-%m-%d %H:%M"), "finished": finished.strftime("%H:%M"), "cpus": cpus(),
        "cpu_model": cpu_model, "mode": "short" if args.short else "full", "reps": plan["reps"],
        "torch_threads": args.torch_threads, "load_before": load_before,
        "load_after": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
        "busy_runs": sum(r["busy_runs"] for r in rows), "runs": sum(r["runs"] for r in rows),
        "max_busy": max((r["max_busy_before"] for r in rows), default=0.0), "unavailable": unavailable,
        "wrong": wrong, "versions": versions, "connections": args.connections,
        "frontends": args.frontends,
        "command": "python -m bench.side_by_side" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
    }
    table = render(rows, headings, info)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    log(f"wrote {out}")
    return 0 if rows and all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
