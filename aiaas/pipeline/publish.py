"""The pipeline's side of the registry: candidates in as versions, parent versions out as artifacts.

Pure converters between the pipeline's plain types and the registry protos live here too, so the
steps in `aiaas.pipeline.steps` never see protobuf.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import math
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any, Self

import grpc
from google.protobuf import json_format, struct_pb2

from aiaas.pipeline.artifacts import ArtifactFormat
from aiaas.pipeline.signature import ServingConfig, Signature, TensorSpec
from aiaas.pipeline.steps import Candidate
from aiaas.registry.v1 import registry_pb2 as pb
from aiaas.registry.v1 import registry_pb2_grpc
from services.common.errors import DataLoss, InvalidArgument
from services.common.server import channel_options

CHUNK_BYTES = 1 << 20
DEFAULT_REGISTRY = "localhost:50051"
MAX_MESSAGE = 64 * 1024 * 1024

_FORMAT_TO_PB = {
    ArtifactFormat.TORCHSCRIPT: pb.ARTIFACT_FORMAT_TORCHSCRIPT,
    ArtifactFormat.TORCH_EXPORT: pb.ARTIFACT_FORMAT_TORCH_EXPORT,
    ArtifactFormat.ONNX: pb.ARTIFACT_FORMAT_ONNX,
    ArtifactFormat.SAFETENSORS: pb.ARTIFACT_FORMAT_SAFETENSORS,
}
_FORMAT_FROM_PB = {v: k for k, v in _FORMAT_TO_PB.items()}


def format_to_pb(fmt: ArtifactFormat) -> int:
    return _FORMAT_TO_PB[fmt]


def format_from_pb(value: int) -> ArtifactFormat:
    try:
        return _FORMAT_FROM_PB[value]
    except KeyError:
        raise InvalidArgument(f"version has no known artifact format ({value})") from None


def signature_to_pb(signature: Signature) -> pb.Signature:
    def specs(items: tuple[TensorSpec, ...]) -> list[pb.TensorSpec]:
        return [pb.TensorSpec(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in items]

    return pb.Signature(inputs=specs(signature.inputs), outputs=specs(signature.outputs))


def signature_from_pb(message: pb.Signature) -> Signature:
    def specs(items: Any) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(s.name, s.datatype, tuple(int(d) for d in s.shape)) for s in items)

    return Signature(specs(message.inputs), specs(message.outputs))


def serving_to_pb(serving: ServingConfig) -> pb.ServingConfig:
    return pb.ServingConfig(
        max_batch_size=serving.max_batch_size, preferred_batch_sizes=list(serving.preferred_batch_sizes),
        max_queue_delay_us=serving.max_queue_delay_us, instance_count=serving.instance_count,
        device=serving.device, max_queue_size=serving.max_queue_size, default_timeout_us=serving.default_timeout_us,
    )


def serving_from_pb(message: pb.ServingConfig) -> ServingConfig:
    return ServingConfig(
        max_batch_size=message.max_batch_size, preferred_batch_sizes=tuple(message.preferred_batch_sizes),
        max_queue_delay_us=message.max_queue_delay_us, instance_count=message.instance_count or 1,
        device=message.device or "cpu", max_queue_size=message.max_queue_size,
        default_timeout_us=message.default_timeout_us,
    )


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


def upload_requests(
    model: str, candidate: Candidate, *, actor: str, metadata: Mapping[str, Any] | None = None,
    description_create: bool = True,
) -> Iterator[pb.UploadVersionRequest]:
    header = pb.UploadVersionHeader(
        model=model,
        format=format_to_pb(candidate.format),
        artifact_sha256=hashlib.sha256(candidate.data).hexdigest(),
        artifact_size=len(candidate.data),
        signature=signature_to_pb(candidate.signature),
        serving_config=serving_to_pb(candidate.serving_config),
        metadata=to_struct({**candidate.metadata, **(metadata or {})}),
        lineage=pb.Lineage(parent_version=candidate.parent_version, transformation=candidate.transformation),
        actor=actor,
        create_model=description_create,
        reports={"parity": to_struct(candidate.report)},
    )
    yield pb.UploadVersionRequest(header=header)
    for start in range(0, len(candidate.data), CHUNK_BYTES):
        yield pb.UploadVersionRequest(chunk=candidate.data[start:start + CHUNK_BYTES])


def assemble_download(responses: Iterator[pb.DownloadArtifactResponse]) -> ParentArtifact:
    version: pb.ModelVersion | None = None
    chunks: list[bytes] = []
    for response in responses:
        if response.HasField("version"):
            version = response.version
        else:
            chunks.append(response.chunk)
    if version is None:
        raise DataLoss("the registry sent an artifact without its version")
    data = b"".join(chunks)
    if hashlib.sha256(data).hexdigest() != version.artifact_sha256:
        raise DataLoss(f"artifact of {version.model}/{version.version} does not match its sha256")
    return ParentArtifact(version, format_from_pb(version.format), data, signature_from_pb(version.signature),
                          serving_from_pb(version.serving_config))


def registry_target(target: str | None = None) -> str:
    return target or os.environ.get("AIAAS_REGISTRY_URL") or DEFAULT_REGISTRY


class Publisher:
    """Registry calls the pipeline makes, over one channel (an address, or a channel the caller owns)."""

    def __init__(self, target: str | grpc.Channel | None = None, *, actor: str | None = None,
                 timeout_s: float = 120.0) -> None:
        if isinstance(target, grpc.Channel):
            self._channel, self._owned = target, False
        else:
            self._channel = grpc.insecure_channel(registry_target(target), options=channel_options(MAX_MESSAGE))
            self._owned = True
        self.stub = registry_pb2_grpc.ModelRegistryStub(self._channel)
        self.actor = actor or default_actor()
        self.timeout_s = timeout_s

    def close(self) -> None:
        if self._owned:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upload(self, model: str, candidate: Candidate, metadata: Mapping[str, Any] | None = None) -> pb.ModelVersion:
        requests = upload_requests(model, candidate, actor=self.actor, metadata=metadata)
        return self.stub.UploadVersion(requests, timeout=self.timeout_s).version

    def download(self, model: str, version: int = 0, alias: str = "") -> ParentArtifact:
        request = pb.DownloadArtifactRequest(model=model, version=version, alias=alias)
        return assemble_download(self.stub.DownloadArtifact(request, timeout=self.timeout_s))

    def get_version(self, model: str, version: int = 0, alias: str = "") -> pb.ModelVersion:
        request = pb.GetVersionRequest(model=model, version=version, alias=alias)
        return self.stub.GetVersion(request, timeout=self.timeout_s).version

    def set_alias(self, model: str, alias: str, version: int, reason: str = "") -> pb.AliasMove:
        request = pb.SetAliasRequest(model=model, alias=alias, version=version, expected_version=-1,
                                     actor=self.actor, reason=reason)
        return self.stub.SetAlias(request, timeout=self.timeout_s).move


def default_actor() -> str:
    return os.environ.get("AIAAS_ACTOR") or f"{getpass.getuser()}@{socket.gethostname()}"
