"""`aiaas up`: registry, inference, monitor and gateway as local processes, plus the demos.

The demos: the classifier `demo` (aiaas/demo.py), its held-out data set `demo-test` and eval
spec (written under `demo/`), and the generative `demo-lm` (aiaas/demo_lm.py), built by a
child process in the background the first time and cached under `demo/`.

State lives in `$AIAAS_HOME` (default `~/.aiaas`): the registry's SQLite file and artifacts, the
inference model cache, the demos' files under `demo/`, and one log per service under `logs/`. A
second `up` with the same home finds the demos already registered and reuses everything. Ctrl-C (or SIGTERM) stops the services
in reverse order (SIGTERM, a grace period, then SIGKILL of the whole process group) and exits 0;
a service that fails to start is reported with the end of its log, and the others are stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiaas.identity import HOME_IDENTITY_DIR, default_home

DEFAULT_PORTS = {"gateway": 8001, "registry": 50051, "inference": 50052, "monitor": 50053, "metrics": 9464,
                 "openai": 8000}
# With --base-port B: gateway B, registry B+1, inference B+2, monitor B+3, Prometheus B+4, the
# gateway's OpenAI-compatible HTTP API B+5.
_BASE_OFFSETS = {"gateway": 0, "registry": 1, "inference": 2, "monitor": 3, "metrics": 4, "openai": 5}
CHILD_GRACE_S = 5.0
IDENTITY_DIR = HOME_IDENTITY_DIR
STOP_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 3000


class StartupFailed(Exception):
    """A service exited or never became healthy; the message carries the end of its log."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while the stack was starting."""


class KeyRefused(Exception):
    """The gateway refused the key the demo is checked with (revoked or expired, e.g. after rotation)."""


def aiaas_home(home: str | None = None) -> Path:
    return Path(home).expanduser().resolve() if home else default_home()


def stack_ports(base_port: int | None) -> dict[str, int]:
    if base_port is None:
        return dict(DEFAULT_PORTS)
    return {name: base_port + offset for name, offset in _BASE_OFFSETS.items()}


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    name: str
    port: int
    args: tuple[str, ...]
    # Secrets travel in the environment, not in flags that `ps` shows.
    env: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class GatewayAuth:
    pepper: str
    admin_key: str
    path: Path


