"""The OpenAI-compatible API's bodies: requests validated into a KServe v2 generate request
(docs/generative.md, "Serving protocol"), and completions, chunks and errors in OpenAI's shapes.
No HTTP framework here: plain dicts in and out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from services.common.errors import AiaasError, ErrorCode

MAX_MODEL_NAME = 256
MAX_MESSAGES = 1024
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

# Fields accepted and not used (they change nothing about the generation).
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
_COMMON = frozenset({
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "min_tokens", "ignore_eos", "top_k",
    "repetition_penalty",
}) | _IGNORED
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                         "tool_choice", "functions", "function_call"}

HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400, ErrorCode.FAILED_PRECONDITION: 400, ErrorCode.OUT_OF_RANGE: 400,
    ErrorCode.UNAUTHENTICATED: 401, ErrorCode.PERMISSION_DENIED: 403, ErrorCode.NOT_FOUND: 404,
    ErrorCode.ALREADY_EXISTS: 409, ErrorCode.ABORTED: 409, ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.CANCELLED: 499, ErrorCode.UNIMPLEMENTED: 501, ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPE = {
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "model_not_allowed"), 404: ("invalid_request_error", "model_not_found"),
    409: ("invalid_request_error", None), 413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"), 499: ("invalid_request_error", "cancelled"),
    501: ("invalid_request_error", "unsupported"), 503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


class OpenAIError(Exception):
    """An answer in OpenAI's error shape, with its HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        kind, default_code = _ERROR_TYPE.get(status, ("server_error", None))
        self.type = kind
        self.code = code if code is not None else default_code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, exc: AiaasError) -> OpenAIError:
        status = HTTP_STATUS.get(exc.code, 500)
        headers: dict[str, str] = {}
        retry_ms = (exc.metadata or {}).get("retry-after-ms")
        if retry_ms and retry_ms.isdigit():
            headers["retry-after-ms"] = retry_ms
            headers["retry-after"] = str(max(1, math.ceil(int(retry_ms) / 1000)))
        code = "insufficient_quota" if status == 429 and "token quota" in exc.message else None
        message = exc.message if status != 500 else "internal error"
        return cls(status, message, code=code, headers=headers)


