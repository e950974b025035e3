"""Versions from the registry: describe (GetVersion), fetch the artifact into the content-addressed
cache (sha256 checked while streaming and again before load), and start its executor.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

import grpc

from aiaas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.errors import (
    AiaasError,
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.inference.core import Executor, LoadedVersion, ServingConfig, TensorSpec, VersionSpec
from services.inference.settings import InferenceSettings

log = logging.getLogger("aiaas.inference.registry")

FORMAT_BY_PROTO = {
    registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT: "torchscript",
    registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT: "torch_export",
    registry_pb2.ARTIFACT_FORMAT_ONNX: "onnx",
}
_HASH_CHUNK = 4 * 1024 * 1024


def spec_from_proto(version: registry_pb2.ModelVersion) -> VersionSpec:
    fmt = FORMAT_BY_PROTO.get(version.format)
    if fmt is None:
        name = registry_pb2.ArtifactFormat.Name(version.format)
        raise FailedPrecondition(
            f"model '{version.model}' version {version.version}: format {name} cannot be served "
            "(TorchScript, torch.export or ONNX only)")
    sig = version.signature
    cfg = version.serving_config
    return VersionSpec(
        model=version.model,
        version=version.version,
        format=fmt,
        inputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in sig.inputs),
        outputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in sig.outputs),
        serving=ServingConfig(
            max_batch_size=cfg.max_batch_size,
            preferred_batch_sizes=tuple(cfg.preferred_batch_sizes),
            max_queue_delay_us=cfg.max_queue_delay_us,
            instance_count=cfg.instance_count or 1,
            device=cfg.device,
            max_queue_size=cfg.max_queue_size,
            default_timeout_us=cfg.default_timeout_us,
        ),
        sha256=version.artifact_sha256,
        size=version.artifact_size,
    )


def registry_error(exc: grpc.aio.AioRpcError, what: str) -> AiaasError:
    code = exc.code()
    message = f"{what}: {exc.details()}"
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(message)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(message)
    if code == grpc.StatusCode.DATA_LOSS:
        return DataLoss(message)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"registry unreachable ({what}): {exc.details()}")
    return Internal(message)


ARTIFACT_FILE = "artifact"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactCache:
    """Each artifact in its own directory, `<dir>/<sha256>/artifact` (directory 0755, file 0444).

    A cached file is reused only when its hash still matches. One directory per artifact means a
    worker can be given read access to its own artifact's directory and nothing else, and nothing
    inside one artifact can name a sibling file (ONNX external data is refused by the safety gate).
    """

    def __init__(self, directory: Path, stub: registry_pb2_grpc.ModelRegistryStub) -> None:
        self.directory = directory
        self._stub = stub
        self._locks: dict[str, asyncio.Lock] = {}

    async def fetch(self, spec: VersionSpec) -> Path:
        sha = spec.sha256.lower()
        if len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha):
            raise DataLoss(f"model '{spec.model}' version {spec.version} has no valid artifact sha256")
        lock = self._locks.setdefault(sha, asyncio.Lock())
        async with lock:
            path = self.directory / sha / ARTIFACT_FILE
            if path.exists() and await asyncio.to_thread(file_sha256, path) == sha:
                return path
            await self._download(spec, path)
            # Checked again from disk: what is loaded is exactly what was verified.
            actual = await asyncio.to_thread(file_sha256, path)
            if actual != sha:
                path.unlink(missing_ok=True)
                raise DataLoss(f"artifact of '{spec.model}' version {spec.version} changed on disk "
                               f"(sha256 {actual}, expected {sha})")
            return path

    async def _download(self, spec: VersionSpec, path: Path) -> None:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o755)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        digest = hashlib.sha256()
        size = 0
        request = registry_pb2.DownloadArtifactRequest(model=spec.model, version=spec.version,
                                                       chunk_size=4 * 1024 * 1024)
        try:
            with partial.open("wb") as handle:
                async for message in self._stub.DownloadArtifact(request):
                    if message.WhichOneof("payload") != "chunk":
                        continue
                    digest.update(message.chunk)
                    size += len(message.chunk)
                    handle.write(message.chunk)
        except grpc.aio.AioRpcError as exc:
            partial.unlink(missing_ok=True)
            raise registry_error(exc, f"downloading '{spec.model}' version {spec.version}") from None
        if digest.hexdigest() != spec.sha256.lower() or (spec.size and size != spec.size):
            partial.unlink(missing_ok=True)
            raise DataLoss(f"artifact of '{spec.model}' version {spec.version} failed verification: "
                           f"got {size} bytes with sha256 {digest.hexdigest()}, expected {spec.size} bytes "
                           f"with sha256 {spec.sha256}")
        os.chmod(partial, 0o444)
        os.replace(partial, path)
        log.info("downloaded %s version %d (%d bytes)", spec.model, spec.version, size)


class RegistryLoader:
    """`VersionLoader` for registry versions, served by local workers."""

    def __init__(self, settings: InferenceSettings, channel: grpc.aio.Channel) -> None:
        self.settings = settings
        self.stub = registry_pb2_grpc.ModelRegistryStub(channel)
        self.cache = ArtifactCache(settings.cache_dir, self.stub)

    async def describe(self, model: str, version: int, alias: str) -> VersionSpec:
        request = registry_pb2.GetVersionRequest(model=model, version=version)
        try:
            if version:
                reply = await self.stub.GetVersion(request, timeout=30)
            else:
                reply = await self._default_version(model, alias)
        except grpc.aio.AioRpcError as exc:
            raise registry_error(exc, f"looking up '{model}' version {version or alias}") from None
        return spec_from_proto(reply.version)

    async def _default_version(self, model: str, alias: str) -> registry_pb2.GetVersionResponse:
        """The version `alias` points at, else the latest one."""
        try:
            return await self.stub.GetVersion(registry_pb2.GetVersionRequest(model=model, alias=alias), timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        found = await self.stub.GetModel(registry_pb2.GetModelRequest(name=model), timeout=30)
        if not found.model.latest_version:
            raise NotFound(f"model '{model}' has no versions")
        return await self.stub.GetVersion(
            registry_pb2.GetVersionRequest(model=model, version=found.model.latest_version), timeout=30)

    async def open(self, spec: VersionSpec, lv: LoadedVersion) -> Executor:
        from services.inference.executors import BatchedExecutor

        path = await self.cache.fetch(spec)
        executor = BatchedExecutor(spec, path, self.settings, lv)
        await executor.start()
        return executor
