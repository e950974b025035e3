"""Iteration-level scheduling: which sequences run in the next forward pass, and with how many tokens.

Every step starts from the running sequences, oldest first: a decoding sequence gets its one
token, a sequence still prefilling gets a chunk of its prompt, all within a per-step token budget.
Then waiting requests are admitted, FIFO, while their whole prompt fits in the free KV blocks
(less a small watermark) and the budget lasts: a long prompt is prefilled in chunks across steps,
beside the decodes. When a running sequence needs a block and none is free, the newest running
sequence gives its blocks back and goes to the front of the queue; it is recomputed (prompt and
the tokens it already produced) when it is admitted again. Nothing here touches tensors.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import deque

from services.inference.generative.config import EngineConfig
from services.inference.generative.entities import SamplingParams
from services.inference.generative.kv_cache import BlockPool


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it: its tokens, how many are in the KV cache, its blocks."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    arrival_s: float
    deadline_s: float | None = None  # queue timeout; cleared once admitted
    output_ids: list[int] = dataclasses.field(default_factory=list)
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    status: SeqStatus = SeqStatus.WAITING
    admitted_s: float | None = None
    preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, position: int) -> int:
        prompt_len = len(self.prompt_ids)
        return self.prompt_ids[position] if position < prompt_len else self.output_ids[position - prompt_len]


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens to compute this step, from seq.num_computed on
    samples: bool  # the chunk reaches the last token: the step samples the next one


@dataclasses.dataclass
class SchedulerOutput:
    decodes: list[ScheduledSeq]
    prefills: list[ScheduledSeq]
    preempted: list[Sequence]
    timed_out: list[Sequence]

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        """Decodes first: the runner batches them together."""
        return self.decodes + self.prefills

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, pool: BlockPool, config: EngineConfig) -> None:
        self.pool = pool
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self._watermark = math.ceil(pool.num_blocks * config.watermark_fraction)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Take a request out, wherever it is, and free its blocks at once."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status = SeqStatus.FINISHED
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.finish(seq)
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.block_table)
        seq.status = SeqStatus.FINISHED

    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput(decodes=[], prefills=[], preempted=[], timed_out=self._expire(now))
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:  # a step that had to take blocks back admits nobody
            self._admit(out, budget, now)
        return out

    def _expire(self, now: float) -> list[Sequence]:
        expired = [s for s in self.waiting if s.deadline_s is not None and s.deadline_s <= now]
        for seq in expired:
            self.waiting.remove(seq)
            seq.status = SeqStatus.FINISHED
        return expired

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._make_room(seq, seq.num_computed + n, out):
                continue
            self.pool.grow(seq.block_table, seq.num_computed + n)
            budget -= n
            entry = ScheduledSeq(seq, n, samples=seq.num_computed + n == seq.num_tokens)
            (out.decodes if n == 1 and seq.num_computed > 0 else out.prefills).append(entry)
        return budget

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Preempt the newest running sequences until `seq` can hold `num_tokens`; False if `seq` went."""
        while not self.pool.can_grow(seq.block_table, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.block_table)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self, out: SchedulerOutput, budget: int, now: float) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            reserve = self._watermark if self.running else 0
            if not self.pool.can_grow(seq.block_table, seq.num_tokens, reserve=reserve):
                break  # FIFO: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.pool.grow(seq.block_table, seq.num_tokens)
            seq.status = SeqStatus.RUNNING
            seq.deadline_s = None
            if seq.admitted_s is None:
                seq.admitted_s = now
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            budget -= n
            out.prefills.append(ScheduledSeq(seq, n, samples=n == seq.num_tokens))
