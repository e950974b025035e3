"""Protobuf wire helpers for forwarding raw bytes: the gateway parses a request's header fields
but forwards the caller's bytes as they are, appending only the fields it sets (for a singular
field, the last occurrence on the wire wins), so tensors are never re-serialized."""

from __future__ import annotations

# ModelInferRequest field numbers (KServe v2).
REQUEST_MODEL_NAME = 1
REQUEST_MODEL_VERSION = 2
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


def retarget(raw_request: bytes, version: int, model: str | None = None) -> bytes:
    """The request bytes with `model_version` (and `model_name` when given) replaced."""
    tail = length_delimited(REQUEST_MODEL_VERSION, str(version).encode())
    if model is not None:
        tail = length_delimited(REQUEST_MODEL_NAME, model.encode()) + tail
    return raw_request + tail


def wrap_stream_response(raw_infer_response: bytes) -> bytes:
    """A ModelStreamInferResponse carrying an already serialized ModelInferResponse."""
    return length_delimited(STREAM_RESPONSE_INFER_RESPONSE, raw_infer_response)
