"""The data plane: authenticate, resolve, limit, validate and forward KServe v2 calls.

Only a key with the priority role may choose a request's `priority` level (others get
PERMISSION_DENIED for any level but the default, 0); only a resolved model gets its own metrics
label (refused and unknown names are all counted as `_unknown`); a stream re-checks its key for
every request, so revoking or expiring a key ends its open streams at their next request.

Requests arrive and leave as raw bytes: the gateway parses a request's header fields, and
forwards the caller's own bytes with the chosen `model_version` appended, so tensors are
never re-serialized. Declared shapes are checked against the raw bytes before forwarding
(BYTES included: a 4-byte length prefix per element at least), without decoding a tensor.
No grpc API here: the servicer hands in what it read from the call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from tritonclient.grpc import service_pb2 as pb

from services.common.datatypes import BytesBudget, check_raw_size
from services.common.errors import AiaasError, PermissionDenied, Unavailable
from services.common.reporting import UNKNOWN_MODEL, RequestRecord, TelemetryReporter
from services.gateway.drift_sampler import DriftSampler
from services.gateway.entities import Caller, Role
from services.gateway.keys import KeyRing, authorize
from services.gateway.limits import RequestLimits, check_request
from services.gateway.predictions import PredictionLog
from services.gateway.quotas import QuotaEnforcer
from services.gateway.router import Catalog, Resolution
from services.gateway.shadow import ShadowMirror
from services.gateway.signatures import SignatureCache
from services.gateway.stats import merge_index, merge_statistics
from services.gateway.wire import response_version, retarget, wrap_stream_response

log = logging.getLogger("aiaas.gateway.dataplane")

# Request parameters a caller may use instead of metadata to choose an alias or routing key.
ALIAS_PARAMETER = "alias"
ROUTING_KEY_PARAMETER = "routing_key"
# The KServe / Triton request parameter choosing a priority level (0: the model's default level).
PRIORITY_PARAMETER = "priority"


class Upstream(Protocol):
    async def call(self, method: str, request: bytes, *, timeout: float,
                   metadata: tuple[tuple[str, str], ...] = (), retry_not_found: bool = False) -> bytes: ...

    async def call_each(self, method: str, request: bytes, *, timeout: float,
                        metadata: tuple[tuple[str, str], ...] = ()) -> list[bytes]: ...


@dataclasses.dataclass(slots=True)
class CallInfo:
    """What the transport read from the call."""

    authorization: str | None = None
    alias: str = ""
    routing_key: str = ""
    # Seconds left before the caller's deadline; None when it set none.
    timeout: float | None = None
    # Metadata passed on to inference (W3C trace context, request id).
    forward: tuple[tuple[str, str], ...] = ()
    # A stream opened with `triton_grpc_error: true` ends on its first error instead of in-band errors.
    grpc_error: bool = False


def _string_parameter(request: Any, name: str) -> str:
    if name in request.parameters:
        return str(request.parameters[name].string_param)
    return ""


def check_priority(caller: Caller, request: Any) -> None:
    """PermissionDenied when a caller without the priority role asks for any level but the default."""
    if PRIORITY_PARAMETER not in request.parameters or caller.has_role(Role.PRIORITY):
        return
    parameter = request.parameters[PRIORITY_PARAMETER]
    kind = parameter.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param") and getattr(parameter, kind) == 0:
        return
    raise PermissionDenied(
        f"API key {caller.key_id} lacks the {Role.PRIORITY.value!r} role: it may not set the request's "
        f"{PRIORITY_PARAMETER!r} parameter (leave it unset for the model's default level)"
    )


def check_bytes_inputs(request: Any, model: str) -> None:
    """Each BYTES input's declared shape against its raw bytes and the per-request BYTES bounds.

    O(inputs), nothing decoded; fixed-size inputs are checked by `check_request`. Only a request
    with one raw entry per input is checked: inference refuses any other mix before decoding.
    """
    tensors = request.inputs
    raws = request.raw_input_contents
    if len(raws) != len(tensors):
        return
    budget = BytesBudget()
    for tensor, data in zip(tensors, raws, strict=True):
        if tensor.datatype == "BYTES":
            check_raw_size(tensor.name, "BYTES", tensor.shape, len(data), budget, model)


class DataPlane:
    def __init__(
        self, *, catalog: Catalog, ring: KeyRing, quotas: QuotaEnforcer, upstream: Upstream,
        limits: RequestLimits | None = None, signatures: SignatureCache | None = None,
        reporter: TelemetryReporter | None = None, default_timeout_s: float = 30.0,
        shadow_max_concurrency: int = 16, shadow_tolerance: float = 1e-4, stream_window: int = 64,
        drift_sample_rate: float = 0.0, ready: Any = None, predictions: PredictionLog | None = None,
    ) -> None:
        self.catalog = catalog
        self.ring = ring
        self.quotas = quotas
        self.upstream = upstream
        self.limits = limits or RequestLimits()
        self.signatures = signatures or SignatureCache(None)
        self.reporter = reporter
        self.default_timeout_s = default_timeout_s
        self.stream_window = stream_window
        # A callable saying whether the gateway is ready (registry synced, replicas known).
        self.ready = ready or (lambda: True)
        self.shadows = ShadowMirror(upstream.call, reporter, max_concurrency=shadow_max_concurrency,
                                    tolerance=shadow_tolerance, timeout_s=default_timeout_s)
        # Drift samples go nowhere without a reporter that has a monitor: then nothing is decoded.
        self.drift = DriftSampler(reporter, drift_sample_rate if reporter is not None and reporter.target else 0.0)
        # Predictions of a share of answered requests with an id, kept for Feedback.
        self.predictions = predictions

    def _timeout(self, call: CallInfo) -> float:
        return call.timeout if call.timeout is not None else self.default_timeout_s

    # ModelInfer -----------------------------------------------------------------------------

    async def infer(self, raw: bytes, call: CallInfo) -> tuple[bytes, Resolution]:
        started = time.perf_counter()
        try:
            caller = self.ring.authenticate(call.authorization)
        except AiaasError as exc:
            self._report(None, None, exc.code.name, started)
            raise
        return await self.infer_as(caller, raw, call, started)

    async def infer_as(self, caller: Caller, raw: bytes, call: CallInfo,
                       started: float | None = None) -> tuple[bytes, Resolution]:
        started = time.perf_counter() if started is None else started
        resolution: Resolution | None = None
        status = "OK"
        request = pb.ModelInferRequest.FromString(raw)
        name = request.model_name
        try:
            authorize(caller, Role.INFER, name.partition(":")[0])
            resolution = self.catalog.resolve(
                name, request.model_version, call.alias or _string_parameter(request, ALIAS_PARAMETER),
                call.routing_key or _string_parameter(request, ROUTING_KEY_PARAMETER),
            )
            check_priority(caller, request)
            await self.quotas.check(caller, resolution.model, resolution.quota)
            check_request(request, len(raw), self.limits, self.signatures.get(resolution.model, resolution.version))
            check_bytes_inputs(request, resolution.model)
            response = await self.upstream.call(
                "ModelInfer", retarget(raw, *resolution.forward()), timeout=self._timeout(call),
                metadata=call.forward, retry_not_found=True,
            )
            served = response_version(response)
            if served.isdigit() and int(served) != resolution.version:
                resolution = dataclasses.replace(resolution, version=int(served))
            if resolution.shadows:
                self.shadows.mirror(raw, resolution, response)
            self.drift.maybe_sample(request, resolution.model, resolution.version)
            if self.predictions is not None and request.id:
                self.predictions.maybe_keep(request.id, response, resolution.model, resolution.version,
                                            resolution.alias, caller.key_id)
            return response, resolution
        except AiaasError as exc:
            status = exc.code.name
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self._report(resolution, caller, status, started)

    def _report(self, resolution: Resolution | None, caller: Caller | None, status: str, started: float) -> None:
        # The one call per finished request to the monitor (a no-op without one). A model name the
        # caller chose is never a label: refused and unknown models all count as UNKNOWN_MODEL.
        if self.reporter is None:
            return
        self.reporter.record(RequestRecord(
            source="gateway", model=resolution.model if resolution else UNKNOWN_MODEL,
            version=resolution.version if resolution else 0, alias=resolution.alias if resolution else "",
            status=status, latency_us=int((time.perf_counter() - started) * 1e6),
            key_id=caller.key_id if caller else "",
        ))

    # ModelStreamInfer ---------------------------------------------------------------------------

    def _stream_caller(self, call: CallInfo) -> Caller:
        started = time.perf_counter()
        try:
            return self.ring.authenticate(call.authorization)
        except AiaasError as exc:
            self._report(None, None, exc.code.name, started)
            raise

    async def stream(self, requests: AsyncIterator[bytes], call: CallInfo) -> AsyncIterator[bytes]:
        """Proxy a stream request by request; answers come back in request order.

        The key is checked again for each request (a cache hit unless a key changed): once it is
        revoked or expired, the answers already under way are sent and the stream ends with
        UNAUTHENTICATED."""
        self._stream_caller(call)
        pending: asyncio.Queue[asyncio.Task[bytes] | BaseException | None] = asyncio.Queue(self.stream_window)
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                async for raw in requests:
                    caller = self._stream_caller(call)
                    await pending.put(loop.create_task(self._stream_one(caller, raw, call)))
                await pending.put(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - handed to the writer to end the stream
                await pending.put(exc)

        reader = loop.create_task(read())
        try:
            while True:
                item = await pending.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield await item
        finally:
            reader.cancel()
            while not pending.empty():
                left = pending.get_nowait()
                if isinstance(left, asyncio.Task):
                    left.cancel()

    async def _stream_one(self, caller: Caller, raw: bytes, call: CallInfo) -> bytes:
        per_request = dataclasses.replace(call, timeout=self.default_timeout_s)
        try:
            response, _ = await self.infer_as(caller, raw, per_request)
            return wrap_stream_response(response)
        except AiaasError as exc:
            if call.grpc_error:
                raise
            request = pb.ModelInferRequest.FromString(raw)
            return pb.ModelStreamInferResponse(error_message=exc.message, infer_response=pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id,
            )).SerializeToString()

    # Model-scoped reads -------------------------------------------------------------------------

    async def model_read(self, method: str, raw: bytes, call: CallInfo) -> tuple[bytes, Resolution]:
        """ModelReady / ModelMetadata / ModelConfig: resolved like an inference, then forwarded."""
        caller = self.ring.authenticate(call.authorization)
        # Every model-scoped request message has name = 1 and version = 2.
        request = pb.ModelMetadataRequest.FromString(raw)
        authorize(caller, Role.READ, request.name.partition(":")[0])
        resolution = self.catalog.resolve(request.name, request.version, call.alias)
        answer = await self.upstream.call(method, retarget(raw, *resolution.forward()),
                                          timeout=self._timeout(call), metadata=call.forward,
                                          retry_not_found=True)
        # Inference echoes the `model:alias` it was asked for; the caller asked for the model.
        if method == "ModelMetadata":
            metadata = pb.ModelMetadataResponse.FromString(answer)
            metadata.name = resolution.model
            answer = metadata.SerializeToString()
        elif method == "ModelConfig":
            config = pb.ModelConfigResponse.FromString(answer)
            config.config.name = resolution.model
            answer = config.SerializeToString()
        return answer, resolution

    async def statistics(self, raw: bytes, call: CallInfo) -> bytes:
        caller = self.ring.authenticate(call.authorization)
        request = pb.ModelStatisticsRequest.FromString(raw)
        authorize(caller, Role.READ, request.name or None)
        answers = await self.upstream.call_each("ModelStatistics", raw, timeout=self._timeout(call),
                                                metadata=call.forward)
        merged = merge_statistics((pb.ModelStatisticsResponse.FromString(a) for a in answers), caller.may_see)
        return merged.SerializeToString()

    async def repository_index(self, raw: bytes, call: CallInfo) -> bytes:
        caller = self.ring.authenticate(call.authorization)
        authorize(caller, Role.READ)
        request = pb.RepositoryIndexRequest.FromString(raw)
        answers = await self.upstream.call_each("RepositoryIndex", raw, timeout=self._timeout(call),
                                                metadata=call.forward)
        merged = merge_index((pb.RepositoryIndexResponse.FromString(a) for a in answers), caller.may_see,
                             request.ready)
        return merged.SerializeToString()

    async def repository_change(self, call: CallInfo) -> bytes:
        caller = self.ring.authenticate(call.authorization)
        authorize(caller, Role.ADMIN)
        raise Unavailable(
            "explicit model load / unload is not allowed: versions load from the registry; move an alias instead"
        )

    def server_ready(self) -> bytes:
        return pb.ServerReadyResponse(ready=bool(self.ready())).SerializeToString()
