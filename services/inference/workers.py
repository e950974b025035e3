"""Model instances: worker processes fed through shared memory, or a thread pool in-process.

`WorkerPool` runs each instance in its own fresh interpreter (see `_worker_main`), confined by
`sandbox` before it loads anything, with a scrubbed environment. Tensors cross in shared-memory
slabs (one input and one output slab per worker, passed as descriptors) and only a small control
tuple crosses the pipe. The event loop never blocks: it writes the input slab, sends the tuple,
and a reader callback on the pipe resolves the batch's future. A worker whose pipe closes has
died: its in-flight batch fails with Unavailable (the gateway retries) and a new process is
started in the background. A batch that runs past `batch_timeout_s` gets its worker killed
(SIGKILL), fails with DeadlineExceeded, and the same restart follows.

`InProcessRunner` has the same interface and runs the model in a thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NotRequired, TypedDict, Unpack

import numpy as np

from aiaas.runtime import (
    FORMATS,
    LoadedModel,
    TensorSig,
    TensorSpecLike,
    load_model,
    parse_device,
    signature_of,
)
from services.common.datatypes import KSERVE_TO_NUMPY
from services.common.errors import (
    AiaasError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    Unavailable,
)
from services.inference._worker_main import WorkerConfig
from services.inference._worker_replies import send_message
from services.inference.batcher import BatchResult
from services.inference.sandbox import SandboxPolicy, SandboxReport
from services.inference.shm import Packed, Slab, copies, send_fds

log = logging.getLogger(__name__)

_ERRORS: dict[str, type[AiaasError]] = {cls.code.value: cls for cls in AiaasError.__subclasses__()}
_MIN_SLAB = 64 * 1024
_BYTES_ELEMENT_GUESS = 64
# A sandboxed worker inherits only these variables: the service's credentials and endpoints stay
# out of reach of model code (it can read its own environment).
_WORKER_ENV_PREFIXES = ("PATH", "HOME", "LANG", "LC_", "TZ", "PYTHON", "LD_LIBRARY_PATH", "OMP_", "KMP_",
                        "GOMP_", "MKL_", "OPENBLAS_", "CUDA_", "NVIDIA_", "TORCH", "PYTORCH_", "ORT_")  # fmt: skip
# libgomp (torch's OpenMP on CPU) keeps an idle thread spinning for 300,000 rounds after each
# parallel op; a tensor worker between batches would burn a core that way (measured: 1.4 ms of CPU
# per 0.1 ms forward of a small MLP on 2 threads) that the service's gRPC process needs. This many
# rounds keeps threads warm inside one forward pass and lets them sleep between batches
# (docs/inference.md, "Worker threads").
WORKER_SPIN_COUNT = "1000"
# Room for weights held twice while loading plus optimized copies, on top of the runtime's allowance.
_ADDRESS_SPACE_PER_ARTIFACT_BYTE = 4
# Bounds on what a worker (running untrusted model code) may make the service read or allocate.
_MAX_REPLY_BYTES = 1 << 20
_MAX_OUT_SLAB_BYTES = 2**31
_MAX_ERROR_CHARS = 2000
_REPLY_LENGTHS = {"ready": 3, "error": 3, "grow": 2, "ok": 5, "fail": 3}


class _Malformed(Exception):
    """A worker sent something outside the protocol: it is broken or hostile, and is killed."""


def _read_reply(conn: Connection) -> list[Any]:
    """A worker's message: JSON, bounded, shape-checked. Never unpickled."""
    try:
        message = json.loads(conn.recv_bytes(_MAX_REPLY_BYTES))
    except ValueError as exc:
        raise _Malformed(f"undecodable message ({exc})") from None
    if not isinstance(message, list) or not message or _REPLY_LENGTHS.get(message[0]) != len(message):
        raise _Malformed(f"unexpected message {str(message)[:100]!r}")
    if message[0] in ("error", "fail"):
        if not isinstance(message[1], str) or not isinstance(message[2], str):
            raise _Malformed("error without a code and a message")
        message[2] = message[2][:_MAX_ERROR_CHARS]
    elif message[0] == "grow" and not (isinstance(message[1], int) and message[1] > 0):
        raise _Malformed(f"bad output size {message[1]!r}")
    elif message[0] == "ok" and not all(isinstance(n, int) and n >= 0 for n in message[2:]):
        raise _Malformed("bad timings")
    return message


