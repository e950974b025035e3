"""The generate protocol of a generative version (docs/generative.md, "Serving protocol"): a KServe v2
request -> one generation's message for the worker, and engine chunks -> KServe v2 responses.

Tensor names are those of Triton's vLLM backend (`text_input`, `stream`, `sampling_parameters`,
`exclude_input_in_output` -> `text_output`), so `tritonclient` and Triton's `generate` clients work
unchanged. Everything is checked here, in the service, before the request reaches a worker: a bad
value is INVALID_ARGUMENT naming the input or parameter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any

from tritonclient.grpc import service_pb2

from aiaas.tensors import TensorSpec
from services.common.errors import InvalidArgument
from services.inference.generative.entities import GenerationRequest, SamplingParams
from services.inference.generative_workers import Chunk

INPUTS = (
    TensorSpec("text_input", "BYTES", (1,)),
    TensorSpec("messages", "BYTES", (1,)),
    TensorSpec("stream", "BOOL", (1,)),
    TensorSpec("sampling_parameters", "BYTES", (1,)),
    TensorSpec("exclude_input_in_output", "BOOL", (1,)),
)
OUTPUTS = (TensorSpec("text_output", "BYTES", (1,)),)
OUTPUT = "text_output"
_DATATYPES = {spec.name: spec.datatype for spec in INPUTS}

# Bounds of one request, checked before anything is allocated for it.
MAX_PROMPT_BYTES = 1 << 20
MAX_SAMPLING_JSON_BYTES = 64 * 1024
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64

_INT_FIELDS = ("max_tokens", "min_tokens", "top_k", "seed")
_FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens")
_SAMPLING_FIELDS = frozenset((*_INT_FIELDS, *_FLOAT_FIELDS, *_BOOL_FIELDS, "stop", "stop_token_ids"))
# Request parameters with a meaning elsewhere (Triton's own, the service's), accepted and not used here.
_IGNORED_PARAMETERS = frozenset({"triton_enable_empty_final_response", "priority", "sequence_id", "sequence_start",
                                 "sequence_end", "headers"})
_LENGTH = struct.Struct("<I")


@dataclasses.dataclass(frozen=True)
class GenerateCall:
    """One parsed generate request: the worker's message, and how to answer it."""

    message: dict[str, Any]  # {"request": GenerationRequest.to_message() without the id, "messages": [...] | None}
    stream: bool
    prompt_prefix: str  # prepended to the output when exclude_input_in_output is false


def parse_generate(request: service_pb2.ModelInferRequest) -> GenerateCall:
    """A generate request, checked; InvalidArgument naming what is wrong."""
    values = _inputs(request)
    for output in request.outputs:
        if output.name != OUTPUT:
            raise InvalidArgument(f"unknown requested output '{output.name}': a generative model answers "
                                  f"'{OUTPUT}' only")
    text = values.get("text_input")
    messages_json = values.get("messages")
    if (text is None) == (messages_json is None):
        raise InvalidArgument("give exactly one of the inputs 'text_input' and 'messages'")
    stream = bool(values.get("stream", False))
    exclude_input = bool(values.get("exclude_input_in_output", True))
    fields: dict[str, Any] = {}
    sampling_json = values.get("sampling_parameters")
    if sampling_json is not None:
        fields.update(_sampling_parameters(_utf8("sampling_parameters", sampling_json)))
    stream, timeout_s = _request_parameters(request, fields, stream)
    params = SamplingParams(**fields)
    messages = None
    prompt: str | None = None
    if text is not None:
        prompt = _utf8("text_input", text, MAX_PROMPT_BYTES)
        if not prompt:
            raise InvalidArgument("input 'text_input' is empty")
    else:
        assert messages_json is not None
        messages = _messages(_utf8("messages", messages_json, MAX_PROMPT_BYTES))
        if not exclude_input:
            raise InvalidArgument("exclude_input_in_output=false needs 'text_input' (the prompt to repeat), not "
                                  "'messages'")
    # Validated as the worker will build it; the worker names the request.
    built = GenerationRequest("x", prompt=prompt if prompt is not None else "", params=params, timeout_s=timeout_s)
    request_message = built.to_message()
    del request_message["request_id"]
    if messages is not None:
        request_message["prompt"] = None
    return GenerateCall({"request": request_message, "messages": messages}, stream,
                        "" if exclude_input or prompt is None else prompt)


