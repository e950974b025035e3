"""The data plane: authenticate, resolve, limit, validate and forward KServe v2 calls.

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
import random
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from opentelemetry import metrics
from tritonclient.grpc import service_pb2 as pb

from services.common.errors import AiaasError, Unavailable
from services.common.reporting import RequestRecord, TelemetryReporter
from services.gateway.domain import Caller, Role
from services.gateway.keys import KeyRing, authorize
from services.gateway.limits import RequestLimits, check_request
from services.gateway.quotas import QuotaEnforcer
from services.gateway.router import Catalog, Resolution, ShadowCopy
from services.gateway.shadow import compare_responses
from services.gateway.signatures import SignatureCache
from services.gateway.stats import merge_index, merge_statistics
from services.gateway.wire import response_version, retarget, wrap_stream_response
from services.inference.datatypes import BytesBudget, check_raw_size, raw_to_array

log = logging.getLogger("aiaas.gateway.dataplane")

# Request parameters a caller may use instead of metadata to choose an alias or routing key.
ALIAS_PARAMETER = "alias"
ROUTING_KEY_PARAMETER = "routing_key"
_INLINE_COMPARE_BYTES = 256 * 1024
# Datatypes decoded for drift samples (numbers with a numpy dtype; BYTES, BOOL and BF16 are left out).
_DRIFT_DATATYPES = frozenset(("FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64",
                              "UINT8", "UINT16", "UINT32", "UINT64"))
# Drift samples scheduled but not yet taken; beyond this, samples are dropped (bounded work).
_DRIFT_MAX_PENDING = 8


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


@dataclasses.dataclass
class ShadowStats:
    compared: int = 0
    mismatched: int = 0
    max_abs_diff: float = 0.0


def _string_parameter(request: Any, name: str) -> str:
    if name in request.parameters:
        return str(request.parameters[name].string_param)
    return ""


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
        drift_sample_rate: float = 0.0, ready: Any = None,
    ) -> None:
        self.catalog = catalog
        self.ring = ring
        self.quotas = quotas
        self.upstream = upstream
        self.limits = limits or RequestLimits()
        self.signatures = signatures or SignatureCache(None)
        self.reporter = reporter
        self.default_timeout_s = default_timeout_s
        self.shadow_max_concurrency = shadow_max_concurrency
        self.shadow_tolerance = shadow_tolerance
        self.stream_window = stream_window
        # Share of successful ModelInfer requests whose inputs go to the monitor for drift
        # (the reporter caps it further, per model per second). 0 turns sampling off.
        self.drift_sample_rate = drift_sample_rate if reporter is not None and reporter.target else 0.0
        self.drift_pending = 0
        self.drift_dropped = 0
        # A callable saying whether the gateway is ready (registry synced, replicas known).
        self.ready = ready or (lambda: True)
        self.shadow_stats: dict[tuple[str, int, int], ShadowStats] = {}
        self.shadow_dropped = 0
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        meter = metrics.get_meter("aiaas.gateway")
        self._shadow_diff = meter.create_histogram(
            "gateway.shadow.max_abs_diff", description="Largest output difference, shadow vs live"
        )
        self._shadow_mismatch = meter.create_counter(
            "gateway.shadow.mismatches", description="Shadow answers that differ from the live one"
        )

    def _timeout(self, call: CallInfo) -> float:
        return call.timeout if call.timeout is not None else self.default_timeout_s

    # ModelInfer -----------------------------------------------------------------------------

    async def infer(self, raw: bytes, call: CallInfo) -> tuple[bytes, Resolution]:
        started = time.perf_counter()
        try:
            caller = self.ring.authenticate(call.authorization)
        except AiaasError as exc:
            self._report(None, "", None, exc.code.name, started)
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
                self._mirror(raw, resolution, response)
            if self.drift_sample_rate and random.random() < self.drift_sample_rate:
                self._schedule_drift_sample(request, resolution)
            return response, resolution
        except AiaasError as exc:
            status = exc.code.name
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self._report(resolution, name, caller, status, started)

    def _report(self, resolution: Resolution | None, name: str, caller: Caller | None, status: str,
                started: float) -> None:
        # The one call per finished request to the monitor (a no-op without one).
        if self.reporter is None:
            return
        self.reporter.record(RequestRecord(
            source="gateway", model=resolution.model if resolution else name.partition(":")[0],
            version=resolution.version if resolution else 0, alias=resolution.alias if resolution else "",
            status=status, latency_us=int((time.perf_counter() - started) * 1e6),
            key_id=caller.key_id if caller else "",
        ))

    # Drift samples ------------------------------------------------------------------------------

    def _schedule_drift_sample(self, request: Any, resolution: Resolution) -> None:
        """Decode and offer the inputs on a later loop turn, after the answer has been handed to gRPC."""
        if self.drift_pending >= _DRIFT_MAX_PENDING:
            self.drift_dropped += 1
            return
        self.drift_pending += 1
        asyncio.get_running_loop().call_soon(self._drift_sample, request, resolution.model, resolution.version)

    def _drift_sample(self, request: Any, model: str, version: int) -> None:
        self.drift_pending -= 1
        reporter = self.reporter
        if reporter is None:
            return
        try:
            inputs = {}
            raw_contents = request.raw_input_contents
            if len(raw_contents) != len(request.inputs):
                return  # typed `contents` (not raw bytes): not sampled
            for spec, raw in zip(request.inputs, raw_contents, strict=True):
                if spec.datatype in _DRIFT_DATATYPES:
                    inputs[spec.name] = raw_to_array(raw, spec.datatype, spec.shape)
            if inputs:
                reporter.sample_inputs(model, version, inputs)
        except Exception:  # drift sampling must never disturb serving
            log.debug("drift sample skipped", exc_info=True)

    # Shadows ----------------------------------------------------------------------------------

    def _mirror(self, raw: bytes, resolution: Resolution, live: bytes) -> None:
        for copy in resolution.shadows:
            if len(self._shadow_tasks) >= self.shadow_max_concurrency:
                self.shadow_dropped += 1
                continue
            task = asyncio.get_running_loop().create_task(
                self._shadow(retarget(raw, *copy.forward(resolution.model)), resolution, copy, live)
            )
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, request: bytes, resolution: Resolution, copy: ShadowCopy, live: bytes) -> None:
        shadow_version = copy.version
        try:
            answer = await self.upstream.call("ModelInfer", request, timeout=self.default_timeout_s)
            served = response_version(answer)
            shadow_version = int(served) if served.isdigit() else shadow_version
            if shadow_version == resolution.version:
                return
            live_response = pb.ModelInferResponse.FromString(live)
            shadow_response = pb.ModelInferResponse.FromString(answer)
            if len(live) + len(answer) > _INLINE_COMPARE_BYTES:
                result = await asyncio.to_thread(compare_responses, live_response, shadow_response,
                                                 self.shadow_tolerance)
            else:
                result = compare_responses(live_response, shadow_response, self.shadow_tolerance)
            diff, mismatched = result.max_abs_diff, result.mismatched
        except AiaasError as exc:
            log.info("shadow request to %s version %d failed: %s", resolution.model, copy.version, exc.message)
            diff, mismatched = float("inf"), True
        except Exception:  # shadow traffic must never disturb serving
            log.exception("shadow comparison failed")
            return
        key = (resolution.model, resolution.version, shadow_version)
        stats = self.shadow_stats.setdefault(key, ShadowStats())
        stats.compared += 1
        stats.mismatched += int(mismatched)
        stats.max_abs_diff = max(stats.max_abs_diff, diff)
        attributes = {"model": resolution.model, "live_version": str(resolution.version),
                      "shadow_version": str(shadow_version)}
        if diff != float("inf"):
            self._shadow_diff.record(diff, attributes)
        if mismatched:
            self._shadow_mismatch.add(1, attributes)
        if self.reporter is not None:
            self.reporter.report_shadow_diff(resolution.model, resolution.version, shadow_version, diff, mismatched)

    async def drain_shadows(self) -> None:
        if self._shadow_tasks:
            await asyncio.gather(*list(self._shadow_tasks), return_exceptions=True)

    # ModelStreamInfer ---------------------------------------------------------------------------

    async def stream(self, requests: AsyncIterator[bytes], call: CallInfo) -> AsyncIterator[bytes]:
        """Proxy a stream request by request; answers come back in request order."""
        caller = self.ring.authenticate(call.authorization)
        pending: asyncio.Queue[asyncio.Task[bytes] | BaseException | None] = asyncio.Queue(self.stream_window)
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                async for raw in requests:
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