def _worker_env(scrub: bool, *, short_spin: bool = False) -> dict[str, str]:
    """The worker imports `services` from where this process found it. `short_spin`: torch's
    OpenMP threads spin only briefly once idle (WORKER_SPIN_COUNT) unless the environment says
    otherwise (GOMP_SPINCOUNT, OMP_WAIT_POLICY)."""
    env = {k: v for k, v in os.environ.items() if not scrub or k.startswith(_WORKER_ENV_PREFIXES)}
    if short_spin and "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
        env["GOMP_SPINCOUNT"] = WORKER_SPIN_COUNT
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


async def end_process(process: Any, conn: Connection | None, timeout_s: float = 5.0, *,
                      kill: bool = False) -> int | None:
    """Stop reading a worker's pipe and close it, then wait for the process to exit (SIGKILL when it
    has not after `timeout_s`, or at once with `kill`); its exit code."""
    loop = asyncio.get_running_loop()
    if conn is not None:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(conn.fileno())
        conn.close()
    if kill:
        process.kill()
    try:
        code: int | None = await loop.run_in_executor(None, process.wait, timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        code = await loop.run_in_executor(None, process.wait)
    return code


def _error(code: str, message: str) -> AiaasError:
    return _ERRORS.get(code, Internal)(message)


def _row_bytes(sigs: Sequence[TensorSig], batched: bool) -> int:
    total = 0
    for sig in sigs:
        dims = sig.shape[1:] if batched and sig.shape else sig.shape
        count = math.prod(max(d, 1) for d in dims)
        size = KSERVE_TO_NUMPY[sig.datatype].itemsize if sig.datatype != "BYTES" else _BYTES_ELEMENT_GUESS
        total += count * size + 64
    return total


def warmup_inputs(sigs: Sequence[TensorSig], batch_size: int, batched: bool) -> dict[str, np.ndarray]:
    """Zeros of each input at `batch_size` rows; variable dims become 1; BYTES are empty strings."""
    inputs = {}
    for sig in sigs:
        dims = [d if d >= 0 else 1 for d in (sig.shape[1:] if batched else sig.shape)]
        shape = (batch_size, *dims) if batched else tuple(dims)
        if sig.datatype == "BYTES":
            array = np.empty(shape, dtype=object)
            array.fill(b"")
        else:
            array = np.zeros(shape, dtype=KSERVE_TO_NUMPY[sig.datatype])
        inputs[sig.name] = array
    return inputs


class _Worker:
    """One worker process, its pipe and its two slabs; at most one batch in flight."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.process: Any = None
        self.conn: Connection | None = None
        self.pid = 0
        self.alive = False
        self.busy = False
        self.waiter: asyncio.Future[list[Any]] | None = None
        self.in_slab = Slab.create(pool.slab_bytes)
        self.out_slab = Slab.create(pool.out_slab_bytes)
        self.mapped: set[str] = set()  # slabs whose descriptors this process holds
        self.deadline: asyncio.TimerHandle | None = None
        self.end_reason = ""  # why the service ended the process, when it did

    @property
    def label(self) -> str:
        return f"{self.pool.name}#{self.index}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair()
        env = _worker_env(self.pool.worker_config.sandbox.mode != "off", short_spin=True)
        try:
            command = [sys.executable, "-m", "services.inference._worker_main", str(child_sock.fileno())]
            self.process = await loop.run_in_executor(
                None,
                lambda: subprocess.Popen(
                    command, pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, env=env
                ),
            )
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        send_message(self.conn, self.pool.worker_config.message())
        self.mapped = set()
        self.end_reason = ""
        self.waiter = loop.create_future()
        loop.add_reader(self.conn.fileno(), self._on_readable)
        try:
            message = await asyncio.wait_for(asyncio.shield(self.waiter), self.pool.start_timeout_s)
        except TimeoutError:
            await self._reap(kill=True)
            raise FailedPrecondition(
                f"model worker for {self.pool.name} did not load within {self.pool.start_timeout_s:.0f}s"
            ) from None
        except Unavailable:
            code = await self._reap()
            raise FailedPrecondition(
                f"model worker for {self.pool.name} exited while loading (exit code {code})"
            ) from None
        except asyncio.CancelledError:
            await asyncio.shield(self._reap(kill=True))
            raise
        if message[0] == "error":
            await self._reap()
            raise _error(message[1], message[2])
        try:
            self.pid = int(message[1])
            report = SandboxReport.from_dict(message[2])
        except (TypeError, ValueError):
            await self._reap(kill=True)
            raise FailedPrecondition(f"model worker for {self.pool.name} sent a malformed start message") from None
        self.pool._sandboxed(self, report)
        self.alive = True

    def _on_readable(self) -> None:
        conn = self.conn
        assert conn is not None
        try:
            message = _read_reply(conn)
            if message[0] == "grow":
                if not self.busy:
                    raise _Malformed("asked for an output slab with no batch running")
                self._grow_out_slab(message[1])
                return
        except (EOFError, OSError):
            self._died()
            return
        except _Malformed as exc:
            self._kill(f"killed: it broke the protocol ({exc})")
            return
        self._disarm()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        elif self.busy:
            # The batch that wanted this answer was cancelled; the worker is free again.
            self.busy = False
            self.pool._release(self)

    def _grow_out_slab(self, nbytes: int) -> None:
        """The outputs did not fit: a bigger output slab, passed to the waiting worker."""
        assert self.conn is not None
        if nbytes > _MAX_OUT_SLAB_BYTES:
            limit = f"over the {_MAX_OUT_SLAB_BYTES} byte limit of one response"
            send_message(self.conn, ("refuse", f"model {self.pool.name} produced {nbytes} bytes of outputs, {limit}"))
            return
        old, self.out_slab = self.out_slab, Slab.create(max(nbytes, 2 * self.out_slab.size))
        old.close()
        send_message(self.conn, ("out", self.out_slab.name))
        send_fds(self.conn, [self.out_slab.fd])
        self.mapped = {self.in_slab.name, self.out_slab.name}

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _batch_overdue(self) -> None:
        """The batch ran past batch_timeout_s: fail it, kill the worker, let the restart follow."""
        self.deadline = None
        if not self.alive or self.process is None:
            return
        timeout = self.pool.batch_timeout_s
        log.error("model worker for %s (pid %d) did not finish a batch within %gs; killing it",
                  self.pool.name, self.pid, timeout)  # fmt: skip
        self.fail_in_flight(DeadlineExceeded(
            f"model {self.pool.name} did not finish the batch within {timeout:g}s (batch_timeout_s); "
            "its worker was killed and is restarting"))  # fmt: skip
        self._kill(f"killed after a batch ran past batch_timeout_s={timeout:g}s")

    def _kill(self, reason: str) -> None:
        """End the process now (SIGKILL); the restart path reaps it and starts another."""
        self.end_reason = reason
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        self._died()

    def _died(self) -> None:
        """The pipe closed: the process is gone (or going). Its batch fails once we know why."""
        loop = asyncio.get_running_loop()
        self._disarm()
        if self.conn is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.conn.fileno())
        was_alive, self.alive = self.alive, False
        if was_alive:
            self.pool._worker_died(self)
        else:
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_exception(Unavailable(f"model worker for {self.pool.name} exited; retry"))

    def fail_in_flight(self, error: AiaasError) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    async def _reap(self, timeout_s: float = 5.0, *, kill: bool = False) -> int | None:
        """Wait for the process to exit (kill it if it will not) and return its exit code."""
        self._disarm()
        process, conn = self.process, self.conn
        if process is None:
            return None
        self.conn = None
        code = await end_process(process, conn, timeout_s, kill=kill)
        self.process = None
        return code

    async def run(self, inputs: Mapping[str, np.ndarray]) -> BatchResult:
        started = time.perf_counter_ns()
        packed = Packed(inputs)
        if packed.nbytes > self.in_slab.size:
            self.in_slab.close()
            self.in_slab = Slab.create(max(packed.nbytes, 2 * self.in_slab.size))
        metas = packed.write(self.in_slab.buf)
        del packed
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[list[Any]] = loop.create_future()
        self.waiter = waiter
        fresh = [slab for slab in (self.in_slab, self.out_slab) if slab.name not in self.mapped]
        try:
            if self.conn is None:
                raise OSError("no pipe")
            fresh_names = tuple(slab.name for slab in fresh)
            send_message(self.conn, ("run", self.in_slab.name, self.out_slab.name, metas, fresh_names))
            if fresh:
                send_fds(self.conn, [slab.fd for slab in fresh])
        except OSError:
            self.waiter = None
            raise Unavailable(f"model worker for {self.pool.name} is gone; retry") from None
        self.mapped = {self.in_slab.name, self.out_slab.name}
        if self.pool.batch_timeout_s > 0:
            self.deadline = loop.call_later(self.pool.batch_timeout_s, self._batch_overdue)
        sent = time.perf_counter_ns()
        reply = await waiter
        received = time.perf_counter_ns()
        if reply[0] == "fail":
            raise _error(reply[1], reply[2])
        _, out_metas, in_ns, infer_ns, out_ns = reply
        try:
            outputs = copies(self.out_slab.buf, out_metas, self.pool.output_names)
        except ValueError as exc:
            raise Internal(f"model worker for {self.pool.name} described its outputs wrongly: {exc}") from None
        finished = time.perf_counter_ns()
        # Pipe and wake-up time is not the model's: count it as input/output handling.
        transit = max(0, received - sent - in_ns - infer_ns - out_ns)
        return BatchResult(
            outputs,
            compute_input_ns=sent - started + in_ns + transit // 2,
            compute_infer_ns=infer_ns,
            compute_output_ns=out_ns + transit - transit // 2 + finished - received,
        )

    async def stop(self) -> None:
        if self.conn is not None and self.alive:
            with contextlib.suppress(OSError, ValueError):
                send_message(self.conn, ("stop",))
        self.alive = False
        await self._reap()

    def free_slabs(self) -> None:
        self.in_slab.close()
        self.out_slab.close()


class ModelArgs(TypedDict):
    """What both runners are built from: one version's artifact, signature and sizing."""

    artifact_path: str
    format: str
    inputs: Sequence[TensorSpecLike]
    outputs: Sequence[TensorSpecLike]
    device: NotRequired[str]  # "" or "cpu" (the default), "cuda:N"
    instance_count: NotRequired[int]  # at least 1 (the default)
    max_batch_size: NotRequired[int]  # 0 (the default): the model takes no batch dimension
    torch_threads: NotRequired[int | None]
    name: NotRequired[str | None]  # for logs and errors; the artifact path by default


class _Runner:
    """The model a runner serves and how many instances serve it."""

    def __init__(self, model: ModelArgs) -> None:
        self.artifact_path = model["artifact_path"]
        self.format = model["format"]
        self.inputs, self.outputs = signature_of(model["inputs"]), signature_of(model["outputs"])
        self.device = model.get("device") or "cpu"
        self.instance_count = max(1, model.get("instance_count", 1))
        self.max_batch_size = model.get("max_batch_size", 0)
        self.torch_threads = model.get("torch_threads")
        self.name = model.get("name") or self.artifact_path


class WorkerPool(_Runner):
    """`instance_count` worker processes for one model version, each sandboxed by `sandbox`.

    `sandbox.address_space_bytes` is the runtime's allowance; each worker may map that plus four
    times its artifact's size. `batch_timeout_s` bounds one batch (0: no bound).
    """

    def __init__(self, *, start_timeout_s: float = 300.0, sandbox: SandboxPolicy | None = None,
                 batch_timeout_s: float = 60.0, **model: Unpack[ModelArgs]) -> None:
        if model["format"] not in FORMATS:
            raise FailedPrecondition(
                f"unknown model format '{model['format']}'; expected one of {', '.join(FORMATS)}")
        super().__init__(model)
        self.output_names = frozenset(sig.name for sig in self.outputs)
        self.start_timeout_s = start_timeout_s
        self.batch_timeout_s = max(0.0, batch_timeout_s)
        policy = sandbox or SandboxPolicy()
        allowance = policy.address_space_bytes
        if allowance > 0:
            with contextlib.suppress(OSError):  # a missing artifact fails with the loader's message
                allowance += _ADDRESS_SPACE_PER_ARTIFACT_BYTE * os.path.getsize(self.artifact_path)
        policy = dataclasses.replace(policy, readable=(self.artifact_path,), device=self.device,
                                     address_space_bytes=allowance)  # fmt: skip
        self.worker_config = WorkerConfig(self.artifact_path, self.format, self.inputs, self.outputs, self.device,
                                          self.torch_threads or 1, policy)
        # What the sandbox held in the latest start of each instance (what `sandbox.apply` reported).
        self.sandbox_reports: dict[int, SandboxReport] = {}
        self._warned_unconfined = False
        rows = max(1, self.max_batch_size)
        batched = self.max_batch_size > 0
        self.slab_bytes = max(_MIN_SLAB, rows * _row_bytes(self.inputs, batched))
        self.out_slab_bytes = max(_MIN_SLAB, rows * _row_bytes(self.outputs, batched))
        self._workers: list[_Worker] = []
        self._idle: deque[_Worker] = deque()
        self._waiters: deque[asyncio.Future[_Worker]] = deque()
        self._restarts: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def alive_instances(self) -> int:
        return sum(1 for w in self._workers if w.alive)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.alive]

    @property
    def shared_memory_names(self) -> list[str]:
        """The slabs the workers use now (under /dev/shm on Linux)."""
        return [name for w in self._workers for name in (w.in_slab.name, w.out_slab.name)]

    def _sandboxed(self, worker: _Worker, report: SandboxReport) -> None:
        """Log what confines a worker: once per pool in full, and a warning while something is missing."""
        first = not self.sandbox_reports
        self.sandbox_reports[worker.index] = report
        if report.mode == "off":
            if first:
                log.warning("model workers for %s run unconfined (worker_sandbox=off)", self.name)
            return
        if report.missing_essential and not self._warned_unconfined:
            self._warned_unconfined = True
            log.warning("model worker %s (pid %d) is only partly confined: %s", worker.label, worker.pid,
                        report.summary())  # fmt: skip
        elif first:
            log.info("model worker %s (pid %d) %s", worker.label, worker.pid, report.summary())

    async def start(self) -> None:
        """Spawn every instance and load the model in each; the loader's error if one fails."""
        if self.worker_config.device != "cpu":
            parse_device(self.worker_config.device)  # fail fast, with the clear message, here
        self._workers = [_Worker(self, i) for i in range(self.instance_count)]
        results = await asyncio.gather(*(w.start() for w in self._workers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise errors[0]
        self._idle.extend(self._workers)

    async def run_batch(self, inputs: dict[str, np.ndarray]) -> BatchResult:
        worker = await self._acquire()
        try:
            worker.busy = True
            result = await worker.run(inputs)
        except asyncio.CancelledError:
            raise  # busy stays set: the worker rejoins the pool when its answer arrives
        except BaseException:
            worker.busy = False
            self._release(worker)
            raise
        worker.busy = False
        self._release(worker)
        return result

    async def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Run a batch of zeros at each size on every instance."""
        batched = self.max_batch_size > 0
        for size in batch_sizes or [1]:
            inputs = warmup_inputs(self.inputs, size, batched)
            await asyncio.gather(*(self.run_batch(inputs) for _ in range(self.alive_instances)))

    async def close(self) -> None:
        """Stop the workers and free their shared memory."""
        self._closed = True
        restarts = list(self._restarts)
        for task in restarts:
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
        for worker in self._workers:
            worker.fail_in_flight(Unavailable(f"model {self.name} is unloading; retry"))
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(Unavailable(f"model {self.name} is unloading; retry"))
        self._waiters.clear()
        await asyncio.gather(*(w.stop() for w in self._workers), return_exceptions=True)
        for worker in self._workers:
            worker.free_slabs()
        self._idle.clear()

    # --- instance bookkeeping -----------------------------------------------------------------

    async def _acquire(self) -> _Worker:
        while self._idle:
            worker = self._idle.popleft()
            if worker.alive:
                return worker
        if self._closed:
            raise Unavailable(f"model {self.name} is unloading; retry")
        if not any(w.alive for w in self._workers):
            raise Unavailable(f"no live model worker for {self.name} (restarting); retry")
        waiter: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await waiter

    def _release(self, worker: _Worker) -> None:
        if not worker.alive or self._closed:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    def _worker_died(self, worker: _Worker) -> None:
        worker.busy = False
        if self._closed:
            return
        if not any(w.alive for w in self._workers):
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(
                        Unavailable(f"no live model worker for {self.name} (restarting); retry")
                    )
        task = asyncio.get_running_loop().create_task(self._restart(worker))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, worker: _Worker) -> None:
        code = await worker._reap()
        worker.fail_in_flight(Unavailable(f"model worker for {self.name} crashed (exit code {code}); retry"))
        why = worker.end_reason or "crashed"
        log.error("model worker for %s %s (exit code %s); restarting", self.name, why, code)
        delay = 0.5
        while not self._closed:
            try:
                await worker.start()
            except AiaasError as exc:
                log.error("restarting model worker for %s failed: %s", self.name, exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self._release(worker)
            return


class InProcessRunner(_Runner):
    """The same interface as `WorkerPool`, running the model in a thread pool of this process."""

    def __init__(self, **model: Unpack[ModelArgs]) -> None:
        super().__init__(model)
        self._model: LoadedModel | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def alive_instances(self) -> int:
        return self.instance_count if self._model is not None else 0

    @property
    def pids(self) -> list[int]:
        return [os.getpid()] if self._model is not None else []

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(self.instance_count, thread_name_prefix=f"model-{self.name}")
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(self._executor, lambda: load_model(
            self.artifact_path, self.format, self.inputs, self.outputs, device=self.device,
            threads=self.torch_threads))

    async def run_batch(self, inputs: dict[str, np.ndarray]) -> BatchResult:
        model, executor = self._model, self._executor
        if model is None or executor is None:
            raise Unavailable(f"model {self.name} is not loaded; retry")
        outputs, in_ns, infer_ns, out_ns = await asyncio.get_running_loop().run_in_executor(
            executor, model.run, inputs
        )
        return BatchResult(outputs, in_ns, infer_ns, out_ns)

    async def warmup(self, batch_sizes: Sequence[int]) -> None:
        for size in batch_sizes or [1]:
            await self.run_batch(warmup_inputs(self.inputs, size, self.max_batch_size > 0))

    async def close(self) -> None:
        self._model = None
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)
