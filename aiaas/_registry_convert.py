"""Plain Python (dicts, lists, strings) -> registry protobuf messages, for the SDK and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import struct_pb2

from aiaas.formats import ArtifactFormat
from aiaas.registry.v1 import registry_pb2 as pb

FORMATS: dict[str, pb.ArtifactFormat] = {f.value: f.pb for f in ArtifactFormat}
FORMAT_NAMES: dict[int, str] = {int(v): k for k, v in FORMATS.items()}

SignatureLike = pb.Signature | Mapping[str, Any]
TensorLike = pb.TensorSpec | Mapping[str, Any] | str


def artifact_format(value: str | int) -> pb.ArtifactFormat:
    if isinstance(value, int):
        if value not in FORMAT_NAMES:
            raise ValueError(f"unknown artifact format {value}")
        return FORMATS[FORMAT_NAMES[value]]
    key = value.strip().lower().replace("-", "_")
    if key not in FORMATS:
        raise ValueError(f"unknown artifact format {value!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[key]


def format_name(value: int) -> str:
    return FORMAT_NAMES.get(value, "unspecified")


def parse_tensor(text: str) -> pb.TensorSpec:
    """`NAME:DATATYPE:DIM,DIM,...`, e.g. `x:FP32:-1,3,224,224` (an empty shape is a scalar)."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise ValueError(f"tensor {text!r}: write NAME:DATATYPE:SHAPE, e.g. x:FP32:-1,10")
    try:
        shape = [int(d) for d in parts[2].split(",") if d.strip()]
    except ValueError:
        raise ValueError(f"tensor {text!r}: shape must be integers separated by commas, -1 for variable") from None
    return pb.TensorSpec(name=parts[0], datatype=parts[1].upper(), shape=shape)


def tensor(value: TensorLike) -> pb.TensorSpec:
    if isinstance(value, pb.TensorSpec):
        return value
    if isinstance(value, str):
        return parse_tensor(value)
    return pb.TensorSpec(name=value["name"], datatype=str(value["datatype"]).upper(),
                         shape=[int(d) for d in value.get("shape", ())])


def signature(value: SignatureLike | None) -> pb.Signature:
    """A Signature from `{"inputs": [...], "outputs": [...]}` whose items are dicts or `name:TYPE:shape`."""
    if value is None:
        return pb.Signature()
    if isinstance(value, pb.Signature):
        return value
    unknown = set(value) - {"inputs", "outputs"}
    if unknown:
        raise ValueError(f"signature has unknown keys {sorted(unknown)}; use 'inputs' and 'outputs'")
    return pb.Signature(inputs=[tensor(t) for t in value.get("inputs", ())],
                        outputs=[tensor(t) for t in value.get("outputs", ())])


def signature_to_dict(sig: pb.Signature) -> dict[str, Any]:
    def specs(items: Iterable[pb.TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {"inputs": specs(sig.inputs), "outputs": specs(sig.outputs)}


def serving_config(value: pb.ServingConfig | Mapping[str, Any] | None) -> pb.ServingConfig:
    if value is None:
        return pb.ServingConfig()
    if isinstance(value, pb.ServingConfig):
        return value
    known = set(pb.ServingConfig.DESCRIPTOR.fields_by_name)
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"serving_config has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return pb.ServingConfig(**dict(value))


def lineage(value: pb.Lineage | Mapping[str, Any] | None) -> pb.Lineage:
    if value is None:
        return pb.Lineage()
    if isinstance(value, pb.Lineage):
        return value
    return pb.Lineage(**dict(value))


def struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        # Round-trip through JSON so tuples, numpy-free numbers etc. land as plain JSON values.
        out.update(json.loads(json.dumps(dict(value))))
    return out
