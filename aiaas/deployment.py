"""`aiaas.deploy(module, example_inputs, name=..., alias=...)`: from an `nn.Module` in your process
to a served version in one call.

It exports the module (`torch.export` by default, which the artifact gate rebuilds without any
pickle; ONNX or TorchScript on request), derives the
signature from the example inputs (batch dimension variable), runs the parity gate against the
module itself, registers the artifact with its serving config, lineage and parity report, and
points the alias at it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import torch

from aiaas.pipeline.artifacts import ArtifactFormat
from aiaas.pipeline.parity import Tolerances
from aiaas.pipeline.publish import Publisher, from_struct
from aiaas.pipeline.signature import ServingConfig, Signature
from aiaas.pipeline.steps import export_candidate


@dataclasses.dataclass(frozen=True)
class Deployment:
    model: str
    version: int
    format: str
    alias: str | None
    signature: Signature
    transformation: str
    parity: dict[str, Any]


def deploy(
    module: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    name: str,
    alias: str | None = "production",
    format: str = "torch_export",
    registry: str | grpc.Channel | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 1000,
    instance_count: int = 1,
    device: str = "cpu",
    sample: Sequence[np.ndarray] | None = None,
    tolerances: Tolerances | None = None,
    force: bool = False,
    metadata: Mapping[str, Any] | None = None,
    actor: str | None = None,
) -> Deployment:
    """Export, gate, register and (unless `alias=None`) point `alias` at the new version.

    `registry` is an address (default `$AIAAS_REGISTRY_URL`, else localhost:50051) or a channel.
    `sample` is a list of arrays (one per input) for the parity gate; without it, rows are
    generated with the example inputs' mean and spread. Raises `ParityRefused` (its `.report`
    says why) when the exported artifact disagrees with the module, unless `force=True`.
    """
    fmt = ArtifactFormat.parse(format)
    serving = ServingConfig(
        max_batch_size=max_batch_size, preferred_batch_sizes=tuple(preferred_batch_sizes),
        max_queue_delay_us=max_queue_delay_us, instance_count=instance_count, device=device,
    )
    candidate = export_candidate(
        module, example_inputs, fmt, serving=serving, input_names=input_names, output_names=output_names,
        sample=sample, tolerances=tolerances, force=force,
    )
    source = {"source": "aiaas.deploy", "module_class": f"{type(module).__module__}.{type(module).__qualname__}"}
    with Publisher(registry, actor=actor) as publisher:
        version = publisher.upload(name, candidate, {**source, **(metadata or {})})
        if alias:
            publisher.set_alias(name, alias, version.version, reason=f"aiaas.deploy {candidate.transformation}")
    return Deployment(
        model=name, version=version.version, format=fmt.value, alias=alias, signature=candidate.signature,
        transformation=candidate.transformation, parity=from_struct(version.reports["parity"])
        if "parity" in version.reports else candidate.report,
    )