def _request_parameters(request: service_pb2.ModelInferRequest, fields: dict[str, Any],
                        stream: bool) -> tuple[bool, float | None]:
    """Sampling fields (into `fields`: they win over sampling_parameters), `stream` and the queue timeout."""
    timeout_s: float | None = None
    for key, value in request.parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if key == "stream":
            stream = _bool_param(key, value, kind)
        elif key == "timeout":
            if kind != "int64_param" or value.int64_param < 0:
                raise InvalidArgument("parameter 'timeout' must be an int64 of microseconds >= 0")
            timeout_s = value.int64_param / 1e6
        elif key in _SAMPLING_FIELDS:
            fields[key] = _parameter(key, value, kind)
        elif key not in _IGNORED_PARAMETERS:
            raise InvalidArgument(f"unknown parameter '{key}' for a generative model; known: stream, timeout, "
                                  f"{', '.join(sorted(_SAMPLING_FIELDS))}")
    return stream, timeout_s


def _inputs(request: service_pb2.ModelInferRequest) -> dict[str, Any]:
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise InvalidArgument(f"{len(request.inputs)} inputs but {len(raws)} raw_input_contents")
    values: dict[str, Any] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        datatype = _DATATYPES.get(name)
        if datatype is None:
            raise InvalidArgument(f"unknown input '{name}' for a generative model; expected "
                                  f"{', '.join(_DATATYPES)}")
        if name in values:
            raise InvalidArgument(f"input '{name}' is given twice")
        if tensor.datatype != datatype:
            raise InvalidArgument(f"input '{name}' must be {datatype}, got {tensor.datatype}")
        if math.prod(tensor.shape) != 1 or any(d != 1 for d in tensor.shape):
            raise InvalidArgument(f"input '{name}' must hold one element (shape [1]), got shape "
                                  f"[{','.join(str(d) for d in tensor.shape)}]")
        if raws:
            values[name] = _raw_value(name, datatype, raws[index])
        elif datatype == "BYTES":
            if len(tensor.contents.bytes_contents) != 1:
                raise InvalidArgument(f"input '{name}' must hold one element")
            values[name] = tensor.contents.bytes_contents[0]
        else:
            if len(tensor.contents.bool_contents) != 1:
                raise InvalidArgument(f"input '{name}' must hold one element")
            values[name] = tensor.contents.bool_contents[0]
    return values


def _raw_value(name: str, datatype: str, raw: bytes) -> Any:
    if datatype == "BOOL":
        if len(raw) != 1:
            raise InvalidArgument(f"input '{name}' must be 1 byte of raw BOOL, got {len(raw)} bytes")
        return raw != b"\x00"
    if len(raw) < 4 or _LENGTH.unpack_from(raw)[0] != len(raw) - 4:
        raise InvalidArgument(f"input '{name}' is not one length-prefixed BYTES element")
    return raw[4:]


def _utf8(name: str, data: bytes, limit: int = MAX_SAMPLING_JSON_BYTES) -> str:
    if len(data) > limit:
        raise InvalidArgument(f"input '{name}' is {len(data)} bytes; the limit is {limit}")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise InvalidArgument(f"input '{name}' is not UTF-8") from None


