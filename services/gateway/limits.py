"""Size and shape checks on an inference request before it is forwarded (no grpc here)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from aiaas.tensors import TensorSpec
from services.common.errors import InvalidArgument, ResourceExhausted

ELEMENT_BYTES = {
    "BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2,
    "INT32": 4, "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8,
}
DATATYPES = frozenset(ELEMENT_BYTES) | {"BYTES"}
_SHM_PARAMETER = "shared_memory_region"


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    max_request_bytes: int = 64 * 1024 * 1024
    max_inputs: int = 64
    max_rank: int = 8
    max_elements: int = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Signature:
    """What a version accepts (from the registry; with batching the first dimension is -1)."""

    inputs: tuple[TensorSpec, ...]
    # With batching, a signature written without its batch dimension also accepts one in front.
    batched: bool = False


def check_request(request: Any, size: int, limits: RequestLimits, signature: Signature | None = None) -> None:
    """Raise InvalidArgument / ResourceExhausted when a ModelInferRequest breaks a limit."""
    model = request.model_name
    if size > limits.max_request_bytes:
        raise ResourceExhausted(
            f"request for model '{model}' is {size} bytes, over the gateway's limit of {limits.max_request_bytes}"
        )
    inputs = request.inputs
    if len(inputs) > limits.max_inputs:
        raise InvalidArgument(f"request has {len(inputs)} inputs, more than the limit of {limits.max_inputs}")
    raw = request.raw_input_contents
    raw_count = len(raw)
    raw_index = 0
    specs = {spec.name: spec for spec in signature.inputs} if signature is not None else None
    for tensor in inputs:
        shape = tuple(tensor.shape)
        _check_shape(tensor.name, tensor.datatype, shape, limits)
        if specs is not None and signature is not None:
            _check_signature(model, tensor.name, tensor.datatype, shape, specs, signature.batched)
        if tensor.HasField("contents") or _SHM_PARAMETER in tensor.parameters:
            continue
        if raw_index >= raw_count:
            if raw_count:
                raise InvalidArgument(f"unable to find data for input tensor '{tensor.name}' for model '{model}'")
            continue
        expected = ELEMENT_BYTES.get(tensor.datatype)
        if expected is not None:
            got = len(raw[raw_index])
            want = math.prod(shape) * expected
            if got != want:
                raise InvalidArgument(
                    f"input '{tensor.name}' for model '{model}': {got} bytes of data, shape {list(shape)} of "
                    f"{tensor.datatype} needs {want}"
                )
        raw_index += 1
    if raw_index < raw_count:
        raise InvalidArgument(f"request has {raw_count} raw input contents for {raw_index} inputs")
    if specs is not None:
        missing = sorted(set(specs) - {t.name for t in inputs})
        if missing:
            raise InvalidArgument(f"model '{model}' expects input(s) {missing}")


def _check_shape(name: str, datatype: str, shape: Sequence[int], limits: RequestLimits) -> None:
    if datatype not in DATATYPES:
        raise InvalidArgument(f"input '{name}': unknown datatype {datatype!r}")
    if len(shape) > limits.max_rank:
        raise InvalidArgument(f"input '{name}' has {len(shape)} dimensions, more than {limits.max_rank}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{name}' has a negative dimension in shape {list(shape)}")
    if math.prod(shape) > limits.max_elements:
        raise InvalidArgument(f"input '{name}' has {math.prod(shape)} elements, more than {limits.max_elements}")


def _check_signature(model: str, name: str, datatype: str, shape: tuple[int, ...],
                     specs: dict[str, TensorSpec], batched: bool) -> None:
    spec = specs.get(name)
    if spec is None:
        raise InvalidArgument(f"unexpected inference input '{name}' for model '{model}'")
    if spec.datatype != datatype:
        raise InvalidArgument(
            f"inference input '{name}' data-type is '{datatype}', but model '{model}' expects '{spec.datatype}'"
        )
    candidates = [spec.shape]
    if batched and (not spec.shape or spec.shape[0] != -1):
        candidates.append((-1, *spec.shape))
    if not any(_shape_matches(expected, shape) for expected in candidates):
        expected = candidates[-1]
        raise InvalidArgument(
            f"unexpected shape for input '{name}' for model '{model}'. Expected {list(expected)}, got {list(shape)}"
        )


def _shape_matches(expected: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return len(expected) == len(shape) and all(e == -1 or e == d for e, d in zip(expected, shape, strict=True))
