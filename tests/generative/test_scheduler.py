"""The scheduler on its own (no model): token budget, chunking, FIFO admission by KV blocks, preemption."""

from __future__ import annotations

import pytest

from aiaas.errors import Internal
from services.inference.generative import EngineConfig, SamplingParams
from services.inference.generative.kv_cache import BlockPool
from services.inference.generative.scheduler import Scheduler, SeqStatus, Sequence


def _seq(name: str, prompt_len: int, *, deadline: float | None = None) -> Sequence:
    return Sequence(request_id=name, prompt_ids=list(range(4, 4 + prompt_len)), params=SamplingParams(),
                    max_tokens=100, arrival_s=0.0, deadline_s=deadline)


def _scheduler(blocks: int, **config: float) -> Scheduler:
    return Scheduler(BlockPool(blocks, 4), EngineConfig(block_size=4, kv_cache_tokens=4 * blocks, **config))  # type: ignore[arg-type]


def _run(sched: Scheduler, now: float = 0.0, sample: int = 7) -> list[tuple[str, int]]:
    """One step as the engine does it: compute the scheduled tokens, append a token where it samples."""
    out = sched.schedule(now)
    for entry in out.scheduled:
        entry.seq.num_computed += entry.num_tokens
        if entry.samples:
            entry.seq.output_ids.append(sample)
    return [(e.seq.request_id, e.num_tokens) for e in out.scheduled]


def test_long_prompts_are_chunked_within_the_token_budget_beside_decodes() -> None:
    sched = _scheduler(64, max_num_batched_tokens=10)
    sched.add(_seq("a", 3))
    assert _run(sched) == [("a", 3)]
    sched.add(_seq("long", 25))
    assert _run(sched) == [("a", 1), ("long", 9)]  # the decode first, then what is left of the budget
    assert _run(sched) == [("a", 1), ("long", 9)]
    assert _run(sched) == [("a", 1), ("long", 7)]  # the last chunk samples the first token
    assert _run(sched) == [("a", 1), ("long", 1)]


def test_admission_is_fifo_and_bounded_by_free_blocks() -> None:
    sched = _scheduler(8, watermark_fraction=0.0)
    sched.add(_seq("a", 16))  # 4 blocks
    sched.add(_seq("big", 17))  # 5 blocks: does not fit beside a
    sched.add(_seq("small", 2))  # would fit, but does not overtake big
    assert _run(sched) == [("a", 16)]
    assert [s.request_id for s in sched.waiting] == ["big", "small"]
    sched.finish(sched.running[0])
    assert _run(sched) == [("big", 17), ("small", 2)]
    assert sched.pool.num_used == 5 + 1


def test_the_watermark_is_kept_only_while_something_runs() -> None:
    sched = _scheduler(10, watermark_fraction=0.2)  # 2 blocks kept back
    sched.add(_seq("a", 20))  # 5 blocks
    sched.add(_seq("b", 13))  # 4 blocks: 5 + 4 leaves 1 < 2 free
    assert _run(sched) == [("a", 20)]
    sched.finish(sched.running[0])
    sched.add(_seq("c", 40))  # all 10 blocks, admitted because nothing runs... after b
    assert _run(sched) == [("b", 13)]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_the_newest_sequence_is_preempted_and_recomputed_first() -> None:
    sched = _scheduler(4, watermark_fraction=0.0)
    for name in ("old", "mid", "new"):
        sched.add(_seq(name, 4))  # one full block each
    assert _run(sched) == [("old", 4), ("mid", 4), ("new", 4)]
    # Each now needs a second block; one is free: old takes it, mid needs one more and new goes.
    out = sched.schedule(0.0)
    assert [e.seq.request_id for e in out.scheduled] == ["old", "mid"]
    assert [s.request_id for s in out.preempted] == ["new"]
    new = sched.waiting[0]
    assert (new.status, new.num_computed, new.block_table, new.preemptions) == (SeqStatus.WAITING, 0, [], 1)
    assert new.num_tokens == 5  # its prompt and the token it produced are computed again when it returns
    assert out.prefills == [] and sched.pool.num_free == 0  # no admission in a step that preempted


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_the_newest() -> None:
    sched = _scheduler(2, watermark_fraction=0.0)
    sched.add(_seq("a", 4))
    sched.add(_seq("b", 4))
    _run(sched)
    sched.running.reverse()  # make a the newest
    out = sched.schedule(0.0)
    assert [e.seq.request_id for e in out.scheduled] == ["b"] and [s.request_id for s in out.preempted] == ["a"]


def test_only_queued_requests_expire() -> None:
    sched = _scheduler(4, max_num_seqs=1)
    sched.add(_seq("running", 2, deadline=5.0))
    sched.add(_seq("queued", 2, deadline=5.0))
    _run(sched, now=1.0)
    out = sched.schedule(6.0)
    assert [s.request_id for s in out.timed_out] == ["queued"]
    assert [e.seq.request_id for e in out.scheduled] == ["running"]


def test_abort_frees_blocks_at_once() -> None:
    sched = _scheduler(4)
    sched.add(_seq("a", 8))
    sched.add(_seq("b", 30))
    _run(sched)
    assert sched.pool.num_used == 2
    assert sched.abort("a") is not None and sched.pool.num_used == 0
    assert sched.abort("b") is not None and not sched.has_work
    assert sched.abort("nobody") is None


def test_the_pool_refuses_to_hand_out_more_than_it_has() -> None:
    pool = BlockPool(2, 4)
    table: list[int] = []
    pool.grow(table, 8)
    with pytest.raises(Internal):
        pool.grow(table, 9)
    pool.release(table)
    assert pool.num_free == 2 and table == []
