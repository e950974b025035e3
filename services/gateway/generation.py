"""What the gateway reads from a generative model's responses (docs/generative.md, "Serving
protocol"): the final flag, the token counts and finish reason it charges and reports, and the
timings it measures itself (time to first token, gaps between responses). No grpc here.
"""

from __future__ import annotations

import time
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from services.common.reporting import GenerationStats

FINAL_PARAMETER = "triton_final_response"
OUTPUT_NAME = "text_output"


def int_parameter(parameters: Any, name: str) -> int:
    """An int64 (or uint64) response parameter; 0 when absent or of another kind."""
    if name not in parameters:
        return 0
    parameter = parameters[name]
    kind = parameter.WhichOneof("parameter_choice")
    return int(getattr(parameter, kind)) if kind in ("int64_param", "uint64_param") else 0


def string_parameter(parameters: Any, name: str) -> str:
    if name not in parameters:
        return ""
    parameter = parameters[name]
    return str(parameter.string_param) if parameter.WhichOneof("parameter_choice") == "string_param" else ""


def is_final(response: pb.ModelInferResponse) -> bool:
    parameters = response.parameters
    return FINAL_PARAMETER in parameters and bool(parameters[FINAL_PARAMETER].bool_param)


def text_output(response: pb.ModelInferResponse) -> str:
    """The response's `text_output` (one BYTES element, raw or typed); "" when it has none."""
    for index, output in enumerate(response.outputs):
        if output.name != OUTPUT_NAME:
            continue
        if index < len(response.raw_output_contents):
            raw = response.raw_output_contents[index]
            if len(raw) < 4:
                return ""
            length = int.from_bytes(raw[:4], "little")
            return raw[4:4 + length].decode("utf-8", errors="replace")
        if output.contents.bytes_contents:
            return output.contents.bytes_contents[0].decode("utf-8", errors="replace")
    return ""


class GenerationMeter:
    """One generative request's usage and timings, as its responses pass through the gateway."""

    __slots__ = ("completion_tokens", "finish_reason", "first_s", "gap_max_s", "gap_sum_s", "gaps", "last_s",
                 "prompt_tokens", "started_s", "stop_reason")

    def __init__(self, started_s: float | None = None) -> None:
        self.started_s = time.perf_counter() if started_s is None else started_s
        self.first_s = 0.0
        self.last_s = 0.0
        self.gaps = 0
        self.gap_sum_s = 0.0
        self.gap_max_s = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason = ""
        self.stop_reason = ""

    def observe(self, response: pb.ModelInferResponse) -> bool:
        """Count one response; True when it is the request's last."""
        now = time.perf_counter()
        parameters = response.parameters
        tokens = int_parameter(parameters, "completion_tokens")
        if tokens > self.completion_tokens:
            if not self.first_s:
                self.first_s = now
            else:
                gap = now - self.last_s
                self.gaps += 1
                self.gap_sum_s += gap
                self.gap_max_s = max(self.gap_max_s, gap)
            self.last_s = now
            self.completion_tokens = tokens
        if not is_final(response):
            return False
        self.prompt_tokens = int_parameter(parameters, "prompt_tokens")
        self.finish_reason = string_parameter(parameters, "finish_reason") or self.finish_reason or "stop"
        self.stop_reason = string_parameter(parameters, "stop_reason")
        return True

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def stats(self, finish_reason: str = "") -> GenerationStats:
        """The monitor's record of it; `finish_reason` for a request that ended without a final response."""
        return GenerationStats(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            ttft_us=int((self.first_s - self.started_s) * 1e6) if self.first_s else 0,
            itl_mean_us=int(self.gap_sum_s / self.gaps * 1e6) if self.gaps else 0,
            itl_max_us=int(self.gap_max_s * 1e6),
            generation_us=int((self.last_s - self.first_s) * 1e6) if self.first_s else 0,
            finish_reason=self.finish_reason or finish_reason,
        )


def stream_error(request: pb.ModelInferRequest, message: str, *, final: bool) -> bytes:
    """An in-band stream error for `request`; flagged final when its model is decoupled."""
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                     id=request.id)
    if final:
        response.parameters[FINAL_PARAMETER].bool_param = True
    return pb.ModelStreamInferResponse(error_message=message, infer_response=response).SerializeToString()
