"""Serve a model by delegating it to an existing Triton server (or anything speaking KServe v2 gRPC).

Configured by a JSON or YAML file mapping the served model name to the remote one:

    {"resnet": {"url": "triton-0:8001", "model_name": "resnet50", "model_version": "3"}}

The signature and batching limits come from the remote's ModelMetadata / ModelConfig. Requests
bypass the local DynamicBatcher: Triton batches them itself, so forwarding each one as it comes
(with its priority and timeout) adds no extra queueing. Status codes from the remote pass through.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
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
from services.common.datatypes import array_to_raw, raw_to_array
from services.common.errors import (
    AiaasError,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
    error_from_rpc,
)
from services.inference.core import LoadedVersion
from services.inference.entities import Outcome, VersionSpec

_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]


@dataclasses.dataclass(frozen=True)
class TritonModelConfig:
    name: str
    url: str
    model_name: str
    model_version: str = ""


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
        backends[str(name)] = TritonModelConfig(str(name), str(entry["url"]), str(entry.get("model_name") or name),
                                                version)
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
        self._channel = grpc.aio.insecure_channel(config.url, options=_CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._datatypes = {t.name: t.datatype for t in spec.inputs}
        self._batched = spec.serving.max_batch_size > 0

    async def start(self) -> None:
        request = service_pb2.ModelReadyRequest(name=self.config.model_name, version=self.config.model_version)
        try:
            reply = await self._stub.ModelReady(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise _error_from(exc, f"Triton model '{self.config.model_name}' at {self.config.url}") from None
        if not reply.ready:
            raise Unavailable(f"Triton model '{self.config.model_name}' at {self.config.url} is not ready")

    async def infer(self, inputs: dict[str, np.ndarray], *, priority: int, timeout_us: int | None) -> Outcome:
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
            reply = await self._stub.ModelInfer(request)
        except grpc.aio.AioRpcError as exc:
            raise _error_from(exc, f"Triton model '{self.config.model_name}' at {self.config.url}") from None
        elapsed = time.perf_counter_ns() - started
        outputs = {
            tensor.name: raw_to_array(raw, tensor.datatype, tuple(tensor.shape))
            for tensor, raw in zip(reply.outputs, reply.raw_output_contents, strict=False)
        }
        self._lv.stats.record_execution(rows, 0, elapsed, 0)
        return Outcome(outputs, 0, 0, elapsed, 0, rows)

    async def drain(self) -> None:
        """Nothing is queued here; the repository has already waited for in-flight requests."""

    async def close(self) -> None:
        await self._channel.close()
