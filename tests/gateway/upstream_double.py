"""A small KServe v2 server for forwarding tests: echoes its inputs as outputs, records what it saw.

It stands in for an inference replica where the test is about the gateway's forwarding
(retries, deadlines, metadata, streams); the end-to-end tests use real inference processes.
Models named in `generative` answer as decoupled models do (docs/generative.md, "Serving
protocol"): each word of the prompt comes back as one token, on ModelStreamInfer one response per
token when `stream` is set, then a final response with the usage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

from services.common.interceptors import APP_STATUS_KEY

SERVICE = "inference.GRPCInferenceService"


@dataclasses.dataclass
class Seen:
    version: str
    metadata: dict[str, str]
    time_remaining: float | None


class EchoReplica:
    """`ModelInfer` returns input 0 as output "y" (plus `offset_by_version[version]`)."""

    def __init__(self, offset_by_version: dict[str, float] | None = None, delay_s: float = 0.0,
                 aliases: dict[str, str] | None = None, health_service: bool = False,
                 generative: tuple[str, ...] = (), token_delay_s: float = 0.0) -> None:
        self.offset_by_version = offset_by_version or {}
        # `model:alias` names resolve through this map, as on a real inference replica.
        self.aliases = aliases or {}
        self.delay_s = delay_s
        self.seen: list[Seen] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.fail_with: grpc.StatusCode | None = None
        # Whether `fail_with` is marked as the application's answer, as every aiaas service marks it.
        self.fail_as_application = False
        # Serve grpc.health.v1 (service "" SERVING once started), as every aiaas service does.
        self.health_service = health_service
        self.health: health.aio.HealthServicer | None = None
        self.generative = frozenset(generative)
        self.token_delay_s = token_delay_s
        # Generations whose stream the gateway cancelled, and those that ran to their end.
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.generated: list[pb.ModelInferRequest] = []
        self.config_requests = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _resolve(self, name: str, version: str) -> tuple[str, str]:
        model, _, alias = name.partition(":")
        return (model, self.aliases.get(alias, "")) if alias else (model, version)

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        model, version = self._resolve(request.model_name, request.model_version)
        self.seen.append(Seen(version, {k: str(v) for k, v in context.invocation_metadata() or ()},
                              context.time_remaining()))
        if self._fail(context):
            await context.abort(self.fail_with, "replica says no")  # type: ignore[arg-type]
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if model in self.generative:
            words, prompt_tokens, _ = self._generation(request)
            return self._generated(request, " ".join(words), len(words), {
                "finish_reason": "length" if len(words) < prompt_tokens else "stop", "prompt_tokens": prompt_tokens,
            }, model, version)
        data = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
        data = data + np.float32(self.offset_by_version.get(version, 0.0))
        response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id)
        out = response.outputs.add(name="y", datatype="FP32")
        out.shape.extend(request.inputs[0].shape)
        response.raw_output_contents.append(data.astype(np.float32).tobytes())
        return response

    def _fail(self, context: grpc.aio.ServicerContext) -> bool:
        if self.fail_with is None:
            return False
        if self.fail_as_application:
            context.set_trailing_metadata(((APP_STATUS_KEY, self.fail_with.name),))
        return True

    async def _config(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        self.config_requests += 1
        if self._fail(context):
            await context.abort(self.fail_with, "replica says no")  # type: ignore[arg-type]
        model = request.name.partition(":")[0]
        answer = pb.ModelConfigResponse()
        answer.config.name = model
        answer.config.model_transaction_policy.decoupled = model in self.generative
        return answer

    def _generation(self, request: pb.ModelInferRequest) -> tuple[list[str], int, bool]:
        """(tokens, prompt tokens, stream) of a generative request: the prompt's words, up to max_tokens."""
        inputs = {t.name: raw for t, raw in zip(request.inputs, request.raw_input_contents, strict=False)}

        def element(name: str) -> bytes:
            raw = inputs.get(name, b"")
            return raw[4:4 + int.from_bytes(raw[:4], "little")] if len(raw) >= 4 else b""

        if "messages" in inputs:
            prompt = " ".join(m["content"] for m in json.loads(element("messages")))
        else:
            prompt = element("text_input").decode()
        words = prompt.split()
        limit = request.parameters["max_tokens"].int64_param if "max_tokens" in request.parameters else 16
        stream = "stream" in inputs and inputs["stream"][:1] == b"\x01"
        return words[:limit], len(words), stream

    def _generated(self, request: pb.ModelInferRequest, text: str, completion: int, final: dict[str, object] | None,
                   model: str, version: str) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id)
        out = response.outputs.add(name="text_output", datatype="BYTES")
        out.shape.append(1)
        response.raw_output_contents.append(len(text.encode()).to_bytes(4, "little") + text.encode())
        response.parameters["completion_tokens"].int64_param = completion
        if final is not None:
            response.parameters["triton_final_response"].bool_param = True
            response.parameters["finish_reason"].string_param = str(final["finish_reason"])
            response.parameters["prompt_tokens"].int64_param = int(str(final["prompt_tokens"]))
        return response

    async def _stream(self, requests: object, context: grpc.aio.ServicerContext) -> object:
        async for request in requests:  # type: ignore[attr-defined]
            model, version = self._resolve(request.model_name, request.model_version)
            self.seen.append(Seen(version, {k: str(v) for k, v in context.invocation_metadata() or ()},
                                  context.time_remaining()))
            if self._fail(context):
                await context.abort(self.fail_with, "replica says no")  # type: ignore[arg-type]
            self.generated.append(request)
            words, prompt_tokens, stream = self._generation(request)
            finish = {"finish_reason": "length" if len(words) < prompt_tokens else "stop",
                      "prompt_tokens": prompt_tokens}
            try:
                if stream:
                    for index, word in enumerate(words):
                        if self.token_delay_s:
                            await asyncio.sleep(self.token_delay_s)
                        yield pb.ModelStreamInferResponse(infer_response=self._generated(
                            request, ("" if index == 0 else " ") + word, index + 1, None, model, version))
                    yield pb.ModelStreamInferResponse(infer_response=self._generated(
                        request, "", len(words), finish, model, version))
                else:
                    if self.token_delay_s:
                        await asyncio.sleep(self.token_delay_s * len(words))
                    yield pb.ModelStreamInferResponse(infer_response=self._generated(
                        request, " ".join(words), len(words), finish, model, version))
            except asyncio.CancelledError:
                self.cancelled.append(request.id)
                raise
            self.finished.append(request.id)

    async def _ready(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        self.seen.append(Seen(self._resolve(request.name, request.version)[1], {}, None))
        return pb.ModelReadyResponse(ready=True)

    async def start(self, port: int = 0) -> EchoReplica:
        self.server = grpc.aio.server()
        handlers = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                self._infer, request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=pb.ModelInferResponse.SerializeToString),
            "ModelConfig": grpc.unary_unary_rpc_method_handler(
                self._config, request_deserializer=pb.ModelConfigRequest.FromString,
                response_serializer=pb.ModelConfigResponse.SerializeToString),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self._stream, request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=pb.ModelStreamInferResponse.SerializeToString),
            "ModelReady": grpc.unary_unary_rpc_method_handler(
                self._ready, request_deserializer=pb.ModelReadyRequest.FromString,
                response_serializer=pb.ModelReadyResponse.SerializeToString),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if self.health_service:
            self.health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        if self.health is not None:
            await self.set_serving(True)
        return self

    async def set_serving(self, serving: bool) -> None:
        if self.health is not None:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await self.health.set("", status)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
