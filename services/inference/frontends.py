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
import dataclasses
import json
import logging
import shutil
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
from services.common.processes import ProcessKeeper, child_environment
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
        self._port = 0
        self._link_server: asyncio.AbstractServer | None = None
        self._internal: grpc.aio.Server | None = None
        self._keeper = ProcessKeeper("inference frontend", count - 1, self._spawn, ready_line=READY_LINE,
                                     grace_period_s=settings.grace_period_s)

    @property
    def pids(self) -> list[int]:
        return self._keeper.pids

    @property
    def restarts(self) -> int:
        return self._keeper.restarts

    async def start(self, port: int) -> None:
        """Open the link and the internal server, start the frontends, wait until they accept."""
        if self.count <= 1:
            return
        self._port = port
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
        ready = await self._keeper.start()
        log.info("inference serves port %d from %d processes (%d frontends ready)", port, 1 + ready, ready)

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        assert self._dir is not None
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.inference.frontend", str(self._dir), "--port", str(self._port),
            "--max-receive-bytes", str(self.app.max_receive_bytes), stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env=child_environment())

    def begin_drain(self) -> None:
        """SIGTERM every frontend: each stops accepting and drains its calls (the core still answers them)."""
        self._keeper.begin_drain()

    async def close(self) -> None:
        """Drain and end the frontends (SIGKILL past the grace period), then close the link."""
        await self._keeper.close()
        if self._link_server is not None:
            self._link_server.close()
        if self._internal is not None:
            await self._internal.stop(0)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