def _sampling_parameters(text: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"input 'sampling_parameters' is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgument("input 'sampling_parameters' must be a JSON object")
    unknown = sorted(set(document) - _SAMPLING_FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown sampling parameters {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(_SAMPLING_FIELDS))}")
    return {key: _json_field(key, value) for key, value in document.items()}


def _json_field(key: str, value: Any) -> Any:
    """A sampling field from JSON; numbers and booleans may come as strings (Triton's vLLM examples do)."""
    where = f"sampling parameter '{key}'"
    if key in _INT_FIELDS:
        if isinstance(value, str):
            value = _parse(where, value, int)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgument(f"{where} must be an integer, got {value!r}")
        return value
    if key in _FLOAT_FIELDS:
        if isinstance(value, str):
            value = _parse(where, value, float)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidArgument(f"{where} must be a number, got {value!r}")
        return float(value)
    if key in _BOOL_FIELDS:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise InvalidArgument(f"{where} must be true or false, got {value!r}")
        return value
    if key == "stop":
        return _stop(where, [value] if isinstance(value, str) else value)
    return _stop_token_ids(where, value)


def _parse(where: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise InvalidArgument(f"{where} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def _parameter(key: str, value: Any, kind: str | None) -> Any:
    """A sampling field from a request parameter (they win over sampling_parameters)."""
    where = f"parameter '{key}'"
    if key in _INT_FIELDS:
        if kind != "int64_param":
            raise InvalidArgument(f"{where} must be an int64")
        return value.int64_param
    if key in _FLOAT_FIELDS:
        if kind == "double_param":
            return value.double_param
        if kind == "int64_param":
            return float(value.int64_param)
        raise InvalidArgument(f"{where} must be a double")
    if key in _BOOL_FIELDS:
        return _bool_param(key, value, kind)
    if kind != "string_param":
        raise InvalidArgument(f"{where} must be a string")
    text = value.string_param
    if key == "stop":
        stops: Any = text
        if text.startswith("["):
            try:
                stops = json.loads(text)
            except ValueError:
                raise InvalidArgument(f"{where} starts with '[' but is not a JSON list of strings") from None
        return _stop(where, [stops] if isinstance(stops, str) else stops)
    try:
        ids = json.loads(text)
    except ValueError:
        raise InvalidArgument(f"{where} must be a JSON list of token ids") from None
    return _stop_token_ids(where, ids)


def _bool_param(key: str, value: Any, kind: str | None) -> bool:
    if kind != "bool_param":
        raise InvalidArgument(f"parameter '{key}' must be a bool")
    return bool(value.bool_param)


def _stop(where: str, stops: Any) -> tuple[str, ...]:
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise InvalidArgument(f"{where} must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
                              f"of at most {MAX_STOP_CHARS} characters")
    return tuple(stops)


def _stop_token_ids(where: str, ids: Any) -> tuple[int, ...]:
    if (not isinstance(ids, list) or len(ids) > MAX_STOP_TOKEN_IDS
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
        raise InvalidArgument(f"{where} must be a list of at most {MAX_STOP_TOKEN_IDS} token ids (integers >= 0)")
    return tuple(ids)


def _messages(text: str) -> list[dict[str, str]]:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"input 'messages' is not JSON: {exc}") from None
    if not isinstance(document, list) or not document or len(document) > MAX_MESSAGES:
        raise InvalidArgument(f"input 'messages' must be a JSON list of 1 to {MAX_MESSAGES} messages")
    messages = []
    for index, item in enumerate(document):
        if (not isinstance(item, dict) or not isinstance(item.get("role"), str)
                or not isinstance(item.get("content"), str) or not set(item) <= {"role", "content", "name"}
                or not all(isinstance(v, str) for v in item.values())):
            raise InvalidArgument(f"input 'messages'[{index}] must be an object of strings with 'role' and "
                                  "'content' (and optionally 'name')")
        messages.append(dict(item))
    return messages


# ---- responses -------------------------------------------------------------------------------------


def response(request: service_pb2.ModelInferRequest, version: str, text: str, completion_tokens: int,
             last: Chunk | None = None) -> service_pb2.ModelInferResponse:
    """One response: `text_output` and `completion_tokens`; the last one also the outcome and the final flag."""
    answer = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    answer.outputs.add(name=OUTPUT, datatype="BYTES", shape=[1])
    data = text.encode()
    answer.raw_output_contents.append(_LENGTH.pack(len(data)) + data)
    params = answer.parameters
    params["completion_tokens"].int64_param = completion_tokens
    if last is not None:
        params["triton_final_response"].bool_param = True
        params["finish_reason"].string_param = last.finish_reason or "error"
        params["prompt_tokens"].int64_param = last.prompt_tokens
        if last.stop_reason is not None:
            params["stop_reason"].string_param = last.stop_reason
    return answer
