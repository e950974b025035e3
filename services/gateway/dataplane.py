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

A request to a decoupled (generative) model on ModelStreamInfer gets a ModelStreamInfer call of
its own upstream (`InferenceUpstream.stream`), and every response of it is relayed until the one
flagged final; its token usage is charged to the token quotas and reported with the request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from tritonclient.grpc import service_pb2 as pb

from services.common.datatypes import BytesBudget, check_raw_size
from services.common.errors import AiaasError, Internal, InvalidArgument, PermissionDenied, Unavailable
from services.common.reporting import UNKNOWN_MODEL, GenerationStats, RequestRecord, TelemetryReporter
from services.gateway.drift_sampler import DriftSampler
from services.gateway.entities import Caller, Role
from services.gateway.generation import GenerationMeter, int_parameter, stream_error
from services.gateway.keys import KeyRing, authorize
from services.gateway.kinds import ModelKinds
from services.gateway.limits import RequestLimits, check_request
from services.gateway.merging import Merger
from services.gateway.predictions import PredictionLog
from services.gateway.quotas import Bucket, QuotaEnforcer
from services.gateway.relay import ReadAhead, StreamRelay
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
# Asks inference for errors of a forwarded generation as statuses (retried, mapped) rather than in-band.
_GRPC_ERRORS = ("triton_grpc_error", "true")


class Upstream(Protocol):
    async def call(self, method: str, request: bytes, *, timeout: float,
                   metadata: tuple[tuple[str, str], ...] = (), retry_not_found: bool = False) -> bytes: ...

    async def call_each(self, method: str, request: bytes, *, timeout: float,
                        metadata: tuple[tuple[str, str], ...] = ()) -> list[bytes]: ...

    def stream(self, request: bytes, *, timeout: float, metadata: Sequence[tuple[str, str]] = (),
               retry_not_found: bool = False) -> AsyncIterator[bytes]: ...


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
    return _string_parameter_of(request.parameters, name)