def gateway_auth(home: Path) -> GatewayAuth:
    """Off loopback the gateway keeps authentication on: a pepper and a bootstrap admin key, made
    once and kept (mode 0600) in the home so a second `up` accepts the same keys. The gateway stores
    the bootstrap key (hashed) in the registry at its first start; once revoked (`aiaas keys rotate`)
    it stays refused, though this file still holds it."""
    import json
    import secrets

    from aiaas.api_keys import format_token, new_key_id, new_secret

    path = home / "gateway-auth.json"
    if path.exists():
        data = json.loads(path.read_text())
        return GatewayAuth(data["pepper"], data["admin_key"], path)
    auth = GatewayAuth(secrets.token_hex(32), format_token(new_key_id(), new_secret()), path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pepper": auth.pepper, "admin_key": auth.admin_key}, f)
    return auth


STACK_IDENTITIES = ("registry", "inference", "monitor", "gateway", "admin")


@dataclasses.dataclass(frozen=True)
class StackIdentity:
    """The stack's development identities: a signing key kept in the home (mode 0600) and one
    token per service plus `admin` (what the CLI presents on this machine)."""

    directory: Path
    public_key: Path

    def token_file(self, name: str) -> Path:
        return self.directory / f"{name}.token"


def stack_identity(home: Path, *, ttl_s: float = 30 * 24 * 3600.0) -> StackIdentity:
    """Make the signing key once; mint fresh tokens at every start (so none outlives `ttl_s` of use)."""
    from aiaas.identity import generate_signing_key, mint_token

    directory = home / IDENTITY_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private, public = directory / "signing.key", directory / "signing.pub"
    if not private.exists() or not public.exists():
        private_pem, public_pem = generate_signing_key()
        _write_secret(private, private_pem)
        public.write_bytes(public_pem)
    private_pem = private.read_bytes()
    for name in STACK_IDENTITIES:
        _write_secret(directory / f"{name}.token", mint_token(private_pem, name, ttl_s=ttl_s).encode())
    return StackIdentity(directory, public)


def _write_secret(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def service_plan(home: Path, host: str, ports: dict[str, int], auth: GatewayAuth | None = None,
                 identity: StackIdentity | None = None) -> list[ServiceSpec]:
    """Start order: registry first (the others follow it), gateway last (it forwards to the rest).
    Internal services listen on loopback whatever `host` is; only the gateway (the public door,
    which checks API keys) listens on `host`."""
    local = "127.0.0.1"
    registry = f"{local}:{ports['registry']}"
    monitor = f"{local}:{ports['monitor']}"
    common = ("--host", local, "--grace-period-s", str(CHILD_GRACE_S))

    def identity_env(name: str) -> tuple[tuple[str, str], ...]:
        if identity is None:
            return (("AIAAS_REQUIRE_IDENTITY", "false"),)
        return (("AIAAS_IDENTITY_TOKEN_KEY", str(identity.public_key)),
                ("AIAAS_IDENTITY_TOKEN_FILE", str(identity.token_file(name))))

    plan = [
        ServiceSpec("registry", ports["registry"], (
            *common, "--port", str(ports["registry"]),
            "--database-url", f"sqlite:///{home / 'registry.db'}", "--artifact-dir", str(home / "artifacts"),
        )),
        ServiceSpec("inference", ports["inference"], (
            *common, "--port", str(ports["inference"]), "--registry-url", registry,
            "--follow-aliases", "production,canary", "--model-cache-dir", str(home / "cache" / "models"),
            "--monitor-url", monitor,
        )),
        ServiceSpec("monitor", ports["monitor"], (
            *common, "--port", str(ports["monitor"]), "--registry-url", registry,
            "--metrics-port", str(ports["metrics"]),
        )),
        ServiceSpec("gateway", ports["gateway"], (
            "--host", host, "--grace-period-s", str(CHILD_GRACE_S),
            "--port", str(ports["gateway"]), "--openai-port", str(ports["openai"]), "--registry-url", registry,
            "--inference-targets", f"{local}:{ports['inference']}", "--monitor-url", monitor,
            *(("--no-auth-enabled",) if auth is None else ()),
        ), env=() if auth is None else (
            ("AIAAS_GATEWAY_KEY_PEPPER", auth.pepper), ("AIAAS_GATEWAY_BOOTSTRAP_ADMIN_KEY", auth.admin_key),
        )),
    ]
    return [dataclasses.replace(spec, env=(*spec.env, *identity_env(spec.name))) for spec in plan]


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None


# Resolved before any fork: the child may only call it, never import or load anything.
_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGTERM it if `aiaas up` itself dies (even by SIGKILL).
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildService:
    """One service process in its own session (so Ctrl-C reaches `up` alone), logging to a file."""

    def __init__(self, spec: ServiceSpec, host: str, log_dir: Path, env: dict[str, str]) -> None:
        self.spec = spec
        self.address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{spec.port}"
        self.log_path = log_dir / f"{spec.name}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"\n--- aiaas up: starting {self.spec.name} at {time.ctime()} ---\n".encode())
        self._log.flush()
        # -P and a cwd of our own: a stray `aiaas/` or `services/` folder where the user typed
        # `aiaas up` must not shadow the installed packages.
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", f"services.{self.spec.name}", *self.spec.args],
            cwd=self.log_path.parent, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env={**self.env, **dict(self.spec.env)},
            start_new_session=True,
            preexec_fn=_die_with_parent if _PRCTL is not None else None,  # noqa: PLW1509 - one libc call, preloaded
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        marker = text.rfind("--- aiaas up: starting")
        return (text[marker:] if marker >= 0 else text)[-LOG_TAIL_CHARS:]

    def wait_healthy(self, deadline: float, stop: threading.Event) -> None:
        last = "no answer"
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if stop.is_set():
                    raise Interrupted
                if not self.alive():
                    code = self.proc.returncode if self.proc else None
                    raise StartupFailed(f"{self.spec.name} exited with code {code} while starting")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as exc:
                    last = exc.code().name  # type: ignore[attr-defined]
                stop.wait(0.1)
        raise StartupFailed(f"{self.spec.name} at {self.address} was not healthy in time (last: {last})")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            # Whatever is left in its session (the service itself, or workers it spawned) goes now.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None


@contextlib.contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """One `aiaas up` per home: a second one would fight the first over SQLite and ports."""
    lock_path = home / "up.lock"
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read().strip() or "?"
            raise StartupFailed(f"another `aiaas up` (pid {pid}) is running with {home}; stop it first") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for name, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # As the gRPC servers do: a port with connections in TIME_WAIT is still free to listen on.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                raise StartupFailed(
                    f"port {port} ({name}) on {host} is in use: stop what holds it, or pick other ports "
                    f"with `aiaas up --base-port N`"
                ) from None


def ensure_demo(registry: str, fmt: str | None = None) -> str:
    """Register the demo once (as `fmt`, default `DEMO_FORMAT`: torch.export); a later `up` finds it.
    Returns a line saying which it was."""
    from aiaas.demo import DEMO_FORMAT, DEMO_MODEL, DEMO_SERVING, example_input, train_demo
    from aiaas.pipeline.artifacts import ArtifactFormat
    from aiaas.pipeline.publish import Publisher
    from aiaas.pipeline.steps import export_candidate

    with Publisher(registry, actor="aiaas-up") as publisher:
        try:
            model = publisher.get_model(DEMO_MODEL)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                raise
        else:
            if "production" in model.aliases:
                return f"{DEMO_MODEL}: reusing version {model.aliases['production']} (production)"
            if model.latest_version:
                publisher.set_alias(DEMO_MODEL, "production", model.latest_version, reason="aiaas up")
                return f"{DEMO_MODEL}: production -> latest version {model.latest_version}"
        export_format = ArtifactFormat.parse(fmt or DEMO_FORMAT)
        trained = train_demo()
        candidate = export_candidate(trained.module, example_input(), export_format, serving=DEMO_SERVING)
        version = publisher.upload(DEMO_MODEL, candidate, {
            "source": "aiaas up", "description": "tutorial MLP 10-50-10 on a synthetic 10-class task",
            "accuracy": round(trained.accuracy, 4), "train_steps": trained.steps,
        })
        publisher.set_alias(DEMO_MODEL, "production", version.version, reason="aiaas up: demo model")
    return (f"{DEMO_MODEL}: trained for {trained.train_seconds:.1f}s (accuracy {trained.accuracy:.1%}), "
            f"registered version {version.version} ({export_format.value}), production -> {version.version}")


@dataclasses.dataclass(frozen=True)
class DemoEval:
    line: str
    spec: Path | None


def ensure_demo_eval(registry: str, home: Path) -> DemoEval:
    """Write the demo's held-out set and eval spec under `home/demo/` and register the set as
    `demo-test` (identical bytes each time, so a later `up` finds it deduplicated)."""
    from aiaas.demo import DEMO_DATASET, DEMO_LABEL, DEMO_MODEL, DEMO_TEST_ROWS, write_demo_eval
    from aiaas.registry_client import RegistryClient, RegistryError

    files = write_demo_eval(home / "demo")
    try:
        from aiaas.eval import registry_io
    except ImportError as exc:  # the `eval` extra is missing
        return DemoEval(f"{DEMO_DATASET}: not registered ({exc.name} is missing: pip install 'aiaas[eval]')", None)
    with RegistryClient(registry, actor="aiaas-up") as client:
        try:
            _, deduplicated = registry_io.upload_dataset(
                client, DEMO_DATASET, files.dataset, labels=[DEMO_LABEL], model=DEMO_MODEL,
                description=f"held-out examples of the demo's task ({DEMO_TEST_ROWS} rows; aiaas up)")
        except RegistryError as exc:
            return DemoEval(f"{DEMO_DATASET}: not registered: {exc}", None)
    what = "already registered" if deduplicated else f"registered ({DEMO_TEST_ROWS} held-out rows)"
    return DemoEval(f"{DEMO_DATASET}: {what} from {files.dataset}; eval spec {files.spec}", files.spec)


class DemoLMBuilder(threading.Thread):
    """Registers the generative demo `demo-lm` in the background: from the registry when it is
    there, else from the checkpoint cached under `home/demo/`, else trained now (tens of seconds)
    by a child process (`python -m aiaas.demo_lm`, log in `logs/demo-lm.log`), stopped with `up`."""

    def __init__(self, registry: str, home: Path, steps: int | None, stop: threading.Event,
                 env: dict[str, str]) -> None:
        super().__init__(name="demo-lm", daemon=True)
        self.registry, self.home, self.steps, self.stop, self.env = registry, home, steps, stop, env

    def run(self) -> None:
        from aiaas.demo_lm import BuildStopped

        try:
            line = self.register()
        except BuildStopped:  # `up` is stopping
            return
        except Exception as exc:  # noqa: BLE001 - reported; the stack keeps serving without it
            print(f"aiaas up: demo-lm not registered: {exc}", file=sys.stderr, flush=True)
            return
        if not self.stop.is_set():
            _say("  " + line)

    def register(self) -> str:
        from aiaas.demo_lm import DEMO_LM_MODEL
        from aiaas.lm import deploy_lm
        from aiaas.pipeline.publish import Publisher

        with Publisher(self.registry, actor="aiaas-up") as publisher:
            try:
                model = publisher.get_model(DEMO_LM_MODEL)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                    raise
            else:
                if "production" in model.aliases:
                    return f"{DEMO_LM_MODEL}: reusing version {model.aliases['production']} (production)"
        built = self.build()
        version = deploy_lm(built["directory"], name=DEMO_LM_MODEL, registry=self.registry, actor="aiaas-up",
                            metadata={"description": "tiny Llama trained on the project's docs (aiaas up)",
                                      "parameters": built["parameters"], "train_steps": built["steps"],
                                      "final_loss": round(built["final_loss"], 4)})
        how = (f"cached checkpoint {Path(built['directory']).name}" if built["cached"] else
               f"trained {built['parameters'] / 1e6:.2f}M parameters for {built['train_seconds']:.1f}s "
               f"({built['steps']} steps, loss {built['final_loss']:.2f})")
        return f"{DEMO_LM_MODEL}: {how}, registered version {version.version} (hf_causal_lm), production -> {version.version}"

    def build(self) -> dict[str, Any]:
        import json

        from aiaas.demo_lm import BuildStopped

        log_path = self.home / "logs" / "demo-lm.log"
        steps = () if self.steps is None else ("--steps", str(self.steps))
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "aiaas.demo_lm", "--cache-root", str(self.home / "demo"), *steps],
                cwd=log_path.parent, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=self.env,
                start_new_session=True, preexec_fn=_die_with_parent if _PRCTL is not None else None,  # noqa: PLW1509
            )
            try:
                while proc.poll() is None:
                    if self.stop.wait(0.2):
                        raise BuildStopped
                out = proc.stdout.read() if proc.stdout is not None else b""
            finally:
                if proc.poll() is None:
                    proc.terminate()  # it removes its half-built folder
                    try:
                        proc.wait(CHILD_GRACE_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        lines = out.decode(errors="replace").strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"building it failed (exit code {proc.returncode}); see {log_path}")
        return dict(json.loads(lines[-1]))


