"""`inference.GRPCInferenceService` (KServe v2 / Triton gRPC) over the ModelRepository. Thin.

Errors are raised as `AiaasError`s; the service interceptor maps them to status codes. On the
stream, a request's error goes in-band in `error_message` and the stream carries on.

Each request's declared shapes are checked against its raw bytes before it is parsed (O(inputs));
a request whose tensors take element-by-element work to decode or encode (BYTES, typed contents)
is parsed and answered in a thread, so small requests on the event loop are not held up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from aiaas import __version__
from services.common.datatypes import BytesBudget, check_raw_size, element_count
from services.common.errors import (
    AiaasError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from services.inference import generate_protocol, metadata
from services.inference.batcher import effective_timeout_us
from services.inference.convert import InputPlan, ParsedRequest, build_response, parse_request, plan_for
from services.inference.repository import IndexEntry, ModelRepository, parse_version
from services.inference.triton_backend import TritonExecutor

log = logging.getLogger("aiaas.inference.servicer")

ModelCatalog = Callable[[], Awaitable[list[str]]]

_SHM = "shared memory is not supported by this server: send tensors in raw_input_contents"
_TRACE = "trace settings are not supported by this server: traces are exported with OpenTelemetry (otlp_endpoint)"
_LOG = "log settings are not supported by this server: set log_level at start-up"

# Requests of one ModelStreamInfer call running or answered but not yet written; while this many
# are, the stream is not read further, so a fast sender backs up in HTTP/2 flow control instead of
# in this server's memory. A module constant until settings.py carries it.
MAX_STREAM_IN_FLIGHT = 64
# Elements a request may ask to be decoded or encoded one by one (BYTES, typed contents) on the
# event loop (well under a millisecond); above it the work goes to the conversion threads.
INLINE_CONVERT_ELEMENTS = 4096
# Threads converting large requests; more large requests than this wait for one.
CONVERT_THREADS = 2


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, catalog: ModelCatalog | None = None, *,
                 priority_levels: int = 1, default_priority_level: int = 0) -> None:
        self._repo = repository
        self._catalog = catalog
        self._priority = (priority_levels, default_priority_level or priority_levels)
        self.ready = False
        self._converters: ThreadPoolExecutor | None = None

    # ---- health and metadata -------------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=self.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> service_pb2.ServerMetadataResponse:
        return metadata.server_metadata(__version__)

    async def ModelReady(self, request: service_pb2.ModelReadyRequest, context: Any) -> service_pb2.ModelReadyResponse:
        try:
            self._repo.resolve(request.name, request.version)
        except Unavailable:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: service_pb2.ModelMetadataRequest,
                            context: Any) -> service_pb2.ModelMetadataResponse:
        lv = self._repo.resolve(request.name, request.version)
        versions = [lv] if request.version else self._repo.ready_versions(lv.model)
        return metadata.model_metadata(request.name, versions, lv)

    async def ModelConfig(self, request: service_pb2.ModelConfigRequest,
                          context: Any) -> service_pb2.ModelConfigResponse:
        lv = self._repo.resolve(request.name, request.version)
        return service_pb2.ModelConfigResponse(config=metadata.model_config(lv, *self._priority))

    async def ModelStatistics(self, request: service_pb2.ModelStatisticsRequest,
                              context: Any) -> service_pb2.ModelStatisticsResponse:
        if not request.name:
            return metadata.statistics(self._repo.ready_versions())
        if not self._repo.known(request.name):
            raise NotFound(f"Request for unknown model: '{request.name}' is not found")
        if request.version:
            try:
                return metadata.statistics([self._repo.resolve(request.name, request.version)])
            except Unavailable:
                raise InvalidArgument(
                    f"requested model '{request.name}' version {request.version} is not available") from None
        versions = self._repo.ready_versions(request.name)
        if not versions:
            raise InvalidArgument(f"requested model '{request.name}' is not available")
        return metadata.statistics(versions)

    # ---- inference -----------------------------------------------------------------------------

    async def ModelInfer(self, request: service_pb2.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ModelInferResponse:
        return await self._infer(request, context.time_remaining())

    async def infer_request(self, request: service_pb2.ModelInferRequest,
                            remaining_s: float | None) -> service_pb2.ModelInferResponse:
        """ModelInfer without a gRPC call around it (a frontend's call over the link)."""
        return await self._infer(request, remaining_s)

    async def _infer(self, request: service_pb2.ModelInferRequest, remaining_s: float | None,
                     lv: Any = None) -> service_pb2.ModelInferResponse:
        if lv is None:
            lv = self._repo.resolve(request.model_name, request.model_version)
        if lv.generative:
            return await self._generate_whole(request, lv, remaining_s)
        if request.raw_input_contents and isinstance(lv.executor, TritonExecutor):
            return await lv.executor.forward(request, remaining_s)  # delegated: forwarded undecoded
        plan = lv.input_plan or plan_for(lv)
        try:
            heavy = check_sizes(request, plan) > INLINE_CONVERT_ELEMENTS
            parsed = await self._convert(parse_request, request, plan) if heavy else parse_request(request, plan)
        except AiaasError as exc:
            lv.record_rejected(exc)
            raise
        timeout_us = parsed.timeout_us
        deadline_bound = False
        if remaining_s is not None:
            deadline_us = max(1, int(remaining_s * 1e6))
            # A queue timeout (the request's `timeout`, within the serving config's) is UNAVAILABLE,
            # as in Triton; DEADLINE_EXCEEDED only when the caller's own deadline comes first.
            queue_us = effective_timeout_us(timeout_us, lv.spec.serving.default_timeout_us)
            if not queue_us or deadline_us < queue_us:
                timeout_us = deadline_us
                deadline_bound = True
        outputs: dict[str, Any] = {}
        try:
            outcome = await lv.infer(parsed.inputs, parsed.rows, priority=parsed.priority, timeout_us=timeout_us,
                                     deadline_bound=deadline_bound)
            outputs = outcome.outputs
            del outcome
            if heavy or _object_elements(outputs, parsed) > INLINE_CONVERT_ELEMENTS:
                heavy = True
                return await self._convert(build_response, request, lv, parsed, outputs)  # type: ignore[no-any-return]
            return build_response(request, lv, parsed, outputs)
        finally:
            if heavy:
                # Millions of decoded elements take a while to free as well: the last references
                # go in a conversion thread, not on the event loop.
                self._converters_pool().submit(_let_go, parsed, outputs)
                del parsed, outputs

    # ---- generative models (docs/generative.md, "Serving protocol") ------------------------------

    @staticmethod
    def _parse_generate(request: service_pb2.ModelInferRequest, lv: Any) -> generate_protocol.GenerateCall:
        try:
            return generate_protocol.parse_generate(request)
        except AiaasError as exc:
            lv.record_rejected(exc)
            raise

    async def _generate_whole(self, request: service_pb2.ModelInferRequest, lv: Any,
                              remaining_s: float | None) -> service_pb2.ModelInferResponse:
        """The whole completion in one response (ModelInfer, or a stream request with stream false)."""
        call = self._parse_generate(request, lv)
        parts = [call.prompt_prefix]
        tokens = 0
        last = None
        try:
            async with asyncio.timeout(remaining_s), contextlib.aclosing(lv.generate(call.message)) as chunks:
                async for chunk in chunks:
                    parts.append(chunk.text)
                    tokens += chunk.tokens
                    if chunk.finished:
                        last = chunk
        except TimeoutError:
            raise DeadlineExceeded(f"the generation on model '{lv.model}' did not finish before the deadline; "
                                   "it was cancelled") from None
        if last is None:
            raise Unavailable(f"the generation on model '{lv.model}' ended without a result; retry")
        if last.error is not None:
            raise last.error
        return generate_protocol.response(request, lv.version_str, "".join(parts), tokens, last)

    async def _generate_stream(self, request: service_pb2.ModelInferRequest, lv: Any,
                               send: Callable[[service_pb2.ModelInferResponse, bool], None]) -> None:
        """One response per chunk with text, then the final one (flagged); an error ends it in-band."""
        call = self._parse_generate(request, lv)
        if not call.stream:
            send(await self._generate_whole(request, lv, None), True)
            return
        prefix = call.prompt_prefix
        tokens = 0
        async with contextlib.aclosing(lv.generate(call.message)) as chunks:
            async for chunk in chunks:
                tokens += chunk.tokens
                if chunk.finished:
                    if chunk.error is not None:
                        raise chunk.error
                    send(generate_protocol.response(request, lv.version_str, prefix + chunk.text, tokens, chunk),
                         True)
                    return
                if chunk.text:
                    send(generate_protocol.response(request, lv.version_str, prefix + chunk.text, tokens), False)
                    prefix = ""
        raise Unavailable(f"the generation on model '{lv.model}' ended without a result; retry")

    async def generate_into(self, request: service_pb2.ModelInferRequest,
                            send: Callable[[service_pb2.ModelInferResponse, bool], None]) -> None:
        """A generative model's request, answered through `send` as `ModelStreamInfer` answers it
        (`Generations.StreamGenerations`); InvalidArgument for a model that is not generative."""
        lv = self._repo.resolve(request.model_name, request.model_version)
        if not lv.generative:
            raise InvalidArgument(f"model '{lv.model}' is not a generative model: StreamGenerations carries "
                                  "generations only (send tensor requests with ModelInfer)")
        await self._generate_stream(request, lv, send)

    async def _convert(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._converters_pool(), function, *args)

    def _converters_pool(self) -> ThreadPoolExecutor:
        if self._converters is None:
            self._converters = ThreadPoolExecutor(CONVERT_THREADS, thread_name_prefix="aiaas-convert")
        return self._converters

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[service_pb2.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """Requests run concurrently; each answer is written when ready; ends when the client half-closes.

        A generative model's request with `stream` true answers one response per chunk of text and
        then the final one; a stream the client cancels cancels its generations (their KV blocks
        are freed in the worker before its next step).

        A request's error is answered in-band (`error_message`), unless the caller opened the stream
        with the `triton_grpc_error: true` header: then the first error ends the stream with its status.
        """
        loop = asyncio.get_running_loop()
        # (answer, whether it is the request's last) | a status error | the end.
        answers: asyncio.Queue[tuple[service_pb2.ModelStreamInferResponse, bool] | AiaasError | None] = \
            asyncio.Queue()
        slots = asyncio.Semaphore(MAX_STREAM_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()
        metadata = dict(context.invocation_metadata() or ())
        grpc_errors = str(metadata.get("triton_grpc_error", "")).lower() == "true"

        def send(response: service_pb2.ModelInferResponse, last: bool) -> None:
            answers.put_nowait((service_pb2.ModelStreamInferResponse(infer_response=response), last))

        async def answer(request: service_pb2.ModelInferRequest) -> None:
            try:
                lv = self._repo.resolve(request.model_name, request.model_version)
                if lv.generative:  # decoupled: many responses, the last one flagged
                    await self._generate_stream(request, lv, send)
                    return
                response = await self._infer(request, None, lv)
                response.parameters["triton_final_response"].bool_param = True
                send(response, True)
            except AiaasError as exc:
                answers.put_nowait(exc if grpc_errors else (_stream_error(request, exc.message), True))
            except Exception:
                log.exception("stream request for model '%s' failed", request.model_name)
                answers.put_nowait((_stream_error(request, "internal error; see the server log"), True))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()  # released once its answer is written
                    task = loop.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*list(running))
            finally:
                answers.put_nowait(None)

        reader = loop.create_task(read())
        try:
            while (message := await answers.get()) is not None:
                if isinstance(message, AiaasError):
                    raise message
                yield message[0]
                if message[1]:
                    slots.release()
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # ---- repository ----------------------------------------------------------------------------

    async def RepositoryIndex(self, request: service_pb2.RepositoryIndexRequest,
                              context: Any) -> service_pb2.RepositoryIndexResponse:
        entries = self._repo.index()
        if self._catalog is not None and not request.ready:
            listed = {entry.model for entry in entries}
            try:
                names = await asyncio.wait_for(self._catalog(), 5.0)
            except (AiaasError, TimeoutError, grpc.RpcError) as exc:
                log.warning("repository index without the registry's models: %s", exc)
                names = []
            entries += [IndexEntry(name, 0, "UNAVAILABLE", "not loaded") for name in names if name not in listed]
        return metadata.repository_index(entries, request.ready)

    async def RepositoryModelLoad(self, request: service_pb2.RepositoryModelLoadRequest,
                                  context: Any) -> service_pb2.RepositoryModelLoadResponse:
        version, alias = _load_target(request)
        if not request.model_name:
            raise InvalidArgument("model_name is required")
        await self._repo.load(request.model_name, version, alias)
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: service_pb2.RepositoryModelUnloadRequest,
                                    context: Any) -> service_pb2.RepositoryModelUnloadResponse:
        version, _ = _load_target(request, unload=True)
        await self._repo.unload(request.model_name, version)
        return service_pb2.RepositoryModelUnloadResponse()

    # ---- not supported -------------------------------------------------------------------------

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        raise Unimplemented(_SHM)

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        raise Unimplemented(_SHM)

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        raise Unimplemented(_SHM)

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        raise Unimplemented(_SHM)

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        raise Unimplemented(_SHM)

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        raise Unimplemented(_SHM)

    async def TraceSetting(self, request: Any, context: Any) -> Any:
        raise Unimplemented(_TRACE)

    async def LogSettings(self, request: Any, context: Any) -> Any:
        raise Unimplemented(_LOG)


def check_sizes(request: service_pb2.ModelInferRequest, plan: InputPlan) -> int:
    """Each BYTES input's declared shape against its raw bytes, before anything is parsed; O(inputs).

    Returns how many elements parsing will convert one by one (BYTES and typed contents). A
    fixed-size raw input costs nothing here: `parse_request` compares its size with its shape
    before taking a zero-copy view. A request that does not match the model's inputs at all is
    left for `parse_request` to explain.
    """
    raws = request.raw_input_contents
    if raws and not _has_bytes_inputs(plan):
        return 0
    tensors = request.inputs
    if len(tensors) != plan.count or (raws and len(raws) != len(tensors)):
        return 0
    budget: BytesBudget | None = None
    elements = 0
    for index, tensor in enumerate(tensors):
        if not raws:
            elements += element_count(tensor.name, tensor.shape, plan.model)
        elif tensor.datatype == "BYTES":
            spec = plan.inputs.get(tensor.name)
            if spec is None or spec.datatype != "BYTES":
                continue  # parse_request refuses it
            budget = budget or BytesBudget()
            elements += check_raw_size(tensor.name, "BYTES", tensor.shape, len(raws[index]), budget, plan.model)
    return elements


@functools.lru_cache(maxsize=1024)
def _has_bytes_inputs(plan: InputPlan) -> bool:
    return any(spec.dtype is None for spec in plan.inputs.values())


def _object_elements(outputs: dict[str, Any], parsed: ParsedRequest) -> int:
    """Elements `build_response` will encode one by one (BYTES outputs, classified outputs)."""
    total = 0
    for array in outputs.values():
        if array.dtype.kind == "O":
            total += array.size
    for name, classes in parsed.outputs or ():
        if classes:
            total += outputs[name].size
    return total


def _let_go(*_: object) -> None:
    """Run in a conversion thread so that its arguments' last references are dropped there."""


def _stream_error(request: service_pb2.ModelInferRequest, message: str) -> service_pb2.ModelStreamInferResponse:
    response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                              id=request.id)
    response.parameters["triton_final_response"].bool_param = True
    return service_pb2.ModelStreamInferResponse(error_message=message, infer_response=response)


def _load_target(request: Any, *, unload: bool = False) -> tuple[int, str]:
    """`version` (int64 or decimal string) and `alias` (string) from the load/unload parameters."""
    version = 0
    alias = ""
    for key, value in request.parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if key == "version":
            if kind == "int64_param":
                version = value.int64_param
            elif kind == "string_param":
                version = parse_version(value.string_param)
            else:
                raise InvalidArgument("parameter 'version' must be an int64 or a decimal string")
            if version <= 0:
                raise InvalidArgument(f"parameter 'version' must be a positive integer, got {version}")
        elif key == "alias" and not unload:
            if kind != "string_param" or not value.string_param:
                raise InvalidArgument("parameter 'alias' must be a non-empty string")
            alias = value.string_param
        elif key == "unload_dependents" and unload:
            continue
        elif key == "config" or key.startswith("file:"):
            raise InvalidArgument(
                f"parameter '{key}': configuration overrides are not supported; a version's signature and "
                "serving config come from the registry")
        else:
            raise InvalidArgument(f"unknown parameter '{key}' for model {'unload' if unload else 'load'}")
    return version, alias