def _string_parameter_of(parameters: Any, name: str) -> str:
    if name in parameters:
        return str(parameters[name].string_param)
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
        kinds: ModelKinds | None = None, generation_timeout_s: float = 600.0, merge_max_in_flight: int = 1,
        replicas: Callable[[], int] = lambda: 1,
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
        # Deadline of a generation whose caller sets none (it lasts as long as its tokens take).
        self.generation_timeout_s = generation_timeout_s
        self.kinds = kinds if kinds is not None else ModelKinds(self._fetch_config)
        # A callable saying whether the gateway is ready (registry synced, replicas known).
        self.ready = ready or (lambda: True)
        self.shadows = ShadowMirror(upstream.call, reporter, max_concurrency=shadow_max_concurrency,
                                    tolerance=shadow_tolerance, timeout_s=default_timeout_s)
        # Drift samples go nowhere without a reporter that has a monitor: then nothing is decoded.
        self.drift = DriftSampler(reporter, drift_sample_rate if reporter is not None and reporter.target else 0.0)
        # Predictions of a share of answered requests with an id, kept for Feedback.
        self.predictions = predictions
        # ModelInfer forwarding; requests to a busy target merge into one call (merging.py).
        self.merger = Merger(self._forward_infer, max_in_flight=merge_max_in_flight, replicas=replicas)

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
        request = pb.ModelInferRequest.FromString(raw)
        answer, resolution = await self._infer(caller, request, raw, call, started, streaming=False)
        return answer, resolution  # type: ignore[return-value]  # bytes: not streaming

    def _admit(self, caller: Caller, request: Any, call: CallInfo) -> Resolution:
        """Who may call what, and where it goes (no I/O)."""
        name = request.model_name
        authorize(caller, Role.INFER, name.partition(":")[0])
        resolution = self.catalog.resolve(
            name, request.model_version, call.alias or _string_parameter(request, ALIAS_PARAMETER),
            call.routing_key or _string_parameter(request, ROUTING_KEY_PARAMETER),
        )
        check_priority(caller, request)
        return resolution

    async def _infer(self, caller: Caller, request: Any, raw: bytes, call: CallInfo, started: float | None, *,
                     streaming: bool, generative_only: bool = False, meter: GenerationMeter | None = None,
                     ) -> tuple[bytes | AsyncIterator[tuple[bytes, Any]], Resolution]:
        """Forward one request. With `streaming`, a request to a decoupled model answers the
        iterator of its responses (see `_generate`, which reports it), anything else its one answer;
        with `generative_only`, a request to any other model is refused."""
        started = time.perf_counter() if started is None else started
        resolution: Resolution | None = None
        status = "OK"
        generation: GenerationStats | None = None
        handed_off = False
        try:
            resolution = self._admit(caller, request, call)
            await self.quotas.check(caller, resolution.model, resolution.quota)
            forward = resolution.forward()
            # A cache hit after the first request to a version (its ModelConfig, asked once). A stream
            # must know (a generation is forwarded on a stream of its own); a unary call does not wait.
            decoupled = (await self.kinds.decoupled(resolution.model, resolution.version, forward) if streaming
                         else self.kinds.known(resolution.model, resolution.version, forward))
            if generative_only and decoupled is None:
                raise Unavailable(
                    f"model {resolution.model!r} version {resolution.version} is not ready on any inference "
                    "replica yet (its configuration could not be read); retry shortly"
                )
            if generative_only and not decoupled:
                raise InvalidArgument(
                    f"model {resolution.model!r} (version {resolution.version}) is not a generative model: it "
                    "takes tensors (call it with the KServe v2 / Triton gRPC API on the gateway's gRPC port)"
                )
            check_request(request, len(raw), self.limits, self.signatures.get(resolution.model, resolution.version))
            check_bytes_inputs(request, resolution.model)
            tokens: list[Bucket] = []
            if decoupled:
                tokens = self.quotas.token_buckets(caller, resolution.model, resolution.quota)
                await self.quotas.check_tokens(tokens)
            if streaming and decoupled:
                handed_off = True
                return self._generate(caller, request, raw, resolution, call, started, tokens, meter), resolution
            plan = self.kinds.plan(resolution.model, resolution.version) if decoupled is False else None
            response = await self.merger.forward(request, retarget(raw, *forward), forward, plan,
                                                 self._timeout(call), call.forward)
            served = response_version(response)
            if served.isdigit() and int(served) != resolution.version:
                resolution = dataclasses.replace(resolution, version=int(served))
            if decoupled is None:  # not known yet: a generative model's answer says so itself
                parameters = pb.ModelInferResponse.FromString(response).parameters
                decoupled = "completion_tokens" in parameters
                tokens = self.quotas.token_buckets(caller, resolution.model, resolution.quota) if decoupled else []
            if decoupled:
                parameters = pb.ModelInferResponse.FromString(response).parameters
                generation = GenerationStats(prompt_tokens=int_parameter(parameters, "prompt_tokens"),
                                             completion_tokens=int_parameter(parameters, "completion_tokens"),
                                             finish_reason=_string_parameter_of(parameters, "finish_reason"))
                await self._charge(tokens, generation.prompt_tokens + generation.completion_tokens)
            if resolution.shadows:
                self.shadows.mirror(raw, resolution, response)
            if not decoupled:
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
            if not handed_off:
                self._report(resolution, caller, status, started, generation)

    async def _forward_infer(self, raw: bytes, timeout: float, metadata: tuple[tuple[str, str], ...]) -> bytes:
        return await self.upstream.call("ModelInfer", raw, timeout=timeout, metadata=metadata, retry_not_found=True)

    async def _fetch_config(self, model: str, version: str) -> bytes:
        request = pb.ModelConfigRequest(name=model, version=version).SerializeToString()
        return await self.upstream.call("ModelConfig", request, timeout=min(5.0, self.default_timeout_s),
                                        retry_not_found=True)

    async def _charge(self, tokens: Sequence[Bucket], used: int) -> None:
        try:
            await self.quotas.charge_tokens(tokens, used)
        except AiaasError as exc:  # the request is done: a store that cannot take the charge costs the quota only
            log.warning("token usage of %d not charged: %s", used, exc.message)

    # Generations --------------------------------------------------------------------------------

    async def open_generation(self, caller: Caller, request: Any, call: CallInfo, started: float | None = None,
                              meter: GenerationMeter | None = None,
                              ) -> tuple[AsyncIterator[tuple[bytes, Any]], Resolution]:
        """A request to a generative model (the OpenAI door): admitted, quota-checked and forwarded
        like any stream request; InvalidArgument when the model it resolves to is not generative.
        `meter` (the caller's) has observed each response by the time it is yielded."""
        raw = request.SerializeToString()
        answer, resolution = await self._infer(caller, request, raw, call, started, streaming=True,
                                               generative_only=True, meter=meter)
        if isinstance(answer, bytes):
            raise Internal("a generation was answered as a tensor request")
        # Read ahead of the caller, so a response's upstream read overlaps the writing of the last.
        return ReadAhead(answer, self.stream_window), resolution

    async def _generate(self, caller: Caller, request: Any, raw: bytes, resolution: Resolution, call: CallInfo,
                        started: float, tokens: Sequence[Bucket], meter: GenerationMeter | None = None,
                        ) -> AsyncIterator[tuple[bytes, Any]]:
        """The responses of one generation, raw and parsed, until the final one; then its usage is
        charged and the request reported. Closing it early cancels the generation upstream."""
        if meter is None:
            meter = GenerationMeter(started)
        status = "OK"
        final = False
        timeout = call.timeout if call.timeout is not None else self.generation_timeout_s
        responses = self.upstream.stream(retarget(raw, *resolution.forward()), timeout=timeout,
                                         metadata=(*call.forward, _GRPC_ERRORS), retry_not_found=True)
        try:
            async for answer in responses:
                message = pb.ModelStreamInferResponse.FromString(answer)
                if message.error_message:
                    raise Internal(f"model {resolution.model!r}: {message.error_message}")
                final = meter.observe(message.infer_response)
                yield answer, message
                if final:
                    return
            raise Internal(f"model {resolution.model!r} ended its responses without a final one")
        except AiaasError as exc:
            status = exc.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if not final:  # closed after its final response is a finished generation
                status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            await responses.aclose()  # type: ignore[attr-defined]
            await self._charge(tokens, meter.total_tokens)
            self._report(resolution, caller, status, started,
                         meter.stats("" if final else "cancelled" if status == "CANCELLED" else "error"))

    def _report(self, resolution: Resolution | None, caller: Caller | None, status: str, started: float,
                generation: GenerationStats | None = None) -> None:
        # The one call per finished request to the monitor (a no-op without one). A model name the
        # caller chose is never a label: refused and unknown models all count as UNKNOWN_MODEL.
        if self.reporter is None:
            return
        self.reporter.record(RequestRecord(
            source="gateway", model=resolution.model if resolution else UNKNOWN_MODEL,
            version=resolution.version if resolution else 0, alias=resolution.alias if resolution else "",
            status=status, latency_us=int((time.perf_counter() - started) * 1e6),
            key_id=caller.key_id if caller else "", generation=generation,
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
        pending: asyncio.Queue[asyncio.Task[bytes | StreamRelay] | BaseException | None] = asyncio.Queue(self.stream_window)
        loop = asyncio.get_running_loop()
        relay: StreamRelay | None = None

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
                answer = await item
                if isinstance(answer, bytes):
                    yield answer
                    continue
                relay = answer
                async for response in relay:
                    yield response
                relay = None
        finally:
            reader.cancel()
            if relay is not None:
                relay.cancel()
            while not pending.empty():
                left = pending.get_nowait()
                if isinstance(left, asyncio.Task):
                    left.cancel()
                    done = left.result() if left.done() and not left.cancelled() and not left.exception() else None
                    if isinstance(done, StreamRelay):
                        done.cancel()

    async def _stream_one(self, caller: Caller, raw: bytes, call: CallInfo) -> bytes | StreamRelay:
        # Not the stream's deadline: a tensor request gets default_timeout_s, a generation generation_timeout_s.
        per_request = dataclasses.replace(call, timeout=None)
        request = pb.ModelInferRequest.FromString(raw)
        try:
            answer, _ = await self._infer(caller, request, raw, per_request, None, streaming=True)
        except AiaasError as exc:
            if call.grpc_error:
                raise
            return stream_error(request, exc.message, final=False)
        if isinstance(answer, bytes):
            return wrap_stream_response(answer)
        return StreamRelay(answer, request, call.grpc_error, self.stream_window)

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
