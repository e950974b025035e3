"""The inference service's domain types: what a version is, what an executor returns, what telemetry
sees of a finished request. Plain dataclasses and protocols, no grpc."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from aiaas.formats import ArtifactFormat, platform_of
from aiaas.manifest import ManifestFile
from aiaas.serving import ServingConfig
from aiaas.tensors import TensorSpec
from services.common.reporting import GenerationStats


@dataclasses.dataclass(frozen=True)
class VersionSpec:
    """One immutable version as the registry describes it (or as a Triton backend reports it)."""

    model: str
    version: int
    # An `aiaas.formats` name, or "triton" for a model delegated to a remote Triton server.
    format: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    serving: ServingConfig = dataclasses.field(default_factory=ServingConfig)
    sha256: str = ""
    size: int = 0
    # Platform reported by a remote Triton server; derived from the format otherwise.
    remote_platform: str = ""
    # The files of a multi-file version (a checkpoint directory), sorted by path; () for one file.
    files: tuple[ManifestFile, ...] = ()

    @property
    def generative(self) -> bool:
        """A causal LM served by the generative engine (decoupled: one request, many responses)."""
        return self.format == ArtifactFormat.HF_CAUSAL_LM.value

    @property
    def platform(self) -> str:
        return self.remote_platform or platform_of(self.format)

    @property
    def key(self) -> tuple[str, int]:
        return (self.model, self.version)


class VersionState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    DRAINING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclasses.dataclass
class Outcome:
    """What an executor returns for one request (the batcher's InferOutcome has this shape)."""

    outputs: dict[str, np.ndarray]
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    batch_size: int = 1


class Executor(Protocol):
    """Runs requests for one version: `DynamicBatcher` + `WorkerPool`, or a remote Triton model."""

    async def start(self) -> None: ...

    async def infer(self, inputs: dict[str, np.ndarray], *, priority: int, timeout_us: int | None) -> Any: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """A finished request, as telemetry wants it (the monitor's reporter hooks in here)."""

    model: str
    version: int
    status: str
    latency_ns: int
    queue_ns: int = 0
    compute_ns: int = 0
    batch_size: int = 0
    # The request's inputs (not copied), for drift sampling; None for failed requests.
    inputs: Mapping[str, np.ndarray] | None = None
    # A generative request's tokens and timings (`services.common.reporting.GenerationStats`).
    generation: GenerationStats | None = None


RequestObserver = Callable[[RequestRecord], None]
