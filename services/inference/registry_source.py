"""Versions from the registry: describe (GetVersion), fetch the artifact into the content-addressed
cache (sha256 checked while streaming and again before load), and start its executor.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
from pathlib import Path

import grpc

from aiaas import manifest, serving
from aiaas._files_download import FilesDownload
from aiaas.formats import ArtifactFormat
from aiaas.registry.v1 import registry_pb2
from aiaas.tensors import TensorSpec
from services.common.errors import AiaasError, DataLoss, FailedPrecondition, InvalidArgument, NotFound
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
    if fmt is None or not (fmt.servable or fmt is ArtifactFormat.HF_CAUSAL_LM):
        name = registry_pb2.ArtifactFormat.Name(version.format)
        raise FailedPrecondition(
            f"model '{version.model}' version {version.version}: format {name} cannot be served "
            "(TorchScript, torch.export, ONNX or a Hugging Face causal LM checkpoint only)")
    files: tuple[manifest.ManifestFile, ...] = ()
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    if fmt.multi_file:
        files = _checked_files(version)
    if fmt is ArtifactFormat.HF_CAUSAL_LM:
        # The generate protocol's tensors, whatever the registry recorded (docs/generative.md).
        from services.inference.generate_protocol import INPUTS, OUTPUTS

        inputs, outputs = INPUTS, OUTPUTS
    else:
        sig = version.signature
        inputs = tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in sig.inputs)
        outputs = tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in sig.outputs)
    return VersionSpec(
        model=version.model,
        version=version.version,
        format=fmt.value,
        inputs=inputs,
        outputs=outputs,
        serving=serving.from_pb(version.serving_config),
        sha256=version.artifact_sha256,
        size=version.artifact_size,
        files=files,
    )


def _checked_files(version: registry_pb2.ModelVersion) -> tuple[manifest.ManifestFile, ...]:
    """The version's files, valid paths and hashes, and together exactly its manifest's sha256."""
    where = f"model '{version.model}' version {version.version}"
    try:
        files = manifest.check_files(manifest.ManifestFile(f.path, f.sha256, f.size) for f in version.files)
    except AiaasError as exc:
        raise DataLoss(f"{where} lists invalid files: {exc.message}") from None
    if manifest.digest(files)[0] != version.artifact_sha256.lower():
        raise DataLoss(f"{where}: its files do not match its manifest sha256 {version.artifact_sha256}")
    return files


ARTIFACT_FILE = "artifact"
CHECKPOINT_DIR = "checkpoint"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_intact(directory: Path, files: tuple[manifest.ManifestFile, ...]) -> bool:
    """Exactly the manifest's files (nothing else visible), each of its size and sha256."""
    try:
        found = manifest.files_in(directory)
    except (OSError, AiaasError):
        return False
    if set(found) != {f.path for f in files}:
        return False
    return all(manifest.hash_file(found[f.path]) == (f.sha256, f.size) for f in files)


def _seal(directory: Path) -> None:
    """Read-only for everyone (files 0444, directories 0755); no partial files left inside."""
    for root, dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            if name.startswith("."):
                os.unlink(path)
            else:
                os.chmod(path, 0o444)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    os.chmod(directory, 0o755)


class ArtifactCache:
    """Each artifact in its own directory, `<dir>/<sha256>/artifact` (directory 0755, file 0444).

    A cached file is reused only when its hash still matches. One directory per artifact means a
    worker can be given read access to its own artifact's directory and nothing else, and nothing
    inside one artifact can name a sibling file (ONNX external data is refused by the safety gate).

    A multi-file version (a checkpoint) is the directory `<dir>/<manifest sha256>/checkpoint`: its
    files are streamed into a staging directory beside it, each verified against the manifest as
    it completes, and the directory is renamed into place only once every file is there, so no
    half-written checkpoint is ever loadable. A cached checkpoint is reused when it holds exactly
    the manifest's files and every one still hashes right.
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
            if spec.files:
                return await self._fetch_checkpoint(spec)
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

    async def _fetch_checkpoint(self, spec: VersionSpec) -> Path:
        final = self.directory / spec.sha256.lower() / CHECKPOINT_DIR
        if final.is_dir():
            if await asyncio.to_thread(_checkpoint_intact, final, spec.files):
                return final
            log.warning("cached checkpoint of %s version %d failed verification; downloading it again",
                        spec.model, spec.version)
        final.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(final.parent, 0o755)
        staging = final.with_name(f".{CHECKPOINT_DIR}.{os.getpid()}.staging")
        await asyncio.to_thread(shutil.rmtree, staging, True)
        try:
            await self._download_files(spec, staging)
            await asyncio.to_thread(_seal, staging)
            # Checked again from disk: what is loaded is exactly what was verified.
            if not await asyncio.to_thread(_checkpoint_intact, staging, spec.files):
                raise DataLoss(f"checkpoint of '{spec.model}' version {spec.version} changed on disk while "
                               "it was verified")
            if final.exists():
                stale = final.with_name(f".{CHECKPOINT_DIR}.{os.getpid()}.stale")
                os.replace(final, stale)
                await asyncio.to_thread(shutil.rmtree, stale, True)
            try:
                os.replace(staging, final)
            except OSError:
                # Another service sharing this cache put the same checkpoint in place first.
                if not await asyncio.to_thread(_checkpoint_intact, final, spec.files):
                    raise
                await asyncio.to_thread(shutil.rmtree, staging, True)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, staging, True))
            raise
        log.info("downloaded %s version %d (%d files, %d bytes)", spec.model, spec.version, len(spec.files),
                 manifest.total_size(spec.files))
        return final

    async def _download_files(self, spec: VersionSpec, staging: Path) -> None:
        """Stream every file into `staging`; each is hashed as it arrives and renamed in once it matches."""
        version = registry_pb2.ModelVersion(
            model=spec.model, version=spec.version, artifact_sha256=spec.sha256, artifact_size=spec.size,
            files=[registry_pb2.ArtifactFile(path=f.path, sha256=f.sha256, size=f.size) for f in spec.files])
        download = FilesDownload(version, staging)
        try:
            async for message in self._registry.download_files(
                    spec.model, spec.version, context=f"downloading '{spec.model}' version {spec.version}"):
                if message.WhichOneof("payload") == "version" and message.version.artifact_sha256 != spec.sha256:
                    raise DataLoss(f"the registry sent another artifact for '{spec.model}' version {spec.version}")
                download.receive(message)
            download.finish()
        finally:
            download.close()

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

        if spec.generative:
            return await self._open_generative(spec)
        path = await self.cache.fetch(spec)
        executor = BatchedExecutor(spec, path, self.settings, lv)
        await executor.start()
        return executor

    async def _open_generative(self, spec: VersionSpec) -> Executor:
        from services.inference.generative_workers import GenerativeExecutor, engine_config

        if not spec.files:
            raise DataLoss(f"model '{spec.model}' version {spec.version} is a checkpoint without files")
        engine_config(spec, self.settings)  # refuses what cannot be served before anything is downloaded
        path = await self.cache.fetch(spec)
        executor = GenerativeExecutor(spec, path, self.settings)
        await executor.start()
        return executor
