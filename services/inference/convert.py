"""KServe v2 protobuf <-> numpy on the serving path: request parsing and response building.

Everything a request is checked against (names, datatypes, shapes, byte sizes) is prepared once
per loaded version (`InputPlan`), so a request costs a few dict lookups and one
`np.frombuffer` per input. Tensors travel as raw bytes both ways; typed `contents` are accepted
on input.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2

from aiaas.tensors import TensorSpec
from services.common.datatypes import (
    KSERVE_TO_NUMPY,
    BytesBudget,
    check_raw_size,
    deserialize_bytes_tensor,
    serialize_bytes_tensor,
)
from services.common.errors import InvalidArgument
from services.inference.core import LoadedVersion

# Typed `contents` field per datatype (FP16 / BF16 have none: raw bytes only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
# The numpy type each typed field is read as before narrowing to the input's datatype.
_WIDE = {"bool_contents": np.bool_, "int_contents": np.int64, "int64_contents": np.int64,
         "uint_contents": np.uint64, "uint64_contents": np.uint64, "fp32_contents": np.float32,
         "fp64_contents": np.float64}
_TRITON_PARAMS_ALLOWED = frozenset({"triton_enable_empty_final_response"})


def _dims(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class TensorPlan:
    """One signature tensor, prepared for checks on the hot path."""

    __slots__ = ("datatype", "dtype", "fixed_dims", "item_size", "name", "rank", "shape")

    def __init__(self, spec: TensorSpec) -> None:
        self.name = spec.name
        self.datatype = spec.datatype
        self.dtype: np.dtype[Any] | None = None if spec.datatype == "BYTES" else np.dtype(KSERVE_TO_NUMPY[spec.datatype])
        self.item_size = 0 if self.dtype is None else self.dtype.itemsize
        self.shape = tuple(spec.shape)
        self.rank = len(spec.shape)
        self.fixed_dims = tuple((i, d) for i, d in enumerate(spec.shape) if d >= 0)


class InputPlan:
    __slots__ = ("batching", "count", "expected", "inputs", "max_batch_size", "model", "output_names", "outputs")

    def __init__(self, model: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 max_batch_size: int) -> None:
        self.model = model
        self.inputs = {spec.name: TensorPlan(spec) for spec in inputs}
        self.outputs = {spec.name: TensorPlan(spec) for spec in outputs}
        self.output_names = tuple(spec.name for spec in outputs)
        self.count = len(self.inputs)
        self.batching = max_batch_size > 0
        self.max_batch_size = max_batch_size
        self.expected = ", ".join(f"'{n}'" for n in self.inputs)


def plan_for(lv: LoadedVersion) -> InputPlan:
    plan = lv.input_plan
    if plan is None:
        spec = lv.spec
        plan = lv.input_plan = InputPlan(lv.model, spec.inputs, spec.outputs, spec.serving.max_batch_size)
    return plan  # type: ignore[no-any-return]


class ParsedRequest:
    __slots__ = ("inputs", "outputs", "priority", "rows", "timeout_us")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, priority: int, timeout_us: int | None,
                 outputs: tuple[tuple[str, int], ...] | None) -> None:
        self.inputs = inputs
        self.rows = rows
        self.priority = priority
        self.timeout_us = timeout_us
        # (name, classification count) per requested output; None means every output, unclassified.
        self.outputs = outputs


def parse_request(request: service_pb2.ModelInferRequest, plan: InputPlan) -> ParsedRequest:
    priority, timeout_us = parse_parameters(request.parameters) if request.parameters else (0, None)
    inputs, rows = parse_inputs(request, plan)
    outputs = parse_requested_outputs(request.outputs, plan) if request.outputs else None
    return ParsedRequest(inputs, rows, priority, timeout_us, outputs)


def parse_inputs(request: service_pb2.ModelInferRequest, plan: InputPlan) -> tuple[dict[str, np.ndarray], int]:
    tensors = request.inputs
    model = plan.model
    raws = request.raw_input_contents
    use_raw = _check_counts(tensors, raws, plan)
    out: dict[str, np.ndarray] = {}
    rows = 0
    for index, tensor in enumerate(tensors):
        spec, shape, rows = _check_header(tensor, index, rows, out, plan, use_raw)
        name = tensor.name
        if use_raw:
            out[name] = _from_raw(raws[index], name, shape, spec, model)
        elif tensor.HasField("contents"):
            out[name] = _from_contents(tensor.contents, name, shape, spec, model)
        else:
            raise InvalidArgument(f"unable to find data for input tensor '{name}' for model '{model}'")
    return out, (rows if plan.batching else 1)


def check_raw_inputs(request: service_pb2.ModelInferRequest, plan: InputPlan) -> int:
    """Check a raw-bytes request against the model's inputs without reading its tensors; returns its rows.

    The same checks (and messages) as `parse_inputs`: input count, names, datatypes, shapes, the
    batch dimension, and each raw buffer's size against its declared shape (BYTES: within the
    per-request bounds); O(inputs), nothing decoded or copied. For a request that is forwarded
    whole (the Triton-delegating backend), so that a bad one is refused here and never sent on.
    """
    tensors = request.inputs
    raws = request.raw_input_contents
    if not _check_counts(tensors, raws, plan):
        raise InvalidArgument(f"model '{plan.model}': inputs must be sent in raw_input_contents here")
    seen: set[str] = set()
    budget: BytesBudget | None = None
    rows = 0
    for index, tensor in enumerate(tensors):
        spec, shape, rows = _check_header(tensor, index, rows, seen, plan, True)
        seen.add(tensor.name)
        if spec.dtype is None:
            budget = budget or BytesBudget()
        check_raw_size(tensor.name, spec.datatype, shape, len(raws[index]), budget, plan.model)
    return rows if plan.batching else 1


def _check_counts(tensors: Any, raws: Any, plan: InputPlan) -> bool:
    """The number of inputs (and raw buffers); True when the data is in raw_input_contents."""
    if len(tensors) != plan.count:
        got = ", ".join(f"'{t.name}'" for t in tensors) or "none"
        raise InvalidArgument(
            f"expected {plan.count} inputs but got {len(tensors)} inputs for model '{plan.model}': "
            f"expected {plan.expected}, got {got}")
    if raws and len(raws) != len(tensors):
        raise InvalidArgument(
            f"model '{plan.model}': {len(tensors)} inputs but {len(raws)} raw_input_contents entries")
    return len(raws) > 0


def _check_header(tensor: Any, index: int, rows: int, seen: Container[str], plan: InputPlan,
                  use_raw: bool) -> tuple[TensorPlan, tuple[int, ...], int]:
    """One input's name, datatype and shape against the plan; returns its plan, shape and the batch rows."""
    name = tensor.name
    model = plan.model
    spec = plan.inputs.get(name)
    if spec is None:
        raise InvalidArgument(f"unexpected inference input '{name}' for model '{model}': expected {plan.expected}")
    if name in seen:
        raise InvalidArgument(f"input '{name}' for model '{model}' is given more than once")
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(
            f"inference input '{name}' data-type is '{tensor.datatype}', but model '{model}' expects "
            f"'{spec.datatype}'")
    shape = tuple(tensor.shape)
    _check_shape(name, shape, spec, plan)
    if plan.batching:
        if index == 0:
            rows = shape[0]
        elif shape[0] != rows:
            raise InvalidArgument(
                f"input '{name}' for model '{model}' has batch size {shape[0]}, but other inputs have {rows}: "
                "all inputs must agree on the batch dimension")
    if use_raw and tensor.HasField("contents"):
        raise InvalidArgument(
            f"contents field must not be specified when using raw_input_contents for '{name}' "
            f"for model '{model}'")
    return spec, shape, rows


