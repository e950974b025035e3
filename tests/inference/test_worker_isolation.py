"""Model workers run confined: no network, not root, Landlock, limits, and a per-batch watchdog.

Two views: the real worker processes seen from outside (/proc/<pid>), and the same sandbox applied
to `python -m services.inference.sandbox`, which then tries what a hostile model would.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import tritonclient.grpc as tc

from aiaas.runtime import signature_of
from services.common.errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted
from services.inference import landlock, sandbox, workers
from services.inference._worker_main import WorkerConfig
from services.inference._worker_replies import MAX_MESSAGE_BYTES, read_message, send_message
from services.inference.shm import TensorMeta, copies
from services.inference.workers import WORKER_SPIN_COUNT, WorkerPool, _worker_env
from tests.inference.conftest import Registry, inference_args, start_inference
from tests.inference.models import Artifact, write_identity, write_mlp
from tests.inference.test_service_workers import spin_inputs, write_spin
from tests.inference.test_workers import pool_for, start, wait_alive

ROOT = os.geteuid() == 0


def require_root() -> None:
    """These tests simulate a root service (capabilities dropped, a user change): they need root."""
    assert ROOT, ("this test simulates an inference service running as root: run `make test` as root, "
                  "as CI does (sudo make test, or in a container)")
LANDLOCK = landlock.abi()
NOBODY = sandbox.resolve_user("nobody")
CAP_SETGID, CAP_SETUID, CAP_SYS_ADMIN = 6, 7, 21


def status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in status if ":" in line)}


def limits_of(pid: int) -> dict[str, str]:
    """'Max open files' -> soft limit, from /proc/<pid>/limits."""
    lines = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {line[:26].strip(): line[26:47].strip() for line in lines}


@pytest.fixture
async def pools() -> AsyncIterator[list[WorkerPool]]:
    """Pools a test starts; closed even when the test fails."""
    started: list[WorkerPool] = []
    yield started
    for pool in started:
        await pool.close()


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter: what stops a sandboxed read here is Landlock, not modes."""
    with tempfile.TemporaryDirectory(dir="/tmp") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def world_readable(artifact: Artifact) -> Artifact:
    os.chmod(artifact.path, 0o644)
    return artifact


