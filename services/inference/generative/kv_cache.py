"""The KV cache: a fixed pool of token slots in blocks, allocated once, and who holds which block.

`BlockPool` is the bookkeeping (plain Python, used by the scheduler); `PagedKVCache` holds the
tensors (one key and one value tensor per layer, `[num_blocks * block_size, kv_heads, head_dim]`),
which the attention function reads through per-sequence block tables.
"""

from __future__ import annotations

from collections import deque

import torch

from aiaas.errors import Internal


class BlockPool:
    """Free and used blocks of a fixed-size pool; a sequence's blocks are its block table."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, table: list[int], num_tokens: int, *, reserve: int = 0) -> bool:
        """Whether `table` can be grown to hold `num_tokens` with `reserve` blocks still free after."""
        return self.blocks_for(num_tokens) - len(table) + reserve <= len(self._free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` until it holds `num_tokens` tokens."""
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > len(self._free):
            raise Internal(f"KV cache: {missing} blocks asked for, {len(self._free)} free")
        for _ in range(missing):
            table.append(self._free.popleft())

    def release(self, table: list[int]) -> None:
        self._free.extend(table)
        table.clear()


class PagedKVCache:
    """The key and value tensors of every layer, sized by the pool, zero-filled once."""

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        slots = num_blocks * block_size
        # Zeros, not empty: padded reads are masked out, but a NaN there would still poison the sum.
        self.keys = [torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @staticmethod
    def bytes_per_token(*, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
