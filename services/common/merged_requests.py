"""Several ModelInfer requests as one, and the answer cut back: the shared mechanics of merging while
busy (the gateway's `services/gateway/merging.py`, the delegating backend's
`services/inference/triton_backend.py`). Callers decide which requests may merge: every input in
`raw_input_contents`, fixed-size rows, the same input names and row shapes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from services.common.errors import DeadlineExceeded, Internal


def merge(requests: Sequence[pb.ModelInferRequest], rows: int, model_name: str,
          model_version: str) -> pb.ModelInferRequest:
    """One request of `rows` rows: each input's bytes concatenated along the batch dimension, in order."""
    first = requests[0]
    merged = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    for index, tensor in enumerate(first.inputs):
        merged.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=(rows, *tensor.shape[1:]))
        name = tensor.name
        parts = []
        for request in requests:
            position = index if request.inputs[index].name == name else _position(request, name)
            parts.append(request.raw_input_contents[position])
        merged.raw_input_contents.append(b"".join(parts))
    return merged


def split(reply: pb.ModelInferResponse, requests: Sequence[pb.ModelInferRequest], row_counts: Sequence[int],
          rows: int, model_name: str, model_version: str, what: str) -> list[pb.ModelInferResponse]:
    """The merged `reply` cut into one answer per request (its rows of every output, its id).
    An answer that does not hold `rows` rows of whole bytes is INTERNAL, naming `what` answered it."""
    raws = reply.raw_output_contents
    if len(raws) != len(reply.outputs):
        raise Internal(f"{what} answered {len(reply.outputs)} outputs with {len(raws)} raw_output_contents entries")
    answers = [pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=r.id) for r in requests]
    for tensor, raw in zip(reply.outputs, raws, strict=True):
        shape = tuple(tensor.shape)
        if not shape or shape[0] != rows or len(raw) % rows:
            raise Internal(f"{what} answered output '{tensor.name}' with shape {list(shape)} and {len(raw)} bytes "
                           f"for a merged batch of {rows} rows")
        row_bytes = len(raw) // rows
        offset = 0
        for count, answer in zip(row_counts, answers, strict=True):
            answer.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=(count, *shape[1:]))
            end = offset + count * row_bytes
            answer.raw_output_contents.append(raw[offset:end])
            offset = end
    return answers


def _position(request: pb.ModelInferRequest, name: str) -> int:
    for index, tensor in enumerate(request.inputs):
        if tensor.name == name:
            return index
    raise Internal(f"input '{name}' missing from a checked request")  # the callers' checks make this unreachable


def settle(future: asyncio.Future[Any], value: Any) -> None:
    """Answer a waiting request's future, unless it already ended (cancelled, expired)."""
    if not future.done():
        future.set_result(value)


def expire(future: asyncio.Future[Any], where: str) -> None:
    """A waiting request's deadline passed (`where`: while it waited for what)."""
    if not future.done():
        future.set_exception(DeadlineExceeded(f"Deadline Exceeded: the request's deadline passed {where}"))
