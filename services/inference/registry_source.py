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

from aiaas import serving
from aiaas.formats import ArtifactFormat
from aiaas.registry.v1 import registry_pb2
from aiaas.tensors import TensorSpec
from services.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from services.common.registry_client import RegistryClient
from services.inference.core import LoadedVersion
from services.inference.entities import Executor, VersionSpec
from services.inference.settings import InferenceSettings

log = logging.getLogger("aiaas.inference.registry")

_HASH_CHUNK = 4 * 1024 * 1024


def spec_from_proto(version: registry_pb2.ModelVersion) -> VersionSpec:
    try:
        fmt: ArtifactFormat | None = ArtifactFormat.from_pb(version.format)
    except InvalidArgument:
        fmt = None
    if fmt is None or not fmt.servable:
        name = registry_pb2.ArtifactFormat.Name(version.format)
        raise FailedPrecondition(
            f"model '{version.model}' version {version.version}: format {name} cannot be served "
            "(TorchScript, torch.export or ONNX only)")
    sig = version.signature
    return VersionSpec(
        model=version.model,
        version=version.version,
        format=fmt.value,
        inputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in sig.inputs),
        outputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in sig.outputs),
        serving=serving.from_pb(version.serving_config),
        sha256=version.artifact_sha256,
        size=version.artifact_size,
    )


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

    def __init__(self, directory: Path, registry: RegistryClient) -> None:
        self.directory = directory
        self._registry = registry
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
        try:
            with partial.open("wb") as handle:
                async for chunk in self._registry.download(
                        spec.model, spec.version, context=f"downloading '{spec.model}' version {spec.version}"):
                    digest.update(chunk)
                    size += len(chunk)
                    handle.write(chunk)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
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
        self.registry = RegistryClient(channel, timeout_s=30)
        self.cache = ArtifactCache(settings.cache_dir, self.registry)

    async def describe(self, model: str, version: int, alias: str) -> VersionSpec:
        context = f"looking up '{model}' version {version or alias}"
        if version:
            found = await self.registry.get_version(model, version, context=context)
        else:
            found = await self._default_version(model, alias, context)
        return spec_from_proto(found)

    async def _default_version(self, model: str, alias: str, context: str) -> registry_pb2.ModelVersion:
        """The version `alias` points at, else the latest one."""
        try:
            return await self.registry.get_version(model, alias=alias, context=context)
        except NotFound:
            pass
        latest = (await self.registry.get_model(model, context=context)).latest_version
        if not latest:
            raise NotFound(f"model '{model}' has no versions")
        return await self.registry.get_version(model, latest, context=context)

    async def open(self, spec: VersionSpec, lv: LoadedVersion) -> Executor:
        from services.inference.executors import BatchedExecutor

        path = await self.cache.fetch(spec)
        executor = BatchedExecutor(spec, path, self.settings, lv)
        await executor.start()
        return executor