async def test_sandboxed_worker_serves_and_is_confined(
    shared_dir: Path, pools: list[WorkerPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIAAS_TEST_SECRET", "registry-password")
    artifact = world_readable(write_mlp(shared_dir, "torchscript"))
    pool = await start(pools, pool_for(artifact))
    x = {"input": np.random.default_rng(4).standard_normal((3, 10)).astype(np.float32)}
    result = await pool.run_batch(x)
    np.testing.assert_allclose(result.outputs["output"], artifact.expected(x)["output"], rtol=1e-5, atol=1e-6)

    pid = pool.pids[0]
    report = pool.sandbox_reports[0]
    status, limits = status_of(pid), limits_of(pid)
    assert status["NoNewPrivs"] == "1" and int(status["CapEff"], 16) == 0
    if ROOT:
        assert status["Uid"].split() == [str(NOBODY[0])] * 4 and status["Groups"] == ""
        assert report.applied["user"].startswith(f"uid {NOBODY[0]}")
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert report.applied["network"] == "new network namespace"
        assert limits["Max processes"] == str(sandbox.PROCESS_LIMIT)
    assert limits["Max open files"] == "256" and limits["Max core file size"] == "0"
    cap = sandbox.DEFAULT_ADDRESS_SPACE_MB * 2**20 + 4 * os.path.getsize(artifact.path)
    assert limits["Max address space"] == str(cap)
    if LANDLOCK:  # this kernel has it (ABI 7 here): the worker must have used it
        assert "filesystem" in report.applied and report.paths[artifact.path] == artifact.path
        assert ("tcp" in report.applied) == (LANDLOCK >= 4)
    # The service's own environment (credentials, endpoints) never reaches model code.
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not any(entry.startswith(b"AIAAS_TEST_SECRET=") for entry in environ)
    assert any(entry.startswith(b"PYTHONPATH=") for entry in environ)
    # Idle torch threads spin briefly, not for libgomp's 300,000 rounds (docs/inference.md).
    assert b"GOMP_SPINCOUNT=" + WORKER_SPIN_COUNT.encode() in environ


@pytest.mark.parametrize("format", ["torch_export", "onnx"])
async def test_every_format_loads_and_runs_under_the_sandbox(
    tmp_path: Path, pools: list[WorkerPool], format: str
) -> None:
    """tmp_path is closed to other users: the worker reads its artifact through a descriptor."""
    artifact = write_mlp(tmp_path, format)
    pool = await start(pools, pool_for(artifact, sandbox=sandbox.SandboxPolicy(mode="require")))
    x = {"input": np.random.default_rng(6).standard_normal((5, 10)).astype(np.float32)}
    out = (await pool.run_batch(x)).outputs["output"]
    np.testing.assert_allclose(out, artifact.expected(x)["output"], rtol=1e-5, atol=1e-6)
    report = pool.sandbox_reports[0]
    assert not report.missing_essential
    if ROOT:
        assert report.paths[artifact.path].startswith("/proc/self/fd/")


def run_probe(*args: str, preexec: Callable[[], None] | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "services.inference.sandbox", *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60, preexec_fn=preexec,
                          cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


@pytest.fixture
def unix_listener(shared_dir: Path) -> Iterator[str]:
    """A Unix socket anyone may connect to (mode 777): no file mode stops a sandboxed client."""
    path = str(shared_dir / "open.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen()
        yield path
    os.unlink(path)


def test_inside_the_sandbox_a_model_reaches_nothing(shared_dir: Path, listener: socket.socket,
                                                    unix_listener: str) -> None:  # fmt: skip
    own = world_readable(write_mlp(shared_dir, "onnx", sizes=(10, 20, 10)))
    other = world_readable(write_mlp(shared_dir, "onnx", sizes=(10, 30, 10)))  # another version's artifact
    port = listener.getsockname()[1]
    result = run_probe("--readable", own.path, "--read", other.path, "--read", "/etc/passwd",
                       "--connect", f"127.0.0.1:{port}", "--connect-unix", unix_listener,
                       "--write-dir", str(shared_dir), "--signal-pid", str(os.getpid()))  # fmt: skip
    applied = result["report"]["applied"]
    assert result["connect"] != "ok" and result["udp"] != "ok"
    if sandbox._SECCOMP_ARCH.get(os.uname().machine):  # x86_64 and aarch64: no socket can even be made
        assert applied["sockets"] == "no new sockets (seccomp)"
        assert result["connect"] == result["udp"] == result["unix"] == "EPERM"
    assert result["limits"]["RLIMIT_NOFILE"] == 256 and result["limits"]["RLIMIT_CORE"] == 0
    assert result["limits"]["RLIMIT_FSIZE"] == 0 and applied["file_size"] == "0"  # its stdout/stderr are pipes
    assert result["no_new_privs"] == "1"
    if ROOT:
        assert result["euid"] == NOBODY[0] and result["egid"] == NOBODY[1] and result["groups"] == []
        assert int(result["cap_eff"], 16) == 0
        assert applied["network"] == "new network namespace"
        assert result["netns"] != os.readlink("/proc/self/ns/net")
    if LANDLOCK:
        assert "filesystem" in applied
        assert result["reads"][own.path] == "ok"
        assert result["reads"][other.path] == "EACCES"  # mode 644 in a 755 directory: only Landlock stops it
        assert result["reads"]["/etc/passwd"] == "EACCES"
        assert result["write"] == "EACCES" and result["exec"] == "EACCES"
        assert not list(shared_dir.glob("sandbox-probe-*"))
    if LANDLOCK >= 6:
        assert result["signal"] == "EPERM"  # not even the service that started it


def drop_capabilities(*caps: int) -> Callable[[], None]:
    """A root child without these capabilities, as in a container that dropped them."""

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in caps:
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone after exec
                raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")

    return preexec


def test_without_cap_sys_admin_the_network_is_cut_in_a_user_namespace(listener: socket.socket) -> None:
    require_root()
    port = listener.getsockname()[1]
    result = run_probe("--connect", f"127.0.0.1:{port}", preexec=drop_capabilities(CAP_SYS_ADMIN))
    report = result["report"]
    assert result["euid"] == NOBODY[0] and result["connect"] != "ok"
    if report["applied"]["network"].startswith("new network namespace"):
        assert report["applied"]["network"] == "new network namespace (in a new user namespace)"
        assert result["netns"] != os.readlink("/proc/self/ns/net") and int(result["cap_eff"], 16) == 0
    else:  # unprivileged user namespaces are off on this host: seccomp and Landlock still hold
        assert report["applied"]["network"].startswith(("no new sockets (seccomp)", "TCP only (Landlock)"))


def test_without_setuid_a_root_worker_keeps_uid_0_but_no_capabilities(shared_dir: Path) -> None:
    require_root()
    result = run_probe("--read", "/etc/passwd", preexec=drop_capabilities(CAP_SETUID, CAP_SETGID, CAP_SYS_ADMIN))
    report = result["report"]
    assert int(result["cap_eff"], 16) == 0
    assert report["missing"]["user"].startswith("stays uid 0 without capabilities: cannot change user")
    if LANDLOCK:
        assert result["reads"]["/etc/passwd"] == "EACCES"  # root, yet Landlock holds


async def test_require_refuses_a_worker_that_cannot_drop_root(
    shared_dir: Path, pools: list[WorkerPool]
) -> None:
    """An artifact only root can read: "require" refuses to start, "auto" serves as uid 0 without capabilities."""
    require_root()
    artifact = write_mlp(shared_dir, "onnx", sizes=(10, 40, 10))
    os.chmod(artifact.path, 0o600)
    strict = pool_for(artifact, sandbox=sandbox.SandboxPolicy(mode="require"))
    with pytest.raises(FailedPrecondition, match=r"worker_sandbox=require but the worker could not be confined "
                                                 r"\(user: stays uid 0 without capabilities: .*unreadable to uid"):
        await strict.start()
    assert strict.alive_instances == 0
    pool = await start(pools, pool_for(artifact))
    x = {"input": np.ones((2, 10), np.float32)}
    np.testing.assert_allclose((await pool.run_batch(x)).outputs["output"], artifact.expected(x)["output"],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    status = status_of(pool.pids[0])
    assert status["Uid"].split()[1] == "0" and int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert "user" in pool.sandbox_reports[0].missing


async def test_a_batch_past_batch_timeout_kills_the_worker_which_comes_back(
    tmp_path: Path, pools: list[WorkerPool]
) -> None:
    artifact = write_spin(tmp_path)
    pool = await start(pools, pool_for(artifact, batch_timeout_s=1.0))
    pid = pool.pids[0]
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    quick: dict[str, np.ndarray] = {"x": x, "n": np.array([[1]], np.int64)}
    np.testing.assert_array_equal((await pool.run_batch(quick)).outputs["y"], x)
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"did not finish the batch within 1s \(batch_timeout_s\); "
                                               r"its worker was killed and is restarting"):
        await pool.run_batch({"x": x, "n": np.array([[10**9]], np.int64)})
    assert 0.9 < time.monotonic() - began < 10
    with pytest.raises(ProcessLookupError):
        for _ in range(200):  # SIGKILL is immediate, the reaping a moment later
            os.kill(pid, 0)
            await asyncio.sleep(0.05)
    await wait_alive(pool, 1)
    assert pool.pids != [pid]
    np.testing.assert_array_equal((await pool.run_batch(quick)).outputs["y"], x)


@pytest.fixture(scope="module")
def watchdog_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    registry.register("spin-watchdog", write_spin(tmp_path_factory.mktemp("models")), alias="production",
                      max_batch_size=4)  # fmt: skip
    proc = start_inference(inference_args(registry, tmp_path_factory.mktemp("cache"), "--batch-timeout-s", "1",
                                          "--follow-models", "spin-watchdog"))  # fmt: skip
    yield proc
    proc.stop()


def test_service_answers_deadline_exceeded_for_a_runaway_batch(watchdog_server: Any) -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    with tc.InferenceServerClient(watchdog_server.address) as client:
        with pytest.raises(tc.InferenceServerException) as failure:
            client.infer("spin-watchdog", spin_inputs(10**9, x), client_timeout=30)
        assert failure.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert "did not finish the batch within 1s (batch_timeout_s)" in failure.value.message()
        deadline = time.monotonic() + 60
        while True:  # the restarted worker serves again
            try:
                answer = client.infer("spin-watchdog", spin_inputs(1, x), client_timeout=30)
                break
            except tc.InferenceServerException as exc:
                assert exc.status() == "StatusCode.UNAVAILABLE" and time.monotonic() < deadline, exc
                time.sleep(0.1)
        np.testing.assert_array_equal(answer.as_numpy("y"), x)
    log = Path(watchdog_server.log_file.name).read_text()
    assert "killed after a batch ran past batch_timeout_s=1s" in log


def test_settings_refuse_unknown_modes_and_users() -> None:
    from services.common.errors import InvalidArgument
    from services.inference.settings import InferenceSettings

    with pytest.raises(InvalidArgument, match="worker_sandbox must be one of auto, require, off"):
        InferenceSettings(worker_sandbox="on").validate()
    with pytest.raises(InvalidArgument, match="worker_user: 'no-such-user-here' is not a user on this host"):
        InferenceSettings(worker_user="no-such-user-here").validate()
    with pytest.raises(InvalidArgument, match="workers must not run as root"):
        InferenceSettings(worker_user="0").validate()
    assert sandbox.resolve_user("1234:5678") == (1234, 5678)


class _Payload:
    """What a hostile worker would pickle: unpickling it creates `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.path), "w")


def test_the_service_never_unpickles_what_a_worker_sends(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    service_end, worker_end = multiprocessing.Pipe()
    with service_end, worker_end:
        worker_end.send(("ok", _Payload(marker)))  # Connection.send pickles
        with pytest.raises(workers._Malformed, match="undecodable message"):
            workers._read_reply(service_end)
        worker_end.send_bytes(json.dumps(["ok", [], -1, 0, 0]).encode())
        with pytest.raises(workers._Malformed, match="bad timings"):
            workers._read_reply(service_end)
        os.write(worker_end.fileno(), struct.pack("!i", 2 << 20))  # a 2 MiB message announced: not read
        with pytest.raises(OSError, match="bad message length"):
            workers._read_reply(service_end)
    assert not marker.exists()


@pytest.mark.parametrize("first", ["config", "run"])
def test_a_worker_never_unpickles_what_it_is_sent(tmp_path: Path, first: str) -> None:
    """The wire into a worker is JSON too: a pickle arriving as its config, or after a good config
    as a batch, is refused (the worker ends) and nothing in it runs."""
    marker = tmp_path / "code-ran"
    model = write_mlp(tmp_path, "torchscript", (4, 3))
    service_end, worker_end = socket.socketpair()
    env = _worker_env(False)
    worker = subprocess.Popen([sys.executable, "-m", "services.inference._worker_main", str(worker_end.fileno())],
                              pass_fds=(worker_end.fileno(),), stdin=subprocess.DEVNULL, env=env,
                              stderr=subprocess.PIPE)
    worker_end.close()
    with multiprocessing.connection.Connection(service_end.detach()) as conn:
        try:
            if first == "run":
                config = WorkerConfig(artifact_path=str(model.path), format=model.format,
                                      inputs=signature_of(model.inputs), outputs=signature_of(model.outputs),
                                      device="cpu", threads=1, sandbox=sandbox.SandboxPolicy(mode="off"))
                send_message(conn, config.message())
                assert json.loads(conn.recv_bytes())[0] == "ready"
            conn.send(("run", _Payload(marker)) if first == "run" else {"sandbox": _Payload(marker)})  # pickles
            code = worker.wait(timeout=60)  # it ends: a refused message is the end of its service
            assert code != 0 if first == "config" else code == 0
        finally:
            if worker.poll() is None:
                worker.kill()
            worker.wait(timeout=30)
    assert not marker.exists()


def test_an_oversized_message_for_a_worker_is_refused_before_the_pipe() -> None:
    """Over the worker's read limit, nothing is written (the pipe's framing stays whole) and the
    next message arrives intact."""
    service_end, worker_end = multiprocessing.Pipe()
    with service_end, worker_end:
        with pytest.raises(ValueError, match="over the worker pipe's limit"):
            send_message(service_end, ["generate", {"prompt": "x" * MAX_MESSAGE_BYTES}])
        assert not worker_end.poll(0.1)
        send_message(service_end, ["cancel", "r1"])
        assert read_message(worker_end) == ["cancel", "r1"]


def _as_received(meta: object) -> list[TensorMeta]:
    """An output description as a worker's JSON reply carries it (lists, unchecked): `copies` checks it."""
    return [cast(TensorMeta, meta)]


def test_output_descriptions_from_a_worker_are_checked_before_reading() -> None:
    buf = memoryview(bytearray(1024))
    names = {"y"}
    assert copies(buf, _as_received(("y", "<f4", [2, 3], 64, 24)), names)["y"].shape == (2, 3)
    wrong = {
        "outside the 1024 byte slab": ("y", "<f4", [256], 64, 1024),
        "is not in the signature": ("z", "<f4", [2], 0, 8),
        "is not 8 bytes": ("y", "<f4", [1 << 40], 0, 8),
        "has shape": ("y", "<f4", [-1], 0, 0),
        "of dtype |O8": ("y", "|O8", [1], 0, 8),
        "need at least 4000 bytes": ("y", "|O", [1000], 0, 64),  # the BYTES count lie
    }
    for message, meta in wrong.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            copies(buf, _as_received(meta), names)


async def test_outputs_over_the_response_limit_fail_the_batch_only(
    tmp_path: Path, pools: list[WorkerPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "_MAX_OUT_SLAB_BYTES", 1 << 20)
    artifact = write_identity(tmp_path, "torchscript", "FP32")
    pool = await start(pools, pool_for(artifact, max_batch_size=4))
    pid = pool.pids[0]
    with pytest.raises(ResourceExhausted, match=r"produced \d+ bytes of outputs, over the 1048576 byte limit"):
        await pool.run_batch({"INPUT0": np.ones((1, 300_000), np.float32)})
    small = np.ones((2, 5), np.float32)
    np.testing.assert_array_equal((await pool.run_batch({"INPUT0": small})).outputs["OUTPUT0"], small)
    assert pool.pids == [pid]


def test_an_explicit_openmp_wait_policy_wins_over_the_short_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert _worker_env(True, short_spin=True)["GOMP_SPINCOUNT"] == WORKER_SPIN_COUNT
    assert "GOMP_SPINCOUNT" not in _worker_env(True)  # generative workers keep libgomp's default
    monkeypatch.setenv("GOMP_SPINCOUNT", "50000")
    assert _worker_env(True, short_spin=True)["GOMP_SPINCOUNT"] == "50000"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    env = _worker_env(True, short_spin=True)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in env
