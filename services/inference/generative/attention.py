"""Attention over the paged KV cache, plugged into a transformers model through `AttentionInterface`.

The runner packs every scheduled token of a step into one row (`[1, N]`: the decoding sequences'
tokens first, then the prefill chunks), so the model's projections and MLPs see no padding. Per
layer, this function writes the step's new keys and values into the cache slots of their
sequences, then attends: all decodes together in one batched call (each query against its own
context, gathered through its block table, padding masked), each prefill chunk in its own call
(causal; a chunk with cached context before it reads that context from the cache too).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from services.inference.generative.kv_cache import PagedKVCache

ATTENTION_NAME = "aiaas_paged"
LAYOUT_KWARG = "aiaas_step_layout"


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    start: int  # the chunk's tokens in the packed row: [start, end)
    end: int
    # Cache slots of the whole context (earlier tokens and this chunk), with the causal mask over
    # them; None when the chunk starts the sequence, so its own keys are the whole context.
    context_slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # [1, 1, n, context] bool, True = attend


@dataclasses.dataclass(frozen=True)
class DecodeBatch:
    count: int  # the first `count` tokens of the row are one decoding sequence each
    slots: torch.Tensor  # [count * L]: each one's context slots, padded to L
    mask: torch.Tensor  # [count, 1, 1, L] bool, True = attend


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """Where a step's tokens sit in the packed row and in the cache."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [N]: the cache slot of each new token
    decodes: DecodeBatch | None
    prefills: tuple[PrefillChunk, ...]


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query `[1, H, N, D]`, key and value `[1, KVH, N, D]` -> output `[1, N, H, D]`."""
    layout: StepLayout | None = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        raise RuntimeError(f"the {ATTENTION_NAME} attention runs only inside the generative engine's steps")
    layer: int = module.layer_idx  # type: ignore[assignment]
    keys, values = layout.cache.keys[layer], layout.cache.values[layer]
    keys.index_copy_(0, layout.slot_mapping, key[0].transpose(0, 1))
    values.index_copy_(0, layout.slot_mapping, value[0].transpose(0, 1))

    _, heads, n, head_dim = query.shape
    kv_heads = key.shape[1]
    out = query.new_empty(1, n, heads, head_dim)
    decodes = layout.decodes
    if decodes is not None:
        b = decodes.count
        # GQA packed into the query length: [B, KVH, groups, D] against [B, KVH, L, D].
        q = query[0, :, :b].transpose(0, 1).reshape(b, kv_heads, heads // kv_heads, head_dim)
        width = decodes.slots.numel() // b
        # index_select, not advanced indexing: an order of magnitude faster on CPU.
        k = keys.index_select(0, decodes.slots).view(b, width, kv_heads, head_dim).transpose(1, 2)
        v = values.index_select(0, decodes.slots).view(b, width, kv_heads, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=decodes.mask, scale=scaling)
        out[0, :b] = o.reshape(b, heads, head_dim)
    for chunk in layout.prefills:
        q = query[:, :, chunk.start:chunk.end]
        if chunk.context_slots is None:
            o = F.scaled_dot_product_attention(q, key[:, :, chunk.start:chunk.end], value[:, :, chunk.start:chunk.end],
                                               is_causal=True, scale=scaling, enable_gqa=heads != kv_heads)
        else:
            k = keys.index_select(0, chunk.context_slots).transpose(0, 1).unsqueeze(0)
            v = values.index_select(0, chunk.context_slots).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=chunk.mask, scale=scaling,
                                               enable_gqa=heads != kv_heads)
        out[0, chunk.start:chunk.end] = o[0].transpose(0, 1)
    return out, None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