def _check_shape(name: str, shape: tuple[int, ...], spec: TensorPlan, plan: InputPlan) -> None:
    ok = len(shape) == spec.rank
    if ok:
        for i, dim in spec.fixed_dims:
            if shape[i] != dim:
                ok = False
                break
        else:
            ok = min(shape, default=0) >= 0
    if not ok:
        raise InvalidArgument(
            f"unexpected shape for input '{name}' for model '{plan.model}'. Expected {_dims(spec.shape)}, "
            f"got {_dims(shape)}")
    if plan.batching and not 1 <= shape[0] <= plan.max_batch_size:
        raise InvalidArgument(
            f"inference request batch-size must be <= {plan.max_batch_size} for '{plan.model}' "
            f"(input '{name}' has batch size {shape[0]})")


def _from_raw(raw: bytes, name: str, shape: tuple[int, ...], spec: TensorPlan, model: str) -> np.ndarray:
    count = math.prod(shape)
    if spec.dtype is None:
        try:
            return deserialize_bytes_tensor(raw, count).reshape(shape)
        except InvalidArgument as exc:
            raise InvalidArgument(f"input '{name}' for model '{model}': {exc.message}") from None
    expected = count * spec.item_size
    if len(raw) != expected:
        raise InvalidArgument(
            f"input '{name}' for model '{model}': expected {expected} bytes for shape {_dims(shape)} of "
            f"{spec.datatype}, got {len(raw)} bytes")
    return np.frombuffer(raw, dtype=spec.dtype).reshape(shape)


