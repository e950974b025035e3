"""Pipeline steps that need no registry: export a module, or transform an artifact, then gate it.

Each step returns a `Candidate` (artifact, signature, lineage, parity report) that
`aiaas.pipeline.publish` uploads as a version; a candidate outside its tolerances raises
`ParityRefused` unless forced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from aiaas.errors import InvalidArgument
from aiaas.pipeline.artifacts import ArtifactFormat, load_runner, module_runner
from aiaas.pipeline.export import export_module
from aiaas.pipeline.optimize import transform
from aiaas.pipeline.parity import Tolerances, default_tolerances, gate, run_parity
from aiaas.pipeline.signature import (
    ServingConfig,
    Signature,
    as_tensor_tuple,
    check_inputs,
    derive_signature,
    generate_inputs,
)

PARITY_SAMPLES = 64


@dataclasses.dataclass(frozen=True)
class Candidate:
    format: ArtifactFormat
    data: bytes
    signature: Signature
    serving_config: ServingConfig
    transformation: str
    report: dict[str, Any]
    parent_version: int = 0
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


def module_size_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _latency_batches(serving: ServingConfig) -> tuple[int, ...]:
    return (1, serving.max_batch_size) if serving.max_batch_size > 1 else (1,)


def parity_inputs(
    signature: Signature, sample: Sequence[np.ndarray] | None, *, like: Sequence[torch.Tensor] | None = None
) -> tuple[list[np.ndarray], str]:
    """The user's sample when given (checked against the signature), else generated rows."""
    if sample is not None:
        arrays = [np.ascontiguousarray(a) for a in sample]
        check_inputs(signature, arrays)
        return arrays, "user"
    return generate_inputs(signature, PARITY_SAMPLES, seed=0, like=like), "generated"


def export_candidate(
    module: torch.nn.Module,
    example_inputs: object,
    fmt: ArtifactFormat,
    *,
    serving: ServingConfig,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    sample: Sequence[np.ndarray] | None = None,
    tolerances: Tolerances | None = None,
    force: bool = False,
    measure_latency: bool = True,
) -> Candidate:
    """Export `module` and gate the artifact against the eager module itself."""
    serving.validate()
    module = module.eval()
    inputs = as_tensor_tuple(example_inputs, "example_inputs")
    if any(t.dim() == 0 for t in inputs):
        raise InvalidArgument("example_inputs must have a batch dimension (no scalars)")
    try:
        with torch.inference_mode():
            raw_outputs = module(*inputs)
    except Exception as exc:
        raise InvalidArgument(f"the module failed on example_inputs: {exc}") from exc
    outputs = as_tensor_tuple(raw_outputs, "the module's output")
    signature = derive_signature(inputs, outputs, input_names, output_names)
    data = export_module(module, inputs, fmt, [s.name for s in signature.inputs], [s.name for s in signature.outputs])
    transformation = f"export:{fmt.value}"
    arrays, source = parity_inputs(signature, sample, like=inputs)
    report = run_parity(
        module_runner(module), load_runner(fmt, data, signature), arrays, [s.name for s in signature.outputs],
        tolerances or default_tolerances(transformation), transformation=transformation, sample_source=source,
        parent_size=module_size_bytes(module), candidate_size=len(data),
        latency_batches=_latency_batches(serving), measure_latency=measure_latency,
    )
    report["parent"] = {"kind": "eager module", "class": type(module).__qualname__}
    return Candidate(fmt, data, signature, serving, transformation, gate(report, force=force))


def transform_candidate(
    parent_format: ArtifactFormat,
    parent_data: bytes,
    signature: Signature,
    serving: ServingConfig,
    transformation: str,
    *,
    parent_version: int = 0,
    ort_level: str = "extended",
    sample: Sequence[np.ndarray] | None = None,
    tolerances: Tolerances | None = None,
    force: bool = False,
    measure_latency: bool = True,
) -> Candidate:
    """Transform a parent artifact and gate the result against the parent artifact."""
    result = transform(parent_format, parent_data, signature, transformation, ort_level=ort_level)
    arrays, source = parity_inputs(signature, sample)
    report = run_parity(
        load_runner(parent_format, parent_data, signature), load_runner(result.format, result.data, signature),
        arrays,
        [s.name for s in signature.outputs], tolerances or default_tolerances(result.lineage),
        transformation=result.lineage, sample_source=source, parent_size=len(parent_data),
        candidate_size=len(result.data), latency_batches=_latency_batches(serving), measure_latency=measure_latency,
    )
    report["parent"] = {"kind": "version", "version": parent_version, "format": parent_format.value}
    return Candidate(result.format, result.data, signature, serving, result.lineage, gate(report, force=force),
                     parent_version=parent_version)
