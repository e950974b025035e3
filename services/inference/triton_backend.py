"""Serve a model by delegating it to an existing Triton server (or anything speaking KServe v2 gRPC).

Configured by a JSON or YAML file mapping the served model name to the remote one:

    {"resnet": {"url": "triton-0:8001", "model_name": "resnet50", "model_version": "3"}}

The signature and batching limits come from the remote's ModelMetadata / ModelConfig. Requests
bypass the local DynamicBatcher: Triton batches them itself, so forwarding each one as it comes
(with its priority and timeout) adds no extra queueing. Status codes from the remote pass through.

A request with raw tensors (`raw_input_contents`, what every Triton client sends) is forwarded as
it came (`forward`): its names, datatypes, shapes and byte sizes are checked against the model's
metadata from the protobuf headers, then the message itself goes on with the remote model's name,
its parameters, requested outputs and id untouched, and the caller's deadline as the remote call's
deadline; the answer comes back with the local model name, its output sizes checked against their
shapes. Nothing is decoded or copied into numpy. Requests with typed `contents` take the decoding
path (`infer`). One long-lived channel per remote address serves every model delegated to it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from aiaas.formats import TRITON
from aiaas.serving import ServingConfig
from aiaas.tensors import TensorSpec
from services.common import merged_requests
from services.common.datatypes import KSERVE_TO_NUMPY, array_to_raw, check_raw_size, raw_to_array
from services.common.errors import (
    AiaasError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_from_rpc,
)
from services.inference.convert import check_raw_inputs, parse_parameters, parse_requested_outputs, plan_for
from services.inference.core import LoadedVersion
from services.inference.entities import Outcome, VersionSpec

_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
DEFAULT_MAX_IN_FLIGHT = 2
MAX_IN_FLIGHT_LIMIT = 64
# Requests one delegated model may hold waiting to be merged before it refuses more (RESOURCE_EXHAUSTED).
MAX_WAITING = 4096
# How an expired waiting request is told: "the request's deadline passed <this>".
_WAITED = "before the remote model answered"


class _Channel:
    """One long-lived channel to a remote address, shared by every model delegated to it."""

    def __init__(self, url: str) -> None:
        self.channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.model_infer = self.channel.unary_unary(
            _MODEL_INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString)
        self.users = 0


_CHANNELS: dict[str, _Channel] = {}


def _acquire_channel(url: str) -> _Channel:
    shared = _CHANNELS.get(url)
    if shared is None:
        shared = _CHANNELS[url] = _Channel(url)
    shared.users += 1
    return shared


async def _release_channel(url: str, shared: _Channel) -> None:
    shared.users -= 1
    if shared.users <= 0:
        if _CHANNELS.get(url) is shared:
            del _CHANNELS[url]
        await shared.channel.close()


@dataclasses.dataclass(frozen=True)
class TritonModelConfig:
    name: str
    url: str
    model_name: str
    model_version: str = ""
    # Forwarded calls one model keeps in flight before it merges waiting requests into one (see
    # `_Coalescer`); 0 forwards every request on its own.
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT


def load_backends(path: str | None) -> dict[str, TritonModelConfig]:
    if not path:
        return {}
    text = Path(path).read_text()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
    except (ValueError, ImportError) as exc:
        raise InvalidArgument(f"triton_backends file {path}: {exc}") from None
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"triton_backends file {path}: expected a mapping of model name to settings")
    backends = {}
    for name, entry in raw.items():
        if not isinstance(entry, Mapping) or not entry.get("url"):
            raise InvalidArgument(f"triton_backends file {path}: model '{name}' needs at least 'url'")
        version = str(entry.get("model_version", "") or "")
        if version and not version.isdigit():
            raise InvalidArgument(f"triton_backends file {path}: model '{name}' model_version must be an integer")
        in_flight = entry.get("max_in_flight", DEFAULT_MAX_IN_FLIGHT)
        if not isinstance(in_flight, int) or isinstance(in_flight, bool) or not 0 <= in_flight <= MAX_IN_FLIGHT_LIMIT:
            raise InvalidArgument(f"triton_backends file {path}: model '{name}' max_in_flight must be an integer "
                                  f"in [0, {MAX_IN_FLIGHT_LIMIT}], got {in_flight!r}")
        backends[str(name)] = TritonModelConfig(str(name), str(entry["url"]), str(entry.get("model_name") or name),
                                                version, in_flight)
    return backends


def _error_from(exc: BaseException, what: str) -> AiaasError:
    if isinstance(exc, (grpc.aio.AioRpcError, InferenceServerException)):
        return error_from_rpc(exc, what)
    return Internal(f"{what}: {exc}")


class TritonLoader:
    """`VersionLoader` for one delegated model."""

    def __init__(self, config: TritonModelConfig) -> None:
        self.config = config
        self._client: triton_aio.InferenceServerClient | None = None

    def _control(self) -> triton_aio.InferenceServerClient:
        if self._client is None:
            self._client = triton_aio.InferenceServerClient(self.config.url)
        return self._client

    async def describe(self, model: str, version: int, alias: str) -> VersionSpec:
        cfg = self.config
        local_version = int(cfg.model_version) if cfg.model_version else 1
        if version and version != local_version:
            raise NotFound(f"model '{model}' is served by Triton at {cfg.url} as version {local_version} only")
        client = self._control()
        what = f"Triton model '{cfg.model_name}' at {cfg.url}"
        try:
            metadata = await client.get_model_metadata(cfg.model_name, cfg.model_version, client_timeout=30)
            config = (await client.get_model_config(cfg.model_name, cfg.model_version, client_timeout=30)).config
        except InferenceServerException as exc:
            raise _error_from(exc, what) from None
        max_batch = max(0, config.max_batch_size)

        def tensors(items: Any) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in items)

        return VersionSpec(
            model=model, version=local_version, format=TRITON,
            inputs=tensors(metadata.inputs), outputs=tensors(metadata.outputs),
            serving=ServingConfig(max_batch_size=max_batch), remote_platform=metadata.platform or "triton",
        )

    async def open(self, spec: VersionSpec, lv: LoadedVersion) -> TritonExecutor:
        executor = TritonExecutor(self.config, spec, lv)
        try:
            await executor.start()
        except BaseException:
            await executor.close()
            raise
        return executor

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class TritonExecutor:
    def __init__(self, config: TritonModelConfig, spec: VersionSpec, lv: LoadedVersion) -> None:
        self.config = config
        self.spec = spec
        self._lv = lv
        self._shared: _Channel | None = _acquire_channel(config.url)
        self._stub = self._shared.stub
        self._model_infer = self._shared.model_infer
        self._datatypes = {t.name: t.datatype for t in spec.inputs}
        self._batched = spec.serving.max_batch_size > 0
        self._what = f"Triton model '{config.model_name}' at {config.url}"
        # Requests merge only when every tensor has fixed, fixed-size rows (concatenating their bytes
        # is then the batch) and the model batches.
        mergeable = (spec.serving.max_batch_size > 1 and config.max_in_flight > 0
                     and all(t.datatype in _ROW_BYTES and len(t.shape) >= 1 and min(t.shape[1:], default=1) >= 0
                             for t in (*spec.inputs, *spec.outputs)))
        self._coalescer = _Coalescer(self, spec, config.max_in_flight) if mergeable else None

    async def start(self) -> None:
        request = service_pb2.ModelReadyRequest(name=self.config.model_name, version=self.config.model_version)
        try:
            reply = await self._stub.ModelReady(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise _error_from(exc, self._what) from None
        if not reply.ready:
            raise Unavailable(f"{self._what} is not ready")

    async def forward(self, request: service_pb2.ModelInferRequest,
                      remaining_s: float | None) -> service_pb2.ModelInferResponse:
        """Check a raw-tensor request from its headers and forward it whole; the remote's answer, renamed.

        `remaining_s`: the caller's deadline, which bounds the remote call (DEADLINE_EXCEEDED).
        A bad request is refused (INVALID_ARGUMENT) before anything is sent.
        """
        lv = self._lv
        plan = lv.input_plan or plan_for(lv)
        try:
            if request.parameters:
                parse_parameters(request.parameters)
            if request.outputs:
                parse_requested_outputs(request.outputs, plan)
            rows = check_raw_inputs(request, plan)
        except AiaasError as exc:
            lv.record_rejected(exc)
            raise
        coalescer = self._coalescer
        if coalescer is not None and not request.parameters and not request.outputs:
            return await lv.run_whole(lambda: coalescer.submit(request, rows, remaining_s), rows,
                                      _RawInputs(request, plan))
        name, version = request.model_name, request.model_version
        request.model_name = self.config.model_name
        request.model_version = self.config.model_version

        async def send() -> tuple[service_pb2.ModelInferResponse, int]:
            reply, elapsed = await self.call(request, rows, remaining_s)
            reply.model_name = lv.model
            reply.model_version = lv.version_str
            return reply, elapsed

        try:
            return await lv.run_whole(send, rows, _RawInputs(request, plan))
        finally:
            request.model_name, request.model_version = name, version

    async def call(self, request: service_pb2.ModelInferRequest, rows: int,
                   timeout_s: float | None) -> tuple[service_pb2.ModelInferResponse, int]:
        """One ModelInfer call to the remote (its answer checked) and its time in ns, counted as an execution."""
        started = time.perf_counter_ns()
        try:
            reply = await self._model_infer(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _error_from(exc, self._what) from None
        elapsed = time.perf_counter_ns() - started
        _check_reply(reply, self._what)
        self._lv.stats.record_execution(rows, 0, elapsed, 0)
        return reply, elapsed

    async def infer(self, inputs: dict[str, np.ndarray], *, priority: int, timeout_us: int | None) -> Outcome:
        """The decoding path: for requests with typed `contents` (raw requests go through `forward`)."""
        request = service_pb2.ModelInferRequest(model_name=self.config.model_name,
                                                model_version=self.config.model_version)
        rows = 1
        for name, array in inputs.items():
            datatype = self._datatypes[name]
            request.inputs.add(name=name, datatype=datatype, shape=array.shape)
            request.raw_input_contents.append(array_to_raw(array, datatype))
            if self._batched:
                rows = array.shape[0]
        if priority:
            request.parameters["priority"].uint64_param = priority
        if timeout_us:
            request.parameters["timeout"].int64_param = timeout_us
        started = time.perf_counter_ns()
        try:
            reply = await self._model_infer(request)
        except grpc.aio.AioRpcError as exc:
            raise _error_from(exc, self._what) from None
        elapsed = time.perf_counter_ns() - started
        _check_reply(reply, self._what)
        outputs = {
            tensor.name: raw_to_array(raw, tensor.datatype, tuple(tensor.shape))
            for tensor, raw in zip(reply.outputs, reply.raw_output_contents, strict=False)
        }
        self._lv.stats.record_execution(rows, 0, elapsed, 0)
        return Outcome(outputs, 0, 0, elapsed, 0, rows)

    async def drain(self) -> None:
        """Nothing is queued here; the repository has already waited for in-flight requests."""

    async def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            await _release_channel(self.config.url, shared)


_ROW_BYTES = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2, "INT32": 4,
              "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8}


class _Waiting:
    __slots__ = ("deadline", "future", "request", "rows", "timer")

    def __init__(self, request: service_pb2.ModelInferRequest, rows: int,
                 future: asyncio.Future[tuple[service_pb2.ModelInferResponse, int]], deadline: float | None) -> None:
        self.request = request
        self.rows = rows
        self.future = future
        self.deadline = deadline
        self.timer: asyncio.TimerHandle | None = None


class _Coalescer:
    """Merges the requests that wait for one delegated model into one remote call while others run.

    With fewer than `max_in_flight` calls to the remote running, a request goes at once, alone, so a
    lone request never waits. Otherwise it waits, and when a call comes back every waiting request
    goes in one call (up to the model's max batch rows per call): their tensors' bytes concatenated
    along the batch dimension, the answer's outputs cut back into one answer per request, each with
    its own id. The remote batches these as it batches any request; this replica pays one outgoing
    call per merged group instead of one per request. Only requests without parameters or requested
    outputs merge, so each one's answer is what the remote would have sent it alone; a failed call
    fails every request in it (as a failed batch does on the remote). A request's own deadline
    still ends its wait (DEADLINE_EXCEEDED) whether it is waiting or in a call.
    """

    def __init__(self, executor: TritonExecutor, spec: VersionSpec, max_in_flight: int) -> None:
        self._executor = executor
        self._lv = executor._lv
        self._max_rows = spec.serving.max_batch_size
        self._max_in_flight = max_in_flight
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._in_flight = 0
        self._calls: set[asyncio.Task[None]] = set()
        self._model = executor.config.model_name
        self._version = executor.config.model_version

    async def submit(self, request: service_pb2.ModelInferRequest, rows: int,
                     remaining_s: float | None) -> tuple[service_pb2.ModelInferResponse, int]:
        if len(self._waiting) >= MAX_WAITING:
            raise ResourceExhausted(f"model '{self._lv.model}': {MAX_WAITING} requests already wait for {self._model}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[service_pb2.ModelInferResponse, int]] = loop.create_future()
        waiting = _Waiting(request, rows, future, None if remaining_s is None else loop.time() + remaining_s)
        if remaining_s is not None:
            waiting.timer = loop.call_later(remaining_s, merged_requests.expire, future, _WAITED)
        self._waiting.append(waiting)
        self._dispatch()
        try:
            return await future
        finally:
            if waiting.timer is not None:
                waiting.timer.cancel()

    def _dispatch(self) -> None:
        waiting = self._waiting
        while waiting and self._in_flight < self._max_in_flight:
            group: list[_Waiting] = []
            rows = 0
            while waiting:
                head = waiting[0]
                if head.future.done():  # expired or cancelled while waiting
                    waiting.popleft()
                    continue
                if group and rows + head.rows > self._max_rows:
                    break
                group.append(waiting.popleft())
                rows += head.rows
            if not group:
                return
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._call(group, rows))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _call(self, group: list[_Waiting], rows: int) -> None:
        try:
            deadlines = [w.deadline for w in group if w.deadline is not None]
            timeout = None
            if len(deadlines) == len(group):  # the latest deadline bounds the call; earlier ones end their own wait
                timeout = max(0.0, max(deadlines) - asyncio.get_running_loop().time())
            if len(group) == 1:
                request = group[0].request
                name, version = request.model_name, request.model_version
                request.model_name, request.model_version = self._model, self._version
                try:
                    reply, elapsed = await self._executor.call(request, rows, timeout)
                finally:
                    request.model_name, request.model_version = name, version
                reply.model_name = self._lv.model
                reply.model_version = self._lv.version_str
                merged_requests.settle(group[0].future, (reply, elapsed))
                return
            requests = [w.request for w in group]
            reply, elapsed = await self._executor.call(
                merged_requests.merge(requests, rows, self._model, self._version), rows, timeout)
            answers = merged_requests.split(reply, requests, [w.rows for w in group], rows, self._lv.model,
                                            self._lv.version_str, self._executor._what)
            for waiting, answer in zip(group, answers, strict=True):
                merged_requests.settle(waiting.future, (answer, elapsed))
        except BaseException as exc:
            for waiting in group:
                if not waiting.future.done():
                    waiting.future.set_exception(exc if isinstance(exc, Exception) else Unavailable(
                        f"model '{self._lv.model}': the call to {self._model} was cancelled"))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._dispatch()


def _check_reply(reply: service_pb2.ModelInferResponse, what: str) -> None:
    """Each output's raw size against its declared shape (O(outputs)); a mismatch is INTERNAL."""
    raws = reply.raw_output_contents
    if len(raws) != len(reply.outputs):
        raise Internal(f"{what} answered {len(reply.outputs)} outputs with {len(raws)} raw_output_contents entries")
    for tensor, raw in zip(reply.outputs, raws, strict=True):
        try:
            check_raw_size(tensor.name, tensor.datatype, tensor.shape, len(raw))
        except AiaasError as exc:
            raise Internal(f"{what} answered a malformed output: {exc.message}") from None


class _RawInputs(Mapping[str, np.ndarray]):
    """A forwarded request's fixed-size inputs as zero-copy arrays, built only if telemetry reads them."""

    def __init__(self, request: service_pb2.ModelInferRequest, plan: Any) -> None:
        self._request = request
        self._plan = plan

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for tensor, raw in zip(self._request.inputs, self._request.raw_input_contents, strict=False):
            dtype = None if tensor.datatype in ("BYTES", "BF16") else KSERVE_TO_NUMPY.get(tensor.datatype)
            if dtype is not None:
                arrays[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape))
        return arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays())

    def __len__(self) -> int:
        return len(self._arrays())
