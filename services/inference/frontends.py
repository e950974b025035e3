"""The core's side of the inference service's frontends (docs/inference.md, "Frontends").

The inference service is one core process (models, one batcher per version, worker processes,
statistics, health, the registry feed) plus `frontends - 1` frontend processes that accept gRPC on
the same port (SO_REUSEPORT; the core accepts too). A frontend terminates gRPC, checks the caller,
and hands the call to the core: `ModelInfer` over the fast link (`link`), the rest over the core's
internal gRPC server on a Unix socket. Requests from every frontend meet in the core, so batches
form across frontends and weights are loaded once per instance.

`FrontendPool` starts them once the port is bound, restarts one that dies (with backoff), and on
shutdown drains them alongside the core before the core lets go of its models.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from services.common.authz import ANYONE, IDENTITY_NAME_MAX, Authenticator, Guard, Identity
from services.common.context import method_var, request_id_var
from services.common.errors import AiaasError, InvalidArgument
from services.common.interceptors import rpc_duration_histogram
from services.common.server import ServiceApp, build_guard
from services.inference.frontend import (
    CALLER_KEY,
    CORE_SOCKET,
    LINK_SOCKET,
    MODEL_INFER,
    READY_LINE,
    SETTINGS_FILE,
)
from services.inference.link import Handler, LinkServerProtocol
from services.inference.settings import InferenceSettings

log = logging.getLogger("aiaas.inference.frontends")

READY_TIMEOUT_S = 60.0
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
# Room on the link for a call's own header and request id next to the largest request.
_LINK_OVERHEAD = 4096


class FrontendAuthenticator(Authenticator):
    """The core's internal server: the caller is who the frontend verified (its metadata); only
    the service's own user can open the socket it arrives on."""

    def __init__(self) -> None:
        super().__init__(mtls=False, tokens=None)

    def identify(self, context: grpc.aio.ServicerContext, metadata: Mapping[str, str]) -> Identity | None:
        name = metadata.get(CALLER_KEY, "")[:IDENTITY_NAME_MAX]
        return Identity(name, "frontend") if name and name != ANYONE else None


def frontend_guard(settings: InferenceSettings) -> Guard:
    """The service's own policy, applied to the identity the frontend verified."""
    guard = build_guard("inference", settings)
    return Guard("inference", FrontendAuthenticator(), guard.policy, required=guard.required)


def model_infer_handler(servicer: Any) -> Handler:
    """What the core runs for each ModelInfer a frontend hands over: the servicer's own path,
    counted in the same RPC metrics as the calls the core accepts itself."""
    histogram = rpc_duration_histogram("inference")

    async def handle(body: bytes, remaining_s: float | None, request_id: str) -> bytes:
        started = time.perf_counter()
        request_id_var.set(request_id)
        method_var.set(MODEL_INFER)
        code = "OK"
        try:
            try:
                request = service_pb2.ModelInferRequest.FromString(body)
            except DecodeError:
                raise InvalidArgument(f"malformed request to {MODEL_INFER}: {len(body)} bytes that do not parse "
                                      "as inference.ModelInferRequest") from None
            response = await servicer.infer_request(request, remaining_s)
            return response.SerializeToString()  # type: ignore[no-any-return]
        except AiaasError as exc:
            code = exc.code.status_name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            histogram.record((time.perf_counter() - started) * 1000.0,
                             {"rpc.method": MODEL_INFER, "rpc.grpc.status_code": code})

    return handle


class FrontendPool:
    """`count - 1` frontend processes beside the core, kept running until `close`."""

    def __init__(self, app: ServiceApp, settings: InferenceSettings, servicer: Any, count: int) -> None:
        self.app = app
        self.settings = settings
        self.count = count
        self._servicer = servicer
        self._dir: Path | None = None
        self._link_server: asyncio.AbstractServer | None = None
        self._internal: grpc.aio.Server | None = None
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes.values() if p.returncode is None]

    async def start(self, port: int) -> None:
        """Open the link and the internal server, start the frontends, wait until they accept."""
        if self.count <= 1:
            return
        self._dir = Path(tempfile.mkdtemp(prefix="aiaas-inference-"))  # mode 0700: this user only
        fields = dataclasses.asdict(self.settings)
        (self._dir / SETTINGS_FILE).write_text(json.dumps(fields, default=list))
        max_frame = self.app.max_receive_bytes + _LINK_OVERHEAD
        loop = asyncio.get_running_loop()
        self._link_server = await loop.create_unix_server(
            lambda: LinkServerProtocol(model_infer_handler(self._servicer), max_frame,
                                       self.settings.max_concurrent_rpcs),
            str(self._dir / LINK_SOCKET))
        self._internal = self.app.internal_server(f"unix:{self._dir / CORE_SOCKET}", frontend_guard(self.settings))
        await self._internal.start()
        ready = [loop.create_future() for _ in range(self.count - 1)]
        self._tasks = [loop.create_task(self._keep(i, port, ready[i]), name=f"inference-frontend-{i}")
                       for i in range(self.count - 1)]
        done, _ = await asyncio.wait(ready, timeout=READY_TIMEOUT_S)
        log.info("inference serves port %d from %d processes (%d frontends ready)", port,
                 1 + len(done), len(done))

    async def _spawn(self, port: int) -> asyncio.subprocess.Process:
        assert self._dir is not None
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.inference.frontend", str(self._dir), "--port", str(port),
            "--max-receive-bytes", str(self.app.max_receive_bytes), stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env=env)

    async def _keep(self, index: int, port: int, ready: asyncio.Future[None]) -> None:
        delay = RESTART_MIN_S
        while not self._stopping:
            started = time.monotonic()
            try:
                process = await self._spawn(port)
            except OSError as exc:
                log.error("could not start inference frontend %d: %s", index, exc)
            else:
                self._processes[index] = process
                assert process.stdout is not None
                line = await process.stdout.readline()
                if line.strip() == READY_LINE.encode():
                    if not ready.done():
                        ready.set_result(None)
                    log.info("inference frontend %d (pid %d) accepting", index, process.pid)
                await process.stdout.read()  # to EOF: it prints nothing else
                code = await process.wait()
                if self._stopping:
                    return
                log.warning("inference frontend %d (pid %d) exited with %s; restarting", index, process.pid, code)
                self.restarts += 1
            if time.monotonic() - started > RESTART_MAX_S:
                delay = RESTART_MIN_S
            await asyncio.sleep(delay)
            delay = min(RESTART_MAX_S, delay * 2)

    def begin_drain(self) -> None:
        """SIGTERM every frontend: each stops accepting and drains its calls (the core still answers them)."""
        self._stopping = True
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)

    async def close(self) -> None:
        """Drain and end the frontends (SIGKILL past the grace period), then close the link."""
        self.begin_drain()
        waiting = [asyncio.create_task(p.wait()) for p in self._processes.values() if p.returncode is None]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=self.settings.grace_period_s + 5.0)
            if late:
                for process in self._processes.values():
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.kill()
                await asyncio.wait(late, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._link_server is not None:
            self._link_server.close()
        if self._internal is not None:
            await self._internal.stop(0)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