def _from_contents(contents: Any, name: str, shape: tuple[int, ...], spec: TensorPlan, model: str) -> np.ndarray:
    field = CONTENTS_FIELD.get(spec.datatype)
    if field is None:
        raise InvalidArgument(
            f"input '{name}' for model '{model}': {spec.datatype} has no typed contents field; "
            "send it in raw_input_contents")
    for other in CONTENTS_FIELD.values():
        if other != field and len(getattr(contents, other)):
            raise InvalidArgument(
                f"input '{name}' for model '{model}': {spec.datatype} data must be in contents.{field}, "
                f"not contents.{other}")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}' for model '{model}': expected {count} values for shape {_dims(shape)} in "
            f"contents.{field}, got {len(values)}")
    if spec.dtype is None:
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    wide: np.ndarray = np.fromiter(values, dtype=_WIDE[field], count=count)
    arr = wide.astype(spec.dtype)
    if wide.dtype.kind in "iu" and count and not np.array_equal(arr, wide):
        raise InvalidArgument(f"input '{name}' for model '{model}': a value in contents.{field} "
                              f"does not fit {spec.datatype}")
    return arr.reshape(shape)


def parse_parameters(params: Any) -> tuple[int, int | None]:
    """Triton's request parameters: `priority` (uint64/int64 >= 0), `timeout` (int64 microseconds)."""
    priority = 0
    timeout_us: int | None = None
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        if key == "priority":
            if kind == "uint64_param":
                priority = value.uint64_param
            elif kind == "int64_param" and value.int64_param >= 0:
                priority = value.int64_param
            else:
                raise InvalidArgument("parameter 'priority' must be a non-negative int64 or a uint64")
        elif key == "timeout":
            if kind != "int64_param" or value.int64_param < 0:
                raise InvalidArgument("parameter 'timeout' must be a non-negative int64 (microseconds)")
            timeout_us = value.int64_param or None
        elif key == "sequence_id":
            if kind not in ("int64_param", "string_param"):
                raise InvalidArgument("parameter 'sequence_id' must be an int64 or a string")
        elif key in ("sequence_start", "sequence_end"):
            if kind != "bool_param":
                raise InvalidArgument(f"parameter '{key}' must be a bool")
        elif key.startswith("triton_"):
            if key not in _TRITON_PARAMS_ALLOWED:
                raise InvalidArgument(f"parameter '{key}' is reserved and not supported")
        elif kind == "uint64_param":
            raise InvalidArgument(f"parameter '{key}': custom parameters may be int64, bool, string or double")
    return priority, timeout_us


def parse_requested_outputs(requested: Any, plan: InputPlan) -> tuple[tuple[str, int], ...]:
    chosen: list[tuple[str, int]] = []
    for output in requested:
        if output.name not in plan.outputs:
            raise InvalidArgument(
                f"unexpected inference output '{output.name}' for model '{plan.model}': expected one of "
                + ", ".join(f"'{n}'" for n in plan.output_names))
        classes = 0
        for key, value in output.parameters.items():
            if key == "classification":
                if value.WhichOneof("parameter_choice") != "int64_param" or value.int64_param < 0:
                    raise InvalidArgument("output parameter 'classification' must be a non-negative int64")
                classes = value.int64_param
            elif key.startswith("shared_memory_"):
                raise InvalidArgument(f"output '{output.name}': shared memory is not supported by this server")
        chosen.append((output.name, classes))
    return tuple(chosen)


def build_response(request: service_pb2.ModelInferRequest, lv: LoadedVersion, parsed: ParsedRequest,
                   outputs: dict[str, np.ndarray]) -> service_pb2.ModelInferResponse:
    plan: InputPlan = lv.input_plan
    response = service_pb2.ModelInferResponse(model_name=lv.model, model_version=lv.version_str, id=request.id)
    tensors = response.outputs
    raws = response.raw_output_contents
    wanted = parsed.outputs
    for name, classes in ((n, 0) for n in plan.output_names) if wanted is None else wanted:
        arr = outputs[name]
        spec = plan.outputs[name]
        if classes:
            arr = classify(arr, classes, plan.batching)
            datatype = "BYTES"
        else:
            datatype = spec.datatype
        if arr.dtype == object or datatype == "BYTES":
            raw = serialize_bytes_tensor(arr)
        else:
            if arr.dtype != spec.dtype:
                arr = arr.astype(spec.dtype)
            raw = arr.tobytes()
        tensors.add(name=name, datatype=datatype, shape=arr.shape)
        raws.append(raw)
    return response


def classify(arr: np.ndarray, k: int, batched: bool) -> np.ndarray:
    """Triton's classification extension: the top k as "<value>:<index>" strings."""
    rows = arr.reshape(arr.shape[0], -1) if batched else arr.reshape(1, -1)
    k = min(k, rows.shape[1])
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    out = np.empty((rows.shape[0], k), dtype=object)
    for r in range(rows.shape[0]):
        for c, idx in enumerate(order[r]):
            out[r, c] = f"{float(rows[r, idx]):f}:{int(idx)}".encode()
    return out if batched else out.reshape(k)
