"""Settings of the inference service (`python -m services.inference --help` lists them)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from services.common.cpus import MAX_PROCESSES, auto_process_count
from services.common.errors import InvalidArgument
from services.common.settings import ServerSettings
from services.inference.generative.config import COMPUTE_DTYPES
from services.inference.sandbox import DEFAULT_ADDRESS_SPACE_MB, resolve_user
from services.inference.sandbox import MODES as SANDBOX_MODES

# Triton's own limit: real tensors (images, embeddings) must fit in one message.
INFERENCE_MAX_MESSAGE_BYTES = 2**31 - 1
WORKER_MODES = ("process", "thread")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "aiaas" / "models")


@dataclasses.dataclass(frozen=True)
class InferenceSettings(ServerSettings):
    """KServe v2 inference service: loads versions from the registry, batches, runs them in workers."""

    port: int = 50052
    max_message_bytes: int = INFERENCE_MAX_MESSAGE_BYTES
    # Registry address (host:port): versions, artifacts and the change feed; required while
    # follow_aliases is set.
    registry_url: str = "localhost:50051"
    # Aliases whose versions are loaded and followed through the registry's change feed.
    follow_aliases: tuple[str, ...] = ("production",)
    # Restricts following to these models; empty follows every model.
    follow_models: tuple[str, ...] = ()
    # What a request that names a model but no version gets.
    default_alias: str = "production"
    # Versions to load at start-up: "model", "model:alias" or "model/version".
    load_models: tuple[str, ...] = ()
    # Artifact cache, one directory per artifact (<sha256>/artifact); empty means
    # $XDG_CACHE_HOME/aiaas/models (~/.cache/aiaas/models).
    model_cache_dir: str = ""
    # Processes accepting gRPC on the port (SO_REUSEPORT): this one (the core: models, batchers,
    # workers, statistics) and frontends that terminate gRPC for their share of the connections and
    # hand calls to the core (docs/inference.md, "Frontends"). 0: one per core available to the
    # service (affinity and cgroup quota) from 4 cores up, else 1 (measured on 2 cores, a second
    # process costs more than it gives); 1: the core alone.
    frontends: int = 0
    # Requests one version's batcher may hold queued before it refuses more (RESOURCE_EXHAUSTED);
    # used when the version's ServingConfig leaves max_queue_size 0.
    max_queue_size: int = 1024
    # Device ("cpu", "cuda" or "cuda:N") of a version whose ServingConfig leaves device empty.
    device: str = "cpu"
    # Priority levels of every version's batcher; level 1 is served first and a request picks its
    # level with a `priority` parameter. 1 means a single level.
    priority_levels: int = 1
    # Level of a request without a `priority` parameter; 0 means the lowest level (priority_levels).
    default_priority_level: int = 0
    # "process": one worker process per model instance; "thread": a thread pool in this process.
    worker_mode: str = "process"
    # Intra-op threads (torch, ONNX Runtime) per model instance; 0 means 1, except torch in thread
    # mode, which keeps its own default, and generative models, whose instances share the cores
    # available to the service less one (affinity and cgroup quota; at least 1 each).
    torch_threads: int = 0
    # Generative models on CPU (bf16/fp32): time each linear shape's kernels at load (oneDNN-packed,
    # plain, a GEMM on the transposed weight) and use the fastest per row count, at the cost of a
    # private copy per instance instead of the checkpoint's shared memory-mapped pages
    # (docs/generative.md, "Packed weights, tuned kernels").
    pack_weights: bool = True
    # The dtype generative models compute in: "auto" (the checkpoint's, but fp32 for a bf16/fp16
    # checkpoint on a CPU with no native 16-bit path: 3-5x faster there, twice the memory),
    # "checkpoint", "float32", "bfloat16" or "float16" (docs/generative.md, "Compute dtype").
    lm_compute_dtype: str = "auto"
    # The interpreter that runs generative versions with `engine: vllm` (one that can import vllm);
    # empty: this service's own. vLLM workers are not confined by worker_sandbox (docs/generative.md).
    vllm_python: str = ""
    # Confinement of model worker processes (docs/isolation.md): "auto" applies what this host
    # allows and logs the rest, "require" refuses to start a worker that lacks an essential measure,
    # "off" runs workers with the service's own rights.
    worker_sandbox: str = "auto"
    # The user workers run as when the service runs as root: a name, a uid, or uid:gid.
    worker_user: str = "nobody"
    # Open files a worker may hold.
    worker_open_files: int = 256
    # Address space a CPU worker may map besides 4x its artifact's size (torch alone reserves
    # ~0.9 GiB); 0 removes the cap. GPU workers are never capped (the driver reserves far more).
    worker_address_space_mb: int = DEFAULT_ADDRESS_SPACE_MB
    # Longest one batch may run in a worker before the worker is killed and restarted; 0: no bound.
    batch_timeout_s: float = 60.0
    # JSON or YAML file mapping a served model name to {url, model_name[, model_version]}.
    triton_backends: str | None = None
    # Monitor address (host:port) that gets per-request telemetry and drift samples; unset sends
    # nothing (the service's own per-model metrics are kept either way).
    monitor_url: str | None = None
    # How long start-up waits for the first registry snapshot and start-up models.
    startup_timeout_s: float = 120.0
    # Longest wait for an old version's in-flight requests when it is swapped out or unloaded.
    drain_timeout_s: float = 60.0
    # First wait before reconnecting to the registry feed or retrying a failed load, in seconds;
    # it doubles on each failure.
    reconnect_min_s: float = 0.2
    # Longest wait between those reconnects or retries, in seconds.
    reconnect_max_s: float = 10.0

    @property
    def frontend_count(self) -> int:
        """Processes that accept on the port, the core included."""
        return auto_process_count(self.frontends)

    @property
    def cache_dir(self) -> Path:
        return Path(self.model_cache_dir or default_cache_dir())

    def validate(self) -> None:
        super().validate()
        if self.lm_compute_dtype not in COMPUTE_DTYPES:
            raise InvalidArgument(f"lm_compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                                  f"got {self.lm_compute_dtype!r}")
        if self.worker_mode not in WORKER_MODES:
            raise InvalidArgument(f"worker_mode must be one of {', '.join(WORKER_MODES)}, got {self.worker_mode!r}")
        if self.max_queue_size < 1:
            raise InvalidArgument("max_queue_size must be >= 1")
        if self.priority_levels < 1 or not 0 <= self.default_priority_level <= self.priority_levels:
            raise InvalidArgument("priority_levels must be >= 1 and default_priority_level in [0, priority_levels]")
        if self.torch_threads < 0:
            raise InvalidArgument("torch_threads must be >= 0")
        if not 0 <= self.frontends <= MAX_PROCESSES:
            raise InvalidArgument(f"frontends must be between 0 (one per available core) and {MAX_PROCESSES}")
        if self.follow_aliases and not self.registry_url:
            raise InvalidArgument("follow_aliases needs registry_url")
        if self.drain_timeout_s <= 0 or self.startup_timeout_s <= 0:
            raise InvalidArgument("drain_timeout_s and startup_timeout_s must be > 0")
        if self.worker_sandbox not in SANDBOX_MODES:
            raise InvalidArgument(
                f"worker_sandbox must be one of {', '.join(SANDBOX_MODES)}, got {self.worker_sandbox!r}")
        if self.worker_sandbox != "off":
            try:
                resolve_user(self.worker_user)
            except ValueError as exc:
                raise InvalidArgument(f"worker_user: {exc}") from None
        if self.worker_open_files < 32:
            raise InvalidArgument("worker_open_files must be >= 32")
        if self.worker_address_space_mb < 0 or self.batch_timeout_s < 0:
            raise InvalidArgument("worker_address_space_mb and batch_timeout_s must be >= 0 (0: no limit)")
