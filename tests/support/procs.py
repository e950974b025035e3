"""Start aiaas services as real processes on free ports and wait until their health says SERVING."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiaas.identity import ClientIdentity
from tests.support.identity import session_identities, session_installed
from tests.support.servers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
_LOG_DIR: list[str] = []
_STARTED: list[ServiceProcess] = []


@atexit.register
def _kill_leftovers() -> None:
    """A test that forgot a process must not leave it running after the session."""
    for service in _STARTED:
        service.kill()


def _log_dir() -> str:
    """One folder for this process's service logs, removed when the process exits."""
    if not _LOG_DIR:
        _LOG_DIR.append(tempfile.mkdtemp(prefix="aiaas-test-logs-"))
        atexit.register(shutil.rmtree, _LOG_DIR[0], True)
    return _LOG_DIR[0]


def wait_healthy(address: str, service: str = "", timeout: float = 60.0,
                 proc: subprocess.Popen[bytes] | None = None, log_path: str | None = None,
                 identity: ClientIdentity | None = None) -> None:
    """Poll grpc.health.v1 until `service` is SERVING (over mTLS with `identity`, at localhost:port)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    target = f"localhost:{address.rpartition(':')[2]}" if identity is not None and identity.tls else address
    with (identity.channel(target) if identity is not None else grpc.insecure_channel(address)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                tail = Path(log_path).read_text()[-4000:] if log_path else ""
                raise RuntimeError(f"service at {address} exited with {proc.returncode}:\n{tail}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(0.05)
    tail = Path(log_path).read_text()[-4000:] if log_path else ""
    raise TimeoutError(f"{address} service {service!r} not SERVING after {timeout}s (last: {last})\n{tail}")


class ServiceProcess:
    """`python -m services.<name> --port N ...` as a child process, logs in a temp file."""

    def __init__(self, name: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.args = list(args)
        # A gateway's OpenAI door gets a free port of its own too (its default, 8000, is shared).
        self.openai_port: int | None = None
        if name == "gateway" and not any(a.startswith("--openai-port") for a in self.args):
            self.openai_port = free_port()
            self.args += ["--openai-port", str(self.openai_port)]
        self.env = {**os.environ, "AIAAS_LOG_JSON": "false", **(env or {})}
        if "AIAAS_IDENTITY_TOKEN_FILE" not in (env or {}) and session_installed():
            # Each service presents its own identity (the policy applies to what it calls).
            self.env["AIAAS_IDENTITY_TOKEN_FILE"] = str(session_identities().token_file(name))
        self.env.setdefault("PYTHONPATH", str(REPO_ROOT))
        # Kept open for the child's lifetime so a failing test can show it; removed at exit.
        self.log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix=f"aiaas-{name}-", suffix=".log", delete=False, dir=_log_dir()
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        """A gateway's OpenAI-compatible API (`base_url` of the openai client)."""
        return f"http://127.0.0.1:{self.openai_port}/v1"

    def start(self, wait: bool = True, timeout: float = 90.0) -> ServiceProcess:
        _STARTED.append(self)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
            cwd=REPO_ROOT, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready(timeout=timeout)
        return self

    def client_identity(self) -> ClientIdentity | None:
        """The process's own certificate when it serves mTLS (health checks need one too)."""
        if not self.env.get("AIAAS_TLS_CLIENT_CA"):
            return None
        return ClientIdentity.from_files(tls_ca=self.env.get("AIAAS_CLIENT_TLS_CA") or self.env["AIAAS_TLS_CLIENT_CA"],
                                         tls_cert=self.env.get("AIAAS_CLIENT_TLS_CERT") or self.env["AIAAS_TLS_CERT"],
                                         tls_key=self.env.get("AIAAS_CLIENT_TLS_KEY") or self.env["AIAAS_TLS_KEY"])

    def wait_ready(self, service: str = "", timeout: float = 90.0) -> None:
        wait_healthy(self.address, service, timeout, proc=self.proc, log_path=self.log_file.name,
                     identity=self.client_identity())

    def log(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
