"""DynamicBatcher: deterministic tests with a gated fake runner (no processes, no sleeps to sync)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import numpy as np
import pytest

from services.common.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from services.inference.batcher import (
    BatchExecution,
    BatchingConfig,
    BatchResult,
    DynamicBatcher,
    InferOutcome,
)

HUGE_US = 60_000_000  # a delay no test waits for: only a size trigger can dispatch


class GatedRunner:
    """Records each batch; holds it until `gate` is set. Output y = 2x + 1, z = row sums."""

    def __init__(self, *, gated: bool = False) -> None:
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.batches: list[dict[str, np.ndarray]] = []
        self.started = asyncio.Event()
        self.fail_with: BaseException | None = None

    async def __call__(self, inputs: dict[str, np.ndarray]) -> BatchResult:
        self.batches.append(inputs)
        self.started.set()
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        x = inputs["x"]
        return BatchResult(
            {"y": x * 2 + 1, "z": x.reshape(x.shape[0], -1).sum(axis=1)},
            compute_input_ns=1,
            compute_infer_ns=2,
            compute_output_ns=3,
        )

    @property
    def sizes(self) -> list[int]:
        return [b["x"].shape[0] for b in self.batches]


async def settle() -> None:
    """Let every ready callback and task run (the batcher never sleeps, so a few turns suffice)."""
    for _ in range(10):
        await asyncio.sleep(0)


def rows(n: int, seed: int, width: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)}


def start(batcher: DynamicBatcher, inputs: dict[str, np.ndarray], **kw: int) -> asyncio.Task[InferOutcome]:
    coro: Awaitable[InferOutcome] = batcher.submit(inputs, **kw)
    return asyncio.ensure_future(coro)


def check(outcome: InferOutcome, inputs: dict[str, np.ndarray]) -> None:
    x = inputs["x"]
    np.testing.assert_array_equal(outcome.outputs["y"], x * 2 + 1)
    np.testing.assert_allclose(outcome.outputs["z"], x.reshape(x.shape[0], -1).sum(axis=1), rtol=1e-6)


async def test_single_request_goes_straight_to_the_model() -> None:
    runner = GatedRunner()
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=8))
    inputs = rows(1, 0)
    outcome = await batcher.submit(inputs)
    check(outcome, inputs)
    assert runner.batches[0]["x"] is inputs["x"]  # no copy for a batch of one
    assert (outcome.batch_size, outcome.compute_infer_ns) == (1, 2)
    assert outcome.queue_ns >= 0


async def test_size_trigger_dispatches_at_max_batch_size() -> None:
    runner = GatedRunner()
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=4, max_queue_delay_us=HUGE_US, idle_dispatch=False))
    payloads = [rows(1, i) for i in range(4)]
    tasks = [start(batcher, p) for p in payloads[:3]]
    await settle()
    assert runner.batches == [] and batcher.queued == 3
    tasks.append(start(batcher, payloads[3]))
    outcomes = await asyncio.gather(*tasks)
    assert runner.sizes == [4]
    for outcome, payload in zip(outcomes, payloads, strict=True):
        check(outcome, payload)
        assert outcome.batch_size == 4


async def test_multi_row_requests_are_merged_and_split_exactly() -> None:
    runner = GatedRunner()
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=10, max_queue_delay_us=HUGE_US, idle_dispatch=False))
    payloads = [rows(n, 100 + n) for n in (3, 1, 4, 2)]
    outcomes = await asyncio.gather(*(batcher.submit(p) for p in payloads))
    assert runner.sizes == [10]
    for outcome, payload in zip(outcomes, payloads, strict=True):
        assert outcome.outputs["y"].shape == payload["x"].shape
        check(outcome, payload)


async def test_time_trigger_sends_a_partial_batch() -> None:
    runner = GatedRunner()
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=64, max_queue_delay_us=2_000, idle_dispatch=False))
    payloads = [rows(1, i) for i in range(3)]
    outcomes = await asyncio.wait_for(asyncio.gather(*(batcher.submit(p) for p in payloads)), 5)
    assert runner.sizes == [3]
    for outcome, payload in zip(outcomes, payloads, strict=True):
        check(outcome, payload)
        assert outcome.queue_ns >= 2_000_000 - 1_000_000  # waited for the delay (timer granularity ~1ms)


async def test_wait_starts_when_the_first_request_arrives() -> None:
    runner = GatedRunner()
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=64, max_queue_delay_us=500_000, idle_dispatch=False))
    first = start(batcher, rows(1, 1))
    await asyncio.sleep(0.2)
    second = start(batcher, rows(1, 2))
    a, b = await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert runner.sizes == [2]
    # Sent 0.5 s after the first arrived; had the second restarted the clock it would be >= 0.7 s.
    assert 450_000_000 <= a.queue_ns < 650_000_000
    assert a.queue_ns - b.queue_ns >= 150_000_000


async def test_no_delay_and_busy_slot_batches_whatever_queued_meanwhile() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=8))
    payloads = [rows(1, i) for i in range(6)]
    tasks = [start(batcher, payloads[0])]
    await settle()
    assert runner.sizes == [1] and batcher.in_flight == 1
    tasks += [start(batcher, p) for p in payloads[1:]]
    await settle()
    assert batcher.queued == 5 and runner.sizes == [1]  # one slot: the rest wait for it
    runner.gate.set()
    outcomes = await asyncio.gather(*tasks)
    assert runner.sizes == [1, 5]
    for outcome, payload in zip(outcomes, payloads, strict=True):
        check(outcome, payload)


async def test_idle_dispatch_sends_a_lone_request_at_once_and_waits_only_while_busy() -> None:
    """Idle dispatch (the default): an idle instance never waits out the queue delay for requests
    that may not come; while it is busy, requests gather, and the freed slot takes them all."""
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=8, max_queue_delay_us=HUGE_US))
    payloads = [rows(1, i) for i in range(6)]
    tasks = [start(batcher, payloads[0])]
    await settle()
    assert runner.sizes == [1] and batcher.queued == 0  # alone and idle: no wait for the delay
    tasks += [start(batcher, p) for p in payloads[1:]]
    await settle()
    assert runner.sizes == [1] and batcher.queued == 5  # busy: they wait together
    runner.gate.set()
    outcomes = await asyncio.gather(*tasks)
    assert runner.sizes == [1, 5]  # the freed slot took every queued request at once
    for outcome, payload in zip(outcomes, payloads, strict=True):
        check(outcome, payload)


async def test_strict_queue_delay_waits_even_when_idle() -> None:
    runner = GatedRunner()
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=8, max_queue_delay_us=30_000,
                                                    idle_dispatch=False))
    started = time.monotonic()
    await batcher.submit(rows(1, 0))
    assert time.monotonic() - started >= 0.025 and runner.sizes == [1]  # Triton's wait, by choice


def test_strict_queue_delay_travels_in_the_serving_config() -> None:
    from aiaas.serving import ServingConfig, from_pb, to_pb

    assert from_pb(to_pb(ServingConfig(max_batch_size=4, strict_queue_delay=True))).strict_queue_delay
    assert not from_pb(to_pb(ServingConfig(max_batch_size=4))).strict_queue_delay


async def test_preferred_batch_size_dispatches_without_waiting() -> None:
    runner = GatedRunner(gated=True)
    config = BatchingConfig(max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_us=HUGE_US, idle_dispatch=False)
    batcher = DynamicBatcher(runner, config)
    tasks = [start(batcher, rows(1, i)) for i in range(3)]
    await settle()
    assert runner.batches == []
    tasks.append(start(batcher, rows(1, 3)))
    await settle()
    assert runner.sizes == [4]
    runner.gate.set()
    await asyncio.gather(*tasks)


async def test_preferred_size_is_the_largest_prefix_that_matches() -> None:
    runner = GatedRunner(gated=True)
    config = BatchingConfig(max_batch_size=8, preferred_batch_sizes=(2, 4), max_queue_delay_us=HUGE_US, idle_dispatch=False)
    batcher = DynamicBatcher(runner, config)
    blocker = start(batcher, rows(2, 0))  # occupies the only slot
    await settle()
    assert runner.sizes == [2]
    payloads = [rows(n, 10 + i) for i, n in enumerate((1, 3, 1, 2))]  # prefixes 1, 4, 5, 7
    tasks = [start(batcher, p) for p in payloads]
    await settle()
    runner.gate.set()
    await blocker
    await settle()
    assert runner.sizes[:2] == [2, 4]
    # 3 rows remain: not preferred, not full, delay huge -> still queued
    assert batcher.queued == 2
    done = [t for t in tasks if t.done()]
    assert len(done) == 2
    for task, payload in zip(tasks[:2], payloads[:2], strict=True):
        check(task.result(), payload)
    await batcher.close()
    for task in tasks[2:]:
        with pytest.raises(Unavailable):
            await task


async def test_max_concurrent_batches_caps_running_batches() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=2, max_concurrent_batches=2))
    tasks = [start(batcher, rows(2, i)) for i in range(5)]
    await settle()
    assert runner.sizes == [2, 2] and batcher.queued == 3 and batcher.in_flight == 2
    runner.gate.set()
    await asyncio.gather(*tasks)
    assert runner.sizes == [2] * 5


async def test_cancelled_request_is_dropped_before_the_model_runs() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=8))
    first = start(batcher, rows(1, 0))
    await settle()
    keep = rows(1, 1)
    victim = start(batcher, {"x": np.full((1, 4), 99.0, dtype=np.float32)})
    other = start(batcher, keep)
    await settle()
    victim.cancel()
    await settle()
    assert batcher.queued == 1
    runner.gate.set()
    await first
    check(await other, keep)
    assert runner.sizes == [1, 1]
    assert not np.any(runner.batches[1]["x"] == 99.0)
    with pytest.raises(asyncio.CancelledError):
        await victim


async def test_cancelling_a_running_request_does_not_hurt_its_batch() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=4, max_queue_delay_us=HUGE_US, idle_dispatch=False))
    payloads = [rows(1, i) for i in range(4)]
    tasks = [start(batcher, p) for p in payloads]
    await settle()
    tasks[1].cancel()
    runner.gate.set()
    await settle()
    for i in (0, 2, 3):
        check(await tasks[i], payloads[i])
    assert batcher.in_flight == 0


async def test_queue_timeout_expires_waiting_request() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=4, default_timeout_us=5_000))
    blocker = start(batcher, rows(1, 0))
    await settle()
    waiting = start(batcher, rows(1, 1))
    with pytest.raises(DeadlineExceeded, match="timeout expired"):
        await asyncio.wait_for(waiting, 5)
    assert batcher.queued == 0
    runner.gate.set()
    await blocker
    assert runner.sizes == [1]  # the expired request never reached the model


async def test_per_request_timeout_and_default() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=4, default_timeout_us=HUGE_US))
    blocker = start(batcher, rows(1, 0))
    await settle()
    short = start(batcher, rows(1, 1), timeout_us=3_000)
    long = start(batcher, rows(1, 2))
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(short, 5)
    assert not long.done()
    runner.gate.set()
    await blocker
    await long
    assert runner.sizes == [1, 1]


async def test_full_queue_rejects_at_once() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=1, max_queue_size=2))
    tasks = [start(batcher, rows(1, i)) for i in range(3)]  # 1 running, 2 queued
    await settle()
    with pytest.raises(ResourceExhausted, match="maximum queue size of 2"):
        await batcher.submit(rows(1, 9))
    runner.gate.set()
    await asyncio.gather(*tasks)


async def test_priorities_batch_higher_levels_first() -> None:
    runner = GatedRunner(gated=True)
    config = BatchingConfig(max_batch_size=2, priority_levels=3, default_priority_level=2)
    batcher = DynamicBatcher(runner, config)
    blocker = start(batcher, rows(2, 0))
    await settle()
    low = start(batcher, {"x": np.full((1, 4), 3.0, dtype=np.float32)}, priority=3)
    default = start(batcher, {"x": np.full((1, 4), 2.0, dtype=np.float32)})  # 0 -> level 2
    high = start(batcher, {"x": np.full((1, 4), 1.0, dtype=np.float32)}, priority=1)
    above = start(batcher, {"x": np.full((1, 4), 2.5, dtype=np.float32)}, priority=7)  # -> level 2
    await settle()
    runner.gate.set()
    await asyncio.gather(blocker, low, default, high, above)
    firsts = [b["x"][:, 0].tolist() for b in runner.batches[1:]]
    assert firsts == [[1.0, 2.0], [2.5, 3.0]]


async def test_incompatible_shapes_are_never_concatenated() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=8))
    blocker = start(batcher, rows(1, 0, width=4))
    await settle()
    payloads = [rows(1, 1, width=4), rows(2, 2, width=6), rows(1, 3, width=4), rows(1, 4, width=6)]
    tasks = [start(batcher, p) for p in payloads]
    await settle()
    runner.gate.set()
    outcomes = await asyncio.gather(blocker, *tasks)
    assert sorted(b["x"].shape for b in runner.batches) == [(1, 4), (2, 4), (3, 6)]
    for outcome, payload in zip(outcomes[1:], payloads, strict=True):
        check(outcome, payload)


async def test_random_payloads_under_load_never_mix_up_responses() -> None:
    rng = np.random.default_rng(42)
    runner = GatedRunner()

    async def jittery(inputs: dict[str, np.ndarray]) -> BatchResult:
        for _ in range(int(rng.integers(0, 3))):
            await asyncio.sleep(0)
        return await runner(inputs)

    config = BatchingConfig(
        max_batch_size=16, preferred_batch_sizes=(8,), max_queue_delay_us=500, max_concurrent_batches=3
    )
    batcher = DynamicBatcher(jittery, config)
    payloads = [rows(int(rng.integers(1, 5)), 1000 + i, width=int(rng.choice([3, 5]))) for i in range(300)]
    outcomes = await asyncio.wait_for(asyncio.gather(*(batcher.submit(p) for p in payloads)), 30)
    for outcome, payload in zip(outcomes, payloads, strict=True):
        check(outcome, payload)
    assert max(runner.sizes) > 1 and max(runner.sizes) <= 16


async def test_invalid_requests() -> None:
    batcher = DynamicBatcher(GatedRunner(), BatchingConfig(max_batch_size=4))
    with pytest.raises(InvalidArgument, match="batch-size must be <= 4"):
        await batcher.submit(rows(5, 0))
    with pytest.raises(InvalidArgument, match="disagree on the batch dimension"):
        await batcher.submit({"x": np.zeros((2, 4), np.float32), "w": np.zeros((3,), np.float32)})
    with pytest.raises(InvalidArgument, match="no batch dimension"):
        await batcher.submit({"x": np.zeros((), np.float32)})
    with pytest.raises(InvalidArgument, match=">= 1"):
        await batcher.submit({"x": np.zeros((0, 4), np.float32)})
    with pytest.raises(InvalidArgument, match="priority"):
        await batcher.submit(rows(1, 0), priority=-1)
    with pytest.raises(InvalidArgument, match="timeout"):
        await batcher.submit(rows(1, 0), timeout_us=-5)
    assert batcher.queued == 0
    with pytest.raises(InvalidArgument):
        BatchingConfig(max_batch_size=4, preferred_batch_sizes=(8,))
    with pytest.raises(InvalidArgument):
        BatchingConfig(max_batch_size=4, priority_levels=2, default_priority_level=3)


async def test_without_batching_each_request_runs_alone() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=0, max_concurrent_batches=1))
    payloads = [rows(3, 1), rows(2, 2)]
    tasks = [start(batcher, p) for p in payloads]
    await settle()
    assert runner.sizes == [3]
    runner.gate.set()
    outcomes = await asyncio.gather(*tasks)
    assert runner.sizes == [3, 2]
    for outcome, payload in zip(outcomes, payloads, strict=True):
        check(outcome, payload)
        assert outcome.batch_size == 1


async def test_runner_errors_reach_every_request_of_the_batch() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=4, max_queue_delay_us=HUGE_US, idle_dispatch=False))
    tasks = [start(batcher, rows(1, i)) for i in range(4)]
    await settle()
    runner.fail_with = Unavailable("model worker for m crashed (exit code -9); retry")
    runner.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    runner.fail_with = ValueError("boom")
    tasks = [start(batcher, rows(1, i)) for i in range(4)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, Internal) and "boom" in r.message for r in results)
    runner.fail_with = None
    check(await batcher.submit(rows(4, 1)), rows(4, 1))  # still serving


async def test_wrong_output_rows_are_internal() -> None:
    async def short(inputs: dict[str, np.ndarray]) -> BatchResult:
        return BatchResult({"y": inputs["x"][:1]})

    batcher = DynamicBatcher(short, BatchingConfig(max_batch_size=4, max_queue_delay_us=HUGE_US, idle_dispatch=False))
    results = await asyncio.gather(*(batcher.submit(rows(2, i)) for i in range(2)), return_exceptions=True)
    assert all(isinstance(r, Internal) and "4 rows" in r.message for r in results)


async def test_on_batch_reports_each_execution() -> None:
    seen: list[BatchExecution] = []
    config = BatchingConfig(max_batch_size=4, max_queue_delay_us=HUGE_US, idle_dispatch=False)
    batcher = DynamicBatcher(GatedRunner(), config, seen.append)
    await asyncio.gather(*(batcher.submit(rows(n, n)) for n in (1, 3)))
    assert seen == [BatchExecution(4, 2, 1, 2, 3)]


async def test_drain_finishes_queued_work_then_refuses() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=2))
    tasks = [start(batcher, rows(1, i)) for i in range(3)]
    await settle()
    drain = asyncio.ensure_future(batcher.drain())
    await settle()
    assert not drain.done()
    with pytest.raises(Unavailable, match="draining"):
        await batcher.submit(rows(1, 9))
    runner.gate.set()
    await asyncio.wait_for(drain, 5)
    assert all(t.done() and not t.exception() for t in tasks)
    assert batcher.queued == 0 and batcher.in_flight == 0


async def test_close_fails_queued_requests_and_cancels_stuck_batches() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=1))
    running = start(batcher, rows(1, 0))
    queued = start(batcher, rows(1, 1))
    await settle()
    await batcher.close(grace_s=0.01)
    for task in (running, queued):
        with pytest.raises(Unavailable):
            await task
    with pytest.raises(Unavailable, match="closing"):
        await batcher.submit(rows(1, 2))


async def test_caller_cancelled_while_its_own_batch_runs_inline() -> None:
    runner = GatedRunner(gated=True)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=4))
    alone = start(batcher, rows(1, 0))  # idle batcher: the caller runs its batch itself
    await settle()
    assert runner.sizes == [1] and batcher.in_flight == 1
    queued = start(batcher, rows(1, 1))
    await settle()
    alone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await alone
    await settle()
    runner.gate.set()
    check(await queued, rows(1, 1))
    assert batcher.in_flight == 0 and batcher.queued == 0



class StepRunner(GatedRunner):
    """Holds each batch until the test releases it (one future per batch); records the order."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events
        self.releases: list[asyncio.Future[None]] = []

    async def __call__(self, inputs: dict[str, np.ndarray]) -> BatchResult:
        self.events.append(f"batch {inputs['x'].shape[0]}")
        release = asyncio.get_running_loop().create_future()
        self.releases.append(release)
        await release
        return await super().__call__(inputs)


