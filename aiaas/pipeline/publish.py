"""The pipeline's side of the registry: candidates in as versions, parent versions out as artifacts.

Pure converters between the pipeline's plain types and the registry protos live here too, so the
steps in `aiaas.pipeline.steps` never see protobuf.
"""

from __future__ import annotations

import dataclasses
import getpass
import math
import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import grpc
from google.protobuf import json_format, struct_pb2

from aiaas import serving
from aiaas.formats import ArtifactFormat
from aiaas.pipeline.signature import Signature, TensorSpec
from aiaas.pipeline.steps import Candidate
from aiaas.registry.v1 import registry_pb2 as pb
from aiaas.registry_client import RegistryClient
from aiaas.serving import ServingConfig

DEFAULT_REGISTRY = "localhost:50051"

def signature_to_pb(signature: Signature) -> pb.Signature:
    def specs(items: tuple[TensorSpec, ...]) -> list[pb.TensorSpec]:
        return [pb.TensorSpec(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in items]

    return pb.Signature(inputs=specs(signature.inputs), outputs=specs(signature.outputs))


def signature_from_pb(message: pb.Signature) -> Signature:
    def specs(items: Any) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(s.name, s.datatype, tuple(int(d) for d in s.shape)) for s in items)

    return Signature(specs(message.inputs), specs(message.outputs))


def _plain(value: Any) -> Any:
    """Struct holds JSON values only: None stays null, tuples become lists, numbers become floats."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        number = float(value)
        # JSON has no infinity; a report says "inf" rather than failing to store.
        return number if math.isfinite(number) else str(number)
    return str(value)


def to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(_plain(data))
    return message


def from_struct(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


@dataclasses.dataclass(frozen=True)
class ParentArtifact:
    version: pb.ModelVersion
    format: ArtifactFormat
    data: bytes
    signature: Signature
    serving: ServingConfig


def registry_target(target: str | None = None) -> str:
    return target or os.environ.get("AIAAS_REGISTRY_URL") or DEFAULT_REGISTRY


class Publisher:
    """Registry calls the pipeline makes, through the registry SDK (`aiaas.RegistryClient`).

    `target` is an address (default `$AIAAS_REGISTRY_URL`, else localhost:50051), a channel, or a
    `RegistryClient` the caller owns.
    """

    def __init__(self, target: str | grpc.Channel | RegistryClient | None = None, *, actor: str | None = None,
                 timeout_s: float = 120.0) -> None:
        if isinstance(target, RegistryClient):
            self.client, self._owned = target, False
        elif isinstance(target, grpc.Channel):
            self.client = RegistryClient(actor=actor or default_actor(), timeout=timeout_s, channel=target)
            self._owned = False
        else:
            self.client = RegistryClient(registry_target(target), actor=actor or default_actor(), timeout=timeout_s)
            self._owned = True

    def close(self) -> None:
        if self._owned:
            self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upload(self, model: str, candidate: Candidate, metadata: Mapping[str, Any] | None = None) -> pb.ModelVersion:
        return self.client.upload_version(
            model, candidate.data, format=candidate.format.value, signature=signature_to_pb(candidate.signature),
            serving_config=serving.to_pb(candidate.serving_config),
            metadata=_plain({**candidate.metadata, **(metadata or {})}),
            lineage=pb.Lineage(parent_version=candidate.parent_version, transformation=candidate.transformation),
            reports={"parity": _plain(candidate.report)},
        )

    def download(self, model: str, version: int = 0, alias: str = "") -> ParentArtifact:
        with tempfile.TemporaryDirectory(prefix="aiaas-parent-") as tmp:
            path = Path(tmp) / "artifact"
            found = self.client.download_artifact(model, version or alias or None, path)
            data = path.read_bytes()
        return ParentArtifact(found, ArtifactFormat.from_pb(found.format), data, signature_from_pb(found.signature),
                              serving.from_pb(found.serving_config))

    def get_model(self, name: str) -> pb.Model:
        return self.client.get_model(name)

    def set_alias(self, model: str, alias: str, version: int, reason: str = "", force: bool = False) -> pb.AliasMove:
        return self.client.set_alias(model, alias, version, reason=reason, force=force)


def default_actor() -> str:
    return os.environ.get("AIAAS_ACTOR") or f"{getpass.getuser()}@{socket.gethostname()}"
