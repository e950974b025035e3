"""The executor of a locally served version: one DynamicBatcher in front of one worker pool.

Built from the version's ServingConfig: instance_count worker processes (or threads) on its
device, batches up to max_batch_size, preferred sizes, queue delay, queue size and timeout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from services.inference.batcher import BatchExecution, BatchingConfig, DynamicBatcher, InferOutcome
from services.inference.core import LoadedVersion
from services.inference.entities import VersionSpec
from services.inference.sandbox import SandboxPolicy, resolve_user
from services.inference.settings import InferenceSettings

log = logging.getLogger("aiaas.inference.executors")


def batching_config(spec: VersionSpec, settings: InferenceSettings) -> BatchingConfig:
    serving = spec.serving
    return BatchingConfig(
        max_batch_size=max(0, serving.max_batch_size),
        preferred_batch_sizes=tuple(sorted(set(serving.preferred_batch_sizes))),
        max_queue_delay_us=max(0, serving.max_queue_delay_us),
        max_queue_size=serving.max_queue_size or settings.max_queue_size,
        default_timeout_us=max(0, serving.default_timeout_us),
        priority_levels=settings.priority_levels,
        default_priority_level=settings.default_priority_level or settings.priority_levels,
        # One batch per instance at a time keeps every worker busy without over-queueing them.
        max_concurrent_batches=max(1, serving.instance_count),
        idle_dispatch=not serving.strict_queue_delay,
    )


def sandbox_policy(settings: InferenceSettings) -> SandboxPolicy:
    """The confinement of this service's model workers (the pool adds the artifact and device)."""
    uid, gid = resolve_user(settings.worker_user) if settings.worker_sandbox != "off" else (65534, 65534)
    return SandboxPolicy(mode=settings.worker_sandbox, uid=uid, gid=gid, open_files=settings.worker_open_files,
                         address_space_bytes=settings.worker_address_space_mb * 2**20)  # fmt: skip


def warmup_sizes(spec: VersionSpec) -> tuple[int, ...]:
    """A batch at each preferred size; without preferred sizes, 1 and the largest batch."""
    serving = spec.serving
    if serving.max_batch_size <= 0:
        return (1,)
    sizes = serving.preferred_batch_sizes or (1, serving.max_batch_size)
    return tuple(sorted({s for s in sizes if 1 <= s <= serving.max_batch_size}))


class BatchedExecutor:
    """`DynamicBatcher` + `WorkerPool` (or the in-process runner) for one version."""

    def __init__(self, spec: VersionSpec, artifact_path: Path, settings: InferenceSettings,
                 lv: LoadedVersion) -> None:
        self.spec = spec
        self._lv = lv
        self._config = batching_config(spec, settings)
        serving = spec.serving
        from services.inference import workers

        model: workers.ModelArgs = {
            "artifact_path": str(artifact_path),
            "format": spec.format,
            "inputs": spec.inputs,
            "outputs": spec.outputs,
            "device": serving.device or settings.device,
            "instance_count": max(1, serving.instance_count),
            "max_batch_size": max(0, serving.max_batch_size),
            "torch_threads": settings.torch_threads or None,
            "name": f"{spec.model}/{spec.version}",
        }
        if settings.worker_mode == "process":
            self.pool: workers.WorkerPool | workers.InProcessRunner = workers.WorkerPool(
                **model, sandbox=sandbox_policy(settings), batch_timeout_s=settings.batch_timeout_s)
        else:  # threads share the service's process: no sandbox and no batch watchdog
            self.pool = workers.InProcessRunner(**model)
        self.batcher: DynamicBatcher | None = None

    async def start(self) -> None:
        await self.pool.start()
        try:
            await self.pool.warmup(list(warmup_sizes(self.spec)))
        except BaseException:
            await self.pool.close()
            raise
        self.batcher = DynamicBatcher(self.pool.run_batch, self._config, self._on_batch,
                                      name=f"{self.spec.model}/{self.spec.version}")

    def _on_batch(self, execution: BatchExecution) -> None:
        self._lv.stats.record_execution(execution.batch_size, execution.compute_input_ns,
                                        execution.compute_infer_ns, execution.compute_output_ns)

    async def infer(self, inputs: dict[str, np.ndarray], *, priority: int, timeout_us: int | None) -> InferOutcome:
        batcher = self.batcher
        if batcher is None:
            from services.common.errors import Unavailable

            raise Unavailable(f"model '{self.spec.model}' version {self.spec.version} is not started")
        return await batcher.submit(inputs, priority=priority, timeout_us=timeout_us)

    @property
    def pids(self) -> list[int]:
        return list(getattr(self.pool, "pids", []) or [])

    async def drain(self) -> None:
        if self.batcher is not None:
            await self.batcher.drain()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close(grace_s=5.0)
        await self.pool.close()