def bad(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def _int(body: Mapping[str, Any], name: str, *, low: int, high: int = 2**31 - 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad(name, f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def _number(body: Mapping[str, Any], name: str, *, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not (low < value if low_open else low <= value) or value > high:
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise bad(name, f"{name} must be a number in {bound}, got {value!r}")
    return float(value)


def _flag(body: Mapping[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {value!r}")
    return value


def _unset_or(body: Mapping[str, Any], name: str, allowed: tuple[Any, ...], why: str) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise bad(name, f"{name}={value!r} is not supported: {why}")


def _text_content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{index}].content", "only text content parts ({\"type\": \"text\", \"text\": "
                                                        "...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise bad(f"messages[{index}].content", "content must be a string or a list of text parts")


@dataclasses.dataclass(frozen=True)
class GenerationAsk:
    """One validated OpenAI request: what to generate and how to answer."""

    chat: bool
    model: str
    prompt: str = ""
    messages: tuple[dict[str, str], ...] = ()
    stream: bool = False
    include_usage: bool = False
    parameters: Mapping[str, int | float | bool | str] = dataclasses.field(default_factory=dict)

    def to_request(self, request_id: str) -> pb.ModelInferRequest:
        """The KServe v2 request of the serving protocol (inputs `text_input` or `messages`, `stream`)."""
        request = pb.ModelInferRequest(model_name=self.model, id=request_id)
        if self.chat:
            name, data = "messages", json.dumps(list(self.messages), ensure_ascii=False).encode()
        else:
            name, data = "text_input", self.prompt.encode()
        request.inputs.add(name=name, datatype="BYTES", shape=[1])
        request.raw_input_contents.append(len(data).to_bytes(4, "little") + data)
        request.inputs.add(name="stream", datatype="BOOL", shape=[1])
        request.raw_input_contents.append(b"\x01" if self.stream else b"\x00")
        for key, value in self.parameters.items():
            parameter = request.parameters[key]
            if isinstance(value, bool):
                parameter.bool_param = value
            elif isinstance(value, int):
                parameter.int64_param = value
            elif isinstance(value, float):
                parameter.double_param = value
            else:
                parameter.string_param = value
        return request


def parse_request(body: Any, *, chat: bool) -> GenerationAsk:
    """Validate a `/v1/completions` (or, with `chat`, `/v1/chat/completions`) body; OpenAIError 400 names the field."""
    if not isinstance(body, dict):
        raise bad("", "the request body must be a JSON object")
    unknown = sorted(set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS))
    if unknown:
        raise bad(unknown[0], f"unknown or unsupported field(s): {', '.join(unknown)}")
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > MAX_MODEL_NAME:
        raise bad("model", f"model must be a model name (`name` or `name:alias`) of 1 to {MAX_MODEL_NAME} characters")
    if body.get("n") not in (None, 1):
        raise bad("n", f"n={body['n']!r} is not supported: one choice is generated per request (n must be 1)")
    _unset_or(body, "logit_bias", ({},), "logit_bias is not supported")
    _unset_or(body, "logprobs", (False, 0), "log probabilities are not returned")
    for name in ("presence_penalty", "frequency_penalty"):
        _unset_or(body, name, (0, 0.0), "use repetition_penalty (vLLM's extension) instead")
    messages: tuple[dict[str, str], ...] = ()
    prompt = ""
    if chat:
        messages = _chat(body)
        limit = _int(body, "max_completion_tokens", low=1)
        limit = limit if limit is not None else _int(body, "max_tokens", low=1)
    else:
        prompt = _prompt(body)
        limit = _int(body, "max_tokens", low=1)
    parameters = _sampling(body)
    if limit is not None:
        parameters["max_tokens"] = limit
    stream = bool(_flag(body, "stream"))
    return GenerationAsk(chat=chat, model=model, prompt=prompt, messages=messages, stream=stream,
                         include_usage=_include_usage(body, stream), parameters=parameters)


def _chat(body: Mapping[str, Any]) -> tuple[dict[str, str], ...]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_MESSAGES:
        raise bad("messages", f"messages must be a list of 1 to {MAX_MESSAGES} messages")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise bad(f"messages[{index}]", f"each message needs a role among {', '.join(sorted(CHAT_ROLES))}")
        messages.append({"role": message["role"], "content": _text_content(message.get("content"), index)})
    _unset_or(body, "top_logprobs", (0,), "log probabilities are not returned")
    for name in ("tools", "functions"):
        _unset_or(body, name, ([],), "tool calls are not supported")
    for name in ("tool_choice", "function_call"):
        _unset_or(body, name, ("none",), "tool calls are not supported")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad("response_format", "only {\"type\": \"text\"} is supported")
    return tuple(messages)


def _prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("prompt", "prompt must be a string (a list of one string is accepted; token-id prompts "
                            "and batches of prompts are not supported)")
    _unset_or(body, "echo", (False,), "the prompt is not echoed")
    _unset_or(body, "best_of", (1,), "only one sequence is generated (best_of 1)")
    _unset_or(body, "suffix", ("",), "suffixes are not supported")
    return prompt


def _sampling(body: Mapping[str, Any]) -> dict[str, int | float | bool | str]:
    """The request parameters of the serving protocol, from OpenAI's and vLLM's sampling fields."""
    parameters: dict[str, int | float | bool | str] = {}
    for name, value in (("temperature", _number(body, "temperature", low=0.0, high=2.0)),
                        ("top_p", _number(body, "top_p", low=0.0, high=1.0, low_open=True)),
                        ("repetition_penalty", _number(body, "repetition_penalty", low=0.0, high=10.0,
                                                       low_open=True))):
        if value is not None:
            parameters[name] = value
    for name, low in (("seed", -(2**63)), ("min_tokens", 0)):
        number = _int(body, name, low=low, high=2**63 - 1)
        if number is not None:
            parameters[name] = number
    top_k = _int(body, "top_k", low=-1)
    if top_k is not None:
        parameters["top_k"] = max(0, top_k)  # vLLM's -1 (and 0) is "off"
    ignore_eos = _flag(body, "ignore_eos")
    if ignore_eos is not None:
        parameters["ignore_eos"] = ignore_eos
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stops):
            raise bad("stop", f"stop must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings "
                              f"of at most {MAX_STOP_LENGTH} characters")
        if stops:
            parameters["stop"] = json.dumps(stops, ensure_ascii=False)
    return parameters


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise bad("stream_options", "stream_options takes {\"include_usage\": true|false}")
    return bool(_flag(options, "include_usage"))


@dataclasses.dataclass
class Answer:
    """The OpenAI answer being built for one request."""

    ask: GenerationAsk
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    _text_template: tuple[bytes, bytes] | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def object_id(self) -> str:
        return f"chatcmpl-{self.id}" if self.ask.chat else f"cmpl-{self.id}"

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.object_id, "object": kind, "created": self.created, "model": self.ask.model}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        if self.ask.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finish_reason}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            kind = "text_completion"
        return {**self._head(kind), "choices": [choice], "usage": self.usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False) -> dict[str, Any]:
        if self.ask.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            kind = "text_completion"
        chunk = {**self._head(kind), "choices": [choice]}
        if self.ask.include_usage:
            chunk["usage"] = None
        return chunk

    def text_event(self, text: str) -> bytes:
        """`sse(self.chunk(text))` for a chunk of text, from a template made once per answer: only the
        text is encoded per token (the whole chunk object's encoding cost 4x more in the token relay)."""
        template = self._text_template
        if template is None:
            marker = json.dumps(_MARK, ensure_ascii=False).encode()
            prefix, _, suffix = sse(self.chunk(_MARK)).partition(marker)
            template = self._text_template = (prefix, suffix)
        return template[0] + json.dumps(text, ensure_ascii=False).encode() + template[1]

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.ask.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": self.usage(prompt_tokens, completion_tokens)}


_MARK = "\ue000aiaas-text\ue000"  # private-use characters: never produced by the encoding of anything else


def sse(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
