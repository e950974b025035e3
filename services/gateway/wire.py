"""Protobuf wire helpers for forwarding raw bytes: the gateway parses a request's header fields
but forwards the caller's bytes as they are, appending only the fields it sets (for a singular
field, the last occurrence on the wire wins), so tensors are never re-serialized."""

from __future__ import annotations

# ModelInferRequest field numbers (KServe v2).
REQUEST_MODEL_NAME = 1
REQUEST_MODEL_VERSION = 2
# ModelInferResponse: model_name = 1, model_version = 2.
RESPONSE_MODEL_VERSION = 2
# ModelStreamInferResponse: error_message = 1, infer_response = 2.
STREAM_RESPONSE_INFER_RESPONSE = 2


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


_TAILS: dict[tuple[str, str], bytes] = {}


def retarget(raw_request: bytes, model_name: str, version: str) -> bytes:
    """The request bytes with `model_name` and `model_version` replaced (tensors untouched)."""
    tail = _TAILS.get((model_name, version))
    if tail is None:
        tail = (length_delimited(REQUEST_MODEL_NAME, model_name.encode())
                + length_delimited(REQUEST_MODEL_VERSION, version.encode()))
        if len(_TAILS) > 4096:
            _TAILS.clear()
        _TAILS[(model_name, version)] = tail
    return raw_request + tail


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def response_version(raw_response: bytes) -> str:
    """`model_version` of a serialized ModelInferResponse, reading only the leading fields."""
    offset = 0
    end = len(raw_response)
    while offset < end:
        tag, offset = _read_varint(raw_response, offset)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 2:
            length, offset = _read_varint(raw_response, offset)
            if field == RESPONSE_MODEL_VERSION:
                return raw_response[offset:offset + length].decode()
            offset += length
        elif wire_type == 0:
            _, offset = _read_varint(raw_response, offset)
        elif wire_type == 1:
            offset += 8
        elif wire_type == 5:
            offset += 4
        else:
            break
    return ""


def wrap_stream_response(raw_infer_response: bytes) -> bytes:
    """A ModelStreamInferResponse carrying an already serialized ModelInferResponse."""
    return length_delimited(STREAM_RESPONSE_INFER_RESPONSE, raw_infer_response)