def wait_model_ready(gateway: str, model: str, deadline: float, stop: threading.Event,
                     api_key: str | None = None) -> list[float]:
    """Poll the gateway until the model answers a real inference; returns that answer's first row.
    KeyRefused at once when the gateway says the key is not (or no longer) valid."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from aiaas.demo import DEMO_FEATURES, DEMO_INPUT, DEMO_OUTPUT

    client = grpcclient.InferenceServerClient(gateway)
    x = np.ones((1, DEMO_FEATURES), np.float32)
    last = "no answer"
    try:
        while time.monotonic() < deadline:
            if stop.is_set():
                raise Interrupted
            try:
                inp = grpcclient.InferInput(DEMO_INPUT, list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                headers = {"authorization": f"Bearer {api_key}"} if api_key else None
                result = client.infer(model, [inp], client_timeout=5.0, headers=headers)
                return [float(v) for v in result.as_numpy(DEMO_OUTPUT)[0]]
            except InferenceServerException as exc:
                if exc.status() == "StatusCode.UNAUTHENTICATED":
                    raise KeyRefused(exc.message()) from None
                last = str(exc)
            stop.wait(0.2)
    finally:
        client.close()
    raise StartupFailed(f"the demo model did not answer through the gateway in time (last: {last})")


def client_snippet(gateway: str) -> str:
    return f'''    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient("{gateway}")
    x = np.random.rand(2, 10).astype(np.float32)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("demo", [inp])
    print(result.as_numpy("OUTPUT0").argmax(axis=1))'''


def _say(text: str = "") -> None:
    print(text, flush=True)


def _stop_all(children: list[ChildService]) -> None:
    for child in reversed(children):
        if child.proc is not None:
            _say(f"  stopping {child.spec.name}")
            child.stop()


def run_up(
    *, home: str | None = None, base_port: int | None = None, host: str = "127.0.0.1", demo: bool = True,
    startup_timeout_s: float = 120.0, demo_format: str | None = None, gateway_auth_on: bool | None = None,
    insecure: bool = False, demo_lm: bool = True, demo_lm_steps: int | None = None,
) -> int:
    """`gateway_auth_on`: API keys at the gateway (default: on unless `host` is loopback). A gateway
    exposed beyond loopback without keys refuses to start unless `insecure`."""
    auth_on = not is_loopback(host) if gateway_auth_on is None else gateway_auth_on
    if demo_lm_steps is not None:
        from aiaas.demo_lm import MAX_STEPS

        if not 1 <= demo_lm_steps <= MAX_STEPS:
            print(f"aiaas up: --demo-lm-steps must be 1..{MAX_STEPS}, not {demo_lm_steps}", file=sys.stderr)
            return 2
    if not auth_on and not is_loopback(host) and not insecure:
        print(f"aiaas up: refusing to expose the gateway on {host} without API keys: anyone who can reach "
              "it could call and administer every model. Drop --no-auth, listen on 127.0.0.1, or pass "
              "--insecure if this network is yours alone.", file=sys.stderr)
        return 2
    state = aiaas_home(home)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    ports = stack_ports(base_port)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    children: list[ChildService] = []
    token_before = os.environ.get("AIAAS_IDENTITY_TOKEN_FILE")
    try:
        with home_lock(state):
            check_ports_free(host, ports)
            return _run(state, host, ports, demo, startup_timeout_s, stop, children, demo_format, auth_on,
                        demo_lm, demo_lm_steps)
    except StartupFailed as exc:
        print(f"aiaas up: {exc}", file=sys.stderr)
        _stop_all(children)
        return 1
    except Interrupted:
        _say("aiaas up: interrupted while starting; stopping")
        _stop_all(children)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if token_before is None:
            os.environ.pop("AIAAS_IDENTITY_TOKEN_FILE", None)
        else:
            os.environ["AIAAS_IDENTITY_TOKEN_FILE"] = token_before


def _run(state: Path, host: str, ports: dict[str, int], demo: bool, startup_timeout_s: float,
         stop: threading.Event, children: list[ChildService], demo_format: str | None = None,
         auth_on: bool = False, demo_lm: bool = True, demo_lm_steps: int | None = None) -> int:
    # The packages `up` itself was imported from, so a source checkout works without an install.
    package_root = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "AIAAS_HOME": str(state), "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}
    env.setdefault("AIAAS_LOG_JSON", "false")
    redis = os.environ.get("AIAAS_REDIS_URL")
    _say(f"aiaas up: state in {state}")
    _say(f"  registry: SQLite {state / 'registry.db'}, artifacts {state / 'artifacts'}")
    _say(f"  counters and metric windows: {'Redis at ' + redis if redis else 'in-process'}")
    auth = gateway_auth(state) if auth_on else None
    identity = stack_identity(state)
    # This process (the demo upload) acts as `admin`, as the operator's CLI on this machine does.
    os.environ["AIAAS_IDENTITY_TOKEN_FILE"] = str(identity.token_file("admin"))
    _say(f"  internal calls carry signed identities (key {identity.public_key}); the CLI here acts as admin")
    for spec in service_plan(state, host, ports, auth, identity):
        child = ChildService(spec, host if spec.name == "gateway" else "127.0.0.1", state / "logs", env)
        children.append(child)
        child.start()
        try:
            child.wait_healthy(time.monotonic() + startup_timeout_s, stop)
        except StartupFailed as exc:
            raise StartupFailed(f"{exc}\n--- {child.log_path} (end) ---\n{child.log_tail()}") from None
        _say(f"  {spec.name:<9} {child.address:<16} healthy   log: {child.log_path}")
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    gateway = f"{local}:{ports['gateway']}"
    registry = f"127.0.0.1:{ports['registry']}"
    demo_eval: DemoEval | None = None
    if demo:
        _say("  " + ensure_demo(registry, demo_format))
        demo_eval = ensure_demo_eval(registry, state)
        _say("  " + demo_eval.line)
        if demo_lm:
            from aiaas.demo_lm import DEMO_LM_MODEL

            _say(f"  {DEMO_LM_MODEL}: registering in the background (trained once, then cached under {state / 'demo'})")
            DemoLMBuilder(registry, state, demo_lm_steps, stop, env).start()
        # After the bootstrap key's rotation, a key of the operator's own checks the demo.
        check_key = (os.environ.get("AIAAS_API_KEY") or auth.admin_key) if auth else None
        try:
            row = wait_model_ready(gateway, "demo", time.monotonic() + startup_timeout_s, stop, check_key)
        except KeyRefused as exc:
            _say(f"  demo check skipped: the gateway refused its key ({exc}); set AIAAS_API_KEY to a key "
                 "that may infer `demo`")
        else:
            _say(f"  demo answers through the gateway: OUTPUT0[0] argmax = {max(range(len(row)), key=row.__getitem__)}")
    _say("")
    if auth is None:
        where = "listens on loopback only and" if is_loopback(host) else f"LISTENS ON {host} (--insecure) and"
        _say(f"!! AUTHENTICATION IS OFF: the gateway {where} takes calls without an API key.")
    else:
        from aiaas.api_keys import parse_token

        bootstrap_id = parse_token(auth.admin_key)[0]
        _say(f"authentication is ON ({host} is not loopback): the bootstrap admin key ({bootstrap_id}) is in {auth.path}")
        _say(f"  make keys with: aiaas keys create --name me --gateway {gateway} --api-key <admin_key>")
        _say("  and send them as `authorization: Bearer <key>` (tritonclient: headers={...}).")
        _say(f"  rotate the bootstrap key (it stays revoked across restarts): aiaas keys rotate {bootstrap_id} "
             f"--gateway {gateway} --api-key <admin_key>")
    _say("")
    _say(f"ready: gateway {gateway} (KServe v2 / Triton gRPC), OpenAI-compatible API "
         f"http://{local}:{ports['openai']}/v1, Prometheus metrics on :{ports['metrics']}")
    _say("")
    _say("call the demo with tritonclient:")
    _say(client_snippet(gateway))
    _say("")
    _say("or from the shell:")
    gateway_flag = "" if ports["gateway"] == DEFAULT_PORTS["gateway"] else f" --gateway {gateway}"
    _say(f"    aiaas predict demo --input INPUT0='[[0.5, -1.2, 0.3, 0.9, -0.4, 1.1, 0.0, -0.7, 0.2, 0.8]]'{gateway_flag}")
    _say("")
    if demo and demo_lm:
        from aiaas.demo_lm import DEMO_LM_MODEL

        bearer = "" if auth is None else ' -H "authorization: Bearer $AIAAS_API_KEY"'
        _say(f"the generative {DEMO_LM_MODEL} (once registered) on the OpenAI-compatible API:")
        _say(f"    curl -sN http://{local}:{ports['openai']}/v1/completions{bearer} -H 'content-type: application/json' "
             f"-d '{{\"model\": \"{DEMO_LM_MODEL}\", \"prompt\": \"The gateway\", \"max_tokens\": 32, "
             f"\"stream\": true}}'")
        _say("")
    if demo_eval is not None and demo_eval.spec is not None:
        from aiaas.demo import DEMO_DATASET

        flags = "" if ports["registry"] == DEFAULT_PORTS["registry"] else (
            f" --registry {registry} --inference 127.0.0.1:{ports['inference']}")
        _say("evaluate the demo on its held-out set (docs/evaluation.md):")
        _say(f"    aiaas evaluate demo 1 --dataset {DEMO_DATASET} --spec {demo_eval.spec}{flags}")
        _say("")
    _say("Ctrl-C stops everything.")
    while not stop.wait(0.5):
        for child in children:
            if not child.alive():
                code = child.proc.returncode if child.proc else None
                print(f"aiaas up: {child.spec.name} exited unexpectedly with code {code}\n"
                      f"--- {child.log_path} (end) ---\n{child.log_tail()}", file=sys.stderr)
                _stop_all(children)
                return 1
    _say("aiaas up: stopping")
    _stop_all(children)
    _say("aiaas up: stopped")
    return 0
