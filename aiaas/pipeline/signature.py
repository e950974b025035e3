"""Signatures derived from example tensors, and sample inputs generated from a signature.

The pipeline's plain types: `Signature` here, `TensorSpec` (aiaas.tensors) and `ServingConfig`
(aiaas.serving) shared with every service; `aiaas.pipeline.publish` converts them at the boundary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from aiaas.errors import InvalidArgument
from aiaas.serving import ServingConfig
from aiaas.tensors import TensorSpec

__all__ = ["FLOAT_DATATYPES", "ServingConfig", "Signature", "TensorSpec", "as_tensor_tuple", "check_inputs",
           "datatype_of", "derive_signature", "generate_inputs", "numpy_dtype", "torch_dtype"]

# KServe v2 datatype <-> torch dtype. BYTES has no tensor form and is not exportable.
_TORCH_BY_DATATYPE: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
_DATATYPE_BY_TORCH = {dtype: name for name, dtype in _TORCH_BY_DATATYPE.items()}
_NUMPY_BY_DATATYPE: dict[str, type] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
FLOAT_DATATYPES = frozenset({"FP16", "BF16", "FP32", "FP64"})


@dataclasses.dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def datatype_of(dtype: torch.dtype) -> str:
    try:
        return _DATATYPE_BY_TORCH[dtype]
    except KeyError:
        raise InvalidArgument(f"tensors of dtype {dtype} cannot be served") from None


def torch_dtype(datatype: str) -> torch.dtype:
    try:
        return _TORCH_BY_DATATYPE[datatype]
    except KeyError:
        raise InvalidArgument(f"datatype {datatype} has no tensor form") from None


def numpy_dtype(datatype: str) -> type:
    try:
        return _NUMPY_BY_DATATYPE[datatype]
    except KeyError:
        raise InvalidArgument(f"datatype {datatype} has no numpy form (BF16 travels as FP32)") from None


def as_tensor_tuple(value: object, what: str) -> tuple[torch.Tensor, ...]:
    """A tensor or a tuple/list of tensors, as a tuple; anything else is refused."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise InvalidArgument(f"{what} must be a tensor or a non-empty tuple of tensors, got {type(value).__name__}")


def _specs(tensors: Sequence[torch.Tensor], names: Sequence[str] | None, prefix: str) -> tuple[TensorSpec, ...]:
    if names is not None and len(names) != len(tensors):
        raise InvalidArgument(f"{len(names)} {prefix.lower()} names given for {len(tensors)} tensors")
    specs = []
    for i, tensor in enumerate(tensors):
        if tensor.dim() == 0:
            raise InvalidArgument(f"{prefix.lower()} {i} is a scalar; every tensor needs a batch dimension")
        name = names[i] if names is not None else f"{prefix}{i}"
        specs.append(TensorSpec(name, datatype_of(tensor.dtype), (-1, *tensor.shape[1:])))
    return tuple(specs)


def derive_signature(
    example_inputs: Sequence[torch.Tensor],
    example_outputs: Sequence[torch.Tensor],
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Signature:
    """Names INPUT0.. / OUTPUT0.. unless given; the first dimension is the (variable) batch."""
    return Signature(_specs(example_inputs, input_names, "INPUT"), _specs(example_outputs, output_names, "OUTPUT"))


def generate_inputs(
    signature: Signature, batch: int, *, seed: int = 0, like: Sequence[torch.Tensor] | None = None
) -> list[np.ndarray]:
    """Random inputs that fit the signature; floats follow `like`'s mean and spread when given.

    Integer inputs are drawn from 0..9 (indices into something): give a real sample when a model
    needs other values.
    """
    rng = np.random.default_rng(seed)
    arrays: list[np.ndarray] = []
    for i, spec in enumerate(signature.inputs):
        shape = (batch, *[d if d > 0 else 1 for d in spec.shape[1:]])
        if spec.datatype in FLOAT_DATATYPES:
            mean, std = 0.0, 1.0
            if like is not None and i < len(like) and like[i].numel() > 1:
                ref = like[i].detach().double()
                mean, std = float(ref.mean()), float(ref.std()) or 1.0
            data = rng.normal(mean, std, size=shape)
            dtype = np.float32 if spec.datatype == "BF16" else numpy_dtype(spec.datatype)
            arrays.append(data.astype(dtype))
        elif spec.datatype == "BOOL":
            arrays.append(rng.integers(0, 2, size=shape).astype(np.bool_))
        else:
            arrays.append(rng.integers(0, 10, size=shape).astype(numpy_dtype(spec.datatype)))
    return arrays


def check_inputs(signature: Signature, arrays: Sequence[np.ndarray]) -> None:
    """A user's sample must match the signature's count, datatypes and non-batch dimensions."""
    if len(arrays) != len(signature.inputs):
        raise InvalidArgument(f"sample has {len(arrays)} inputs, the signature {len(signature.inputs)}")
    for spec, array in zip(signature.inputs, arrays, strict=True):
        if array.ndim != len(spec.shape) or any(
            d >= 0 and d != a for d, a in zip(spec.shape[1:], array.shape[1:], strict=True)
        ):
            raise InvalidArgument(f"sample input {spec.name} has shape {list(array.shape)}, expected {list(spec.shape)}")