@pytest.mark.parametrize("first", ["inline", "launched"])
async def test_next_batch_starts_before_the_finished_batch_is_answered(first: str) -> None:
    """The instance is handed its next batch before the callers of the one it finished resume,
    so it computes while their responses are built (no idle gap per batch under load). Checked
    for a batch run in its caller's own task (a lone request on an idle instance) and for one
    launched as a task (what queued while the instance was busy)."""
    events: list[str] = []
    runner = StepRunner(events)
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=8))

    async def caller(inputs: dict[str, np.ndarray], label: str) -> None:
        check(await batcher.submit(inputs), inputs)
        events.append(label)

    tasks = [asyncio.ensure_future(caller(rows(1, 0), "answered 0"))]
    await settle()
    tasks += [asyncio.ensure_future(caller(rows(1, i), f"answered {i}")) for i in (1, 2, 3)]
    await settle()
    assert events == ["batch 1"] and batcher.queued == 3
    if first == "launched":
        runner.releases[0].set_result(None)  # the lone batch ends; the three go as one task
        await settle()
        assert events[:3] == ["batch 1", "batch 3", "answered 0"], events
        tasks += [asyncio.ensure_future(caller(rows(1, i), f"answered {i}")) for i in (4, 5)]
        await settle()
        assert batcher.queued == 2
        events.clear()
        runner.releases[1].set_result(None)
        await settle()
        assert events[:3] == ["batch 2", "answered 1", "answered 2"], events
        runner.releases[2].set_result(None)
    else:
        runner.releases[0].set_result(None)
        await settle()
        assert events[:2] == ["batch 1", "batch 3"], events
        runner.releases[1].set_result(None)
    await asyncio.gather(*tasks)
    assert runner.sizes == ([1, 3, 2] if first == "launched" else [1, 3])
