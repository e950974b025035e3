"""Fixtures for the inference service tests: a real registry process and real inference processes.

Models are registered through the registry's own gRPC contract (UploadVersion, SetAlias); the
inference service is driven with `tritonclient.grpc`, as users drive it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from aiaas.identity import ClientIdentity
from aiaas.registry.v1 import registry_pb2, registry_pb2_grpc
from tests.support.procs import ServiceProcess

FORMAT_ENUM = {
    "torchscript": registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
    "torch_export": registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT,
    "onnx": registry_pb2.ARTIFACT_FORMAT_ONNX,
}


class Registry:
    """A registry process plus the calls tests need to publish models."""

    def __init__(self, proc: ServiceProcess, identity: ClientIdentity | None = None) -> None:
        self.proc = proc
        # With an identity (mTLS certificate): localhost, the name in the test certificates.
        self.channel = (identity.channel(f"localhost:{proc.port}") if identity is not None
                        else grpc.insecure_channel(proc.address))
        self.stub = registry_pb2_grpc.ModelRegistryStub(self.channel)

    @property
    def address(self) -> str:
        return self.proc.address

    def register(self, model: str, artifact: Any, *, max_batch_size: int = 8,
                 preferred_batch_sizes: Sequence[int] = (), max_queue_delay_us: int = 0, instance_count: int = 1,
                 max_queue_size: int = 0, default_timeout_us: int = 0, alias: str | None = None,
                 strict_queue_delay: bool = False) -> int:
        """Upload `artifact` (tests.inference.models.Artifact) as a new version; returns its number."""
        data = Path(artifact.path).read_bytes()
        header = registry_pb2.UploadVersionHeader(
            model=model, format=FORMAT_ENUM[artifact.format], artifact_sha256=hashlib.sha256(data).hexdigest(),
            artifact_size=len(data), create_model=True, actor="tests",
            signature=registry_pb2.Signature(
                inputs=[registry_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape)
                        for t in artifact.inputs],
                outputs=[registry_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape)
                         for t in artifact.outputs]),
            serving_config=registry_pb2.ServingConfig(
                max_batch_size=max_batch_size, preferred_batch_sizes=list(preferred_batch_sizes),
                max_queue_delay_us=max_queue_delay_us, instance_count=instance_count, device="cpu",
                max_queue_size=max_queue_size, default_timeout_us=default_timeout_us,
                strict_queue_delay=strict_queue_delay))

        def messages() -> Iterator[registry_pb2.UploadVersionRequest]:
            yield registry_pb2.UploadVersionRequest(header=header)
            for start in range(0, len(data), 1 << 20):
                yield registry_pb2.UploadVersionRequest(chunk=data[start:start + (1 << 20)])

        version = self.stub.UploadVersion(messages(), timeout=60).version.version
        if alias:
            self.set_alias(model, alias, version)
        return int(version)

    def set_alias(self, model: str, alias: str, version: int) -> None:
        self.stub.SetAlias(registry_pb2.SetAliasRequest(model=model, alias=alias, version=version,
                                                        expected_version=-1, actor="tests"), timeout=30)

    def close(self) -> None:
        self.channel.close()


def start_registry(tmp: Path, port: int | None = None, env: dict[str, str] | None = None) -> ServiceProcess:
    return ServiceProcess("registry", args=["--database-url", f"sqlite:///{tmp}/registry.db",
                                            "--artifact-dir", str(tmp / "artifacts")], port=port, env=env).start()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    proc = start_registry(tmp_path_factory.mktemp("registry"))
    reg = Registry(proc)
    yield reg
    reg.close()
    proc.stop()


def inference_args(registry: Registry | None, cache: Path, *extra: str, follow: str = "production") -> list[str]:
    args = ["--model-cache-dir", str(cache), "--follow-aliases", follow, "--torch-threads", "1",
            "--grace-period-s", "5", "--drain-timeout-s", "20", "--startup-timeout-s", "90"]
    if registry is not None:
        args += ["--registry-url", registry.address]
    return args + list(extra)


def start_inference(args: Sequence[str], env: dict[str, str] | None = None) -> ServiceProcess:
    return ServiceProcess("inference", args=list(args), env=env).start(timeout=120)


def wait_model(proc: ServiceProcess, model: str, version: int | None = None, timeout: float = 90.0) -> None:
    """Poll the per-model health entry (`model` or `model/version`) until SERVING."""
    service = model if version is None else f"{model}/{version}"
    proc.wait_ready(service, timeout)


def write_triton_backends(path: Path, entries: dict[str, dict[str, str]]) -> str:
    path.write_text(json.dumps(entries))
    return str(path)
