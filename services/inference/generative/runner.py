"""The model runner: one forward pass over a step's scheduled tokens, logits for the sampling rows.

It owns the model and the KV tensors and nothing of requests: it reads the scheduled sequences'
tokens, positions and block tables, packs them into one row, and returns the logits of each
chunk that reaches its sequence's last token (decodes and finished prefills), in schedule order.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from transformers import PreTrainedModel

from services.inference.generative.attention import (
    ATTENTION_NAME,
    LAYOUT_KWARG,
    DecodeBatch,
    PrefillChunk,
    StepLayout,
)
from services.inference.generative.kv_cache import PagedKVCache
from services.inference.generative.packing import TunedLinear, tune_linears
from services.inference.generative.scheduler import ScheduledSeq


class ModelRunner:
    def __init__(self, model: PreTrainedModel, cache: PagedKVCache, *, pack_weights: bool = False,
                 batch_hint: int = 16) -> None:
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model.eval()
        # Each linear shape's kernels timed here (plain, oneDNN-packed, GEMM on the transposed weight).
        self.linear_plans = tune_linears(model, batch_hint=batch_hint) if pack_weights else {}
        self.tuned_linears = sum(isinstance(m, TunedLinear) for m in model.modules())
        self.cache = cache
        self.block_size = cache.block_size
        self._arange = torch.arange(0)

    def _positions(self, n: int) -> torch.Tensor:
        if self._arange.numel() < n:
            self._arange = torch.arange(max(n, 2 * self._arange.numel()))
        return self._arange[:n]

    def _slots(self, table: list[int], length: int) -> torch.Tensor:
        """Cache slots of positions [0, length) of a sequence with block table `table`."""
        bs = self.block_size
        blocks = torch.tensor(table[: -(-length // bs)], dtype=torch.long)
        return (blocks[:, None] * bs + self._positions(bs)[None, :]).reshape(-1)[:length]

    def execute(self, decodes: Seq[ScheduledSeq], prefills: Seq[ScheduledSeq]) -> torch.Tensor:
        """Run the step (under inference mode); logits `[rows, vocab]` (float32) of the entries with `samples`."""
        token_ids: list[int] = []
        positions: list[int] = []
        for entry in (*decodes, *prefills):
            seq, start = entry.seq, entry.seq.num_computed
            stop = start + entry.num_tokens
            positions.extend(range(start, stop))
            prompt_len = len(seq.prompt_ids)
            if stop <= prompt_len:
                token_ids.extend(seq.prompt_ids[start:stop])
            else:
                token_ids.extend(seq.token_at(p) for p in range(start, stop))
        pos = torch.tensor(positions, dtype=torch.long)
        layout = self._layout(decodes, prefills, pos)
        keep = self._sampling_rows(decodes, prefills)
        output = self.model(
            input_ids=torch.tensor(token_ids, dtype=torch.long)[None],
            position_ids=pos[None],
            use_cache=False,
            logits_to_keep=keep,
            **{LAYOUT_KWARG: layout},
        )
        return output.logits[0].float()

    def _layout(self, decodes: Seq[ScheduledSeq], prefills: Seq[ScheduledSeq], pos: torch.Tensor) -> StepLayout:
        bs = self.block_size
        slot_mapping = torch.empty_like(pos)
        decode_batch = None
        if decodes:
            lengths = torch.tensor([e.seq.num_computed + 1 for e in decodes], dtype=torch.long)
            width = int(lengths.max())
            nblocks = -(-width // bs)
            tables = torch.zeros(len(decodes), nblocks, dtype=torch.long)
            for i, entry in enumerate(decodes):
                table = entry.seq.block_table[:nblocks]
                tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)
            slots = (tables[:, :, None] * bs + self._positions(bs)).reshape(len(decodes), -1)[:, :width]
            slot_mapping[: len(decodes)] = slots.gather(1, (lengths - 1)[:, None])[:, 0]
            mask = (self._positions(width)[None, :] < lengths[:, None])[:, None, None, :]
            decode_batch = DecodeBatch(len(decodes), slots.reshape(-1), mask)
        chunks = []
        offset = len(decodes)
        for entry in prefills:
            seq, n = entry.seq, entry.num_tokens
            start = seq.num_computed
            slots = self._slots(seq.block_table, start + n)
            slot_mapping[offset: offset + n] = slots[start:]
            if start == 0:
                chunks.append(PrefillChunk(offset, offset + n))
            else:
                mask = self._positions(start + n)[None, :] <= (start + self._positions(n))[:, None]
                chunks.append(PrefillChunk(offset, offset + n, slots, mask[None, None]))
            offset += n
        return StepLayout(cache=self.cache, slot_mapping=slot_mapping, decodes=decode_batch, prefills=tuple(chunks))

    @staticmethod
    def _sampling_rows(decodes: Seq[ScheduledSeq], prefills: Seq[ScheduledSeq]) -> torch.Tensor:
        rows = []
        offset = 0
        for entry in (*decodes, *prefills):
            offset += entry.num_tokens
            if entry.samples:
                rows.append(offset - 1)
        return torch.tensor(rows, dtype=torch.long)
