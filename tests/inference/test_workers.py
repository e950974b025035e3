"""WorkerPool with real worker processes (shared memory, crashes, restarts) and InProcessRunner."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable
from services.inference.batcher import BatchingConfig, DynamicBatcher
from services.inference.workers import InProcessRunner, WorkerPool
from tests.inference.models import (
    Artifact,
    random_array,
    write_fails_on_negative,
    write_identity,
    write_identity_many,
    write_mlp,
)

ALL_FIXED = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BF16"]  # fmt: skip


def existing(names: list[str] | set[str]) -> set[str]:
    """Which of these shared-memory segments still exist (other tests may own other segments)."""
    return {name for name in names if os.path.exists(f"/dev/shm/{name}")}


def pool_for(artifact: Artifact, **kw: object) -> WorkerPool:
    options: dict = {"max_batch_size": 16, "name": Path(artifact.path).stem} | kw
    return WorkerPool(
        artifact_path=artifact.path,
        format=artifact.format,
        inputs=artifact.inputs,
        outputs=artifact.outputs,
        **options,
    )


@pytest.fixture
async def started() -> AsyncIterator[list[WorkerPool]]:
    """Pools a test starts; closed even when the test fails."""
    pools: list[WorkerPool] = []
    yield pools
    for pool in pools:
        await pool.close()


async def start(pools: list[WorkerPool], pool: WorkerPool) -> WorkerPool:
    pools.append(pool)
    await pool.start()
    return pool


async def wait_alive(pool: WorkerPool, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while pool.alive_instances < count:
        assert time.monotonic() < deadline, "worker did not come back"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("format", ["torchscript", "torch_export", "onnx"])
async def test_each_format_runs_in_a_worker(tmp_path: Path, started: list[WorkerPool], format: str) -> None:
    artifact = write_mlp(tmp_path, format)
    pool = await start(started, pool_for(artifact))
    assert pool.alive_instances == 1 and pool.pids[0] != os.getpid()
    segments = pool.shared_memory_names
    assert len(segments) == 2 and existing(segments) == set(segments)  # one input and one output slab
    x = {"input": np.random.default_rng(1).standard_normal((5, 10)).astype(np.float32)}
    result = await pool.run_batch(x)
    np.testing.assert_allclose(result.outputs["output"], artifact.expected(x)["output"], rtol=1e-5, atol=1e-6)
    assert result.compute_infer_ns > 0 and result.compute_input_ns > 0 and result.compute_output_ns > 0
    pid = pool.pids[0]
    await pool.close()
    assert pool.alive_instances == 0
    assert not existing(segments)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_every_fixed_datatype_round_trips_through_shared_memory(
    tmp_path: Path, started: list[WorkerPool]
) -> None:
    artifact = write_identity_many(tmp_path, ALL_FIXED)
    pool = await start(started, pool_for(artifact))
    rng = np.random.default_rng(5)
    inputs = {f"IN_{d}": random_array(d, (3, 7), rng) for d in ALL_FIXED}
    outputs = (await pool.run_batch(inputs)).outputs
    for d in ALL_FIXED:
        out = outputs[f"OUT_{d}"]
        assert out.dtype == inputs[f"IN_{d}"].dtype, d
        np.testing.assert_array_equal(out, inputs[f"IN_{d}"], err_msg=d)


async def test_bytes_tensors_cross_as_length_prefixed_buffers(
    tmp_path: Path, started: list[WorkerPool]
) -> None:
    artifact = write_identity(tmp_path, "onnx", "BYTES")
    pool = await start(started, pool_for(artifact))
    rng = np.random.default_rng(9)
    for shape in [(2, 3), (1, 1), (4, 50)]:
        x = random_array("BYTES", shape, rng)
        out = (await pool.run_batch({"INPUT0": x})).outputs["OUTPUT0"]
        assert out.dtype == object and out.shape == shape and out.tolist() == x.tolist()


async def test_slabs_grow_for_big_variable_tensors(tmp_path: Path, started: list[WorkerPool]) -> None:
    artifact = write_identity(tmp_path, "torchscript", "FP32")
    pool = await start(started, pool_for(artifact, max_batch_size=4))
    seen = set(pool.shared_memory_names)
    rng = np.random.default_rng(2)
    for width in (8, 300_000, 5, 700_000, 3):  # 1.2 MB and 2.8 MB per row, far over the first slab
        x = rng.standard_normal((2, width)).astype(np.float32)
        out = (await pool.run_batch({"INPUT0": x})).outputs["OUTPUT0"]
        np.testing.assert_array_equal(out, x)
        seen |= set(pool.shared_memory_names)
    current = set(pool.shared_memory_names)
    assert len(seen) > len(current)  # both slabs grew
    assert existing(seen) == current  # and the ones they replaced are gone
    await pool.close()
    assert not existing(seen)


async def test_model_error_is_internal_and_the_worker_survives(
    tmp_path: Path, started: list[WorkerPool]
) -> None:
    pool = await start(started, pool_for(write_fails_on_negative(tmp_path)))
    pid = pool.pids[0]
    with pytest.raises(Internal, match="negative input rejected by model"):
        await pool.run_batch({"x": -np.ones((2, 3), np.float32)})
    out = (await pool.run_batch({"x": np.ones((2, 3), np.float32)})).outputs["y"]
    np.testing.assert_array_equal(out, 2 * np.ones((2, 3), np.float32))
    assert pool.pids == [pid]


async def test_killed_worker_fails_its_batch_unavailable_then_restarts(
    tmp_path: Path, started: list[WorkerPool]
) -> None:
    artifact = write_mlp(tmp_path, "torchscript")
    pool = await start(started, pool_for(artifact))
    pid = pool.pids[0]
    x = {"input": np.ones((3, 10), np.float32)}
    os.kill(pid, signal.SIGSTOP)  # the batch is surely in flight when the kill lands
    batch = asyncio.ensure_future(pool.run_batch(x))
    await asyncio.sleep(0.05)
    assert not batch.done()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(Unavailable, match=r"crashed \(exit code -9\); retry"):
        await asyncio.wait_for(batch, 30)
    await wait_alive(pool, 1)
    assert pool.pids != [pid]
    out = (await pool.run_batch(x)).outputs["output"]
    np.testing.assert_allclose(out, artifact.expected(x)["output"], rtol=1e-5)


async def test_idle_worker_crash_is_noticed_and_repaired(tmp_path: Path, started: list[WorkerPool]) -> None:
    pool = await start(started, pool_for(write_mlp(tmp_path, "onnx"), instance_count=2))
    assert len(set(pool.pids)) == 2
    victim = pool.pids[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim in pool.pids or pool.alive_instances < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    # Both instances serve again; two batches at once land on two processes.
    x = {"input": np.ones((1, 10), np.float32)}
    await asyncio.gather(pool.run_batch(x), pool.run_batch(x))


async def test_cancelled_batch_returns_its_worker_when_the_answer_arrives(
    tmp_path: Path, started: list[WorkerPool]
) -> None:
    pool = await start(started, pool_for(write_mlp(tmp_path, "torchscript")))
    pid = pool.pids[0]
    x = {"input": np.ones((1, 10), np.float32)}
    os.kill(pid, signal.SIGSTOP)
    batch = asyncio.ensure_future(pool.run_batch(x))
    await asyncio.sleep(0.05)
    batch.cancel()
    follower = asyncio.ensure_future(pool.run_batch(x))  # waits for the only worker
    await asyncio.sleep(0.05)
    assert not follower.done()
    os.kill(pid, signal.SIGCONT)
    await asyncio.wait_for(follower, 30)
    assert pool.pids == [pid]


async def test_load_failures_carry_the_loader_message(tmp_path: Path) -> None:
    artifact = write_mlp(tmp_path, "torchscript")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not torchscript")
    bad = WorkerPool(artifact_path=str(garbage), format="torchscript", inputs=artifact.inputs,
                     outputs=artifact.outputs, instance_count=2)  # fmt: skip
    with pytest.raises(InvalidArgument, match="cannot load torchscript artifact"):
        await bad.start()
    missing = WorkerPool(artifact_path=str(tmp_path / "nope.pt"), format="torchscript",
                         inputs=artifact.inputs, outputs=artifact.outputs)  # fmt: skip
    with pytest.raises(FailedPrecondition, match="does not exist"):
        await missing.start()
    assert bad.alive_instances == 0 and len(bad.shared_memory_names) == 4
    assert not existing(bad.shared_memory_names + missing.shared_memory_names)


@pytest.mark.parametrize("format", ["torchscript", "torch_export"])
async def test_cuda_placement(tmp_path: Path, started: list[WorkerPool], format: str) -> None:
    """On a GPU node the batch runs on cuda:0; elsewhere asking for it fails clearly at start."""
    import torch

    artifact = write_mlp(tmp_path, format)
    pool = pool_for(artifact, device="cuda:0")
    if not torch.cuda.is_available():
        with pytest.raises(FailedPrecondition, match="CUDA is not available"):
            await pool.start()
        return
    await start(started, pool)
    x = {"input": np.random.default_rng(3).standard_normal((6, 10)).astype(np.float32)}
    out = (await pool.run_batch(x)).outputs["output"]
    np.testing.assert_allclose(out, artifact.expected(x)["output"], rtol=1e-3, atol=1e-4)


async def test_warmup_runs_every_size_on_every_instance(tmp_path: Path, started: list[WorkerPool]) -> None:
    artifact = write_identity(tmp_path, "onnx", "BYTES", shape=(-1, -1))
    pool = await start(started, pool_for(artifact, instance_count=2))
    await pool.warmup([1, 4, 16])
    assert pool.alive_instances == 2


async def test_batcher_over_workers_splits_random_payloads_exactly(
    tmp_path: Path, started: list[WorkerPool]
) -> None:
    artifact = write_mlp(tmp_path, "torch_export")
    pool = await start(started, pool_for(artifact, max_batch_size=32, instance_count=2))
    config = BatchingConfig(max_batch_size=32, max_queue_delay_us=1000, max_concurrent_batches=2)
    batcher = DynamicBatcher(pool.run_batch, config)
    rng = np.random.default_rng(11)
    sizes = rng.integers(1, 6, size=200)
    payloads = [{"input": rng.standard_normal((int(n), 10)).astype(np.float32)} for n in sizes]
    outcomes = await asyncio.gather(*(batcher.submit(p) for p in payloads))
    for outcome, payload in zip(outcomes, payloads, strict=True):
        expected = artifact.expected(payload)["output"]
        np.testing.assert_allclose(outcome.outputs["output"], expected, rtol=1e-4, atol=1e-5)
    assert max(o.batch_size for o in outcomes) > 5
    await batcher.close()


async def test_in_process_runner_has_the_same_interface(tmp_path: Path) -> None:
    artifact = write_mlp(tmp_path, "onnx")
    runner = InProcessRunner(artifact_path=artifact.path, format="onnx", inputs=artifact.inputs,
                             outputs=artifact.outputs, instance_count=2, max_batch_size=8)  # fmt: skip
    await runner.start()
    assert runner.alive_instances == 2 and runner.pids == [os.getpid()]
    await runner.warmup([1, 8])
    x = {"input": np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)}
    result = await runner.run_batch(x)
    np.testing.assert_allclose(result.outputs["output"], artifact.expected(x)["output"], rtol=1e-5, atol=1e-6)
    await runner.close()
    with pytest.raises(Unavailable):
        await runner.run_batch(x)
