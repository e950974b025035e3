"""The knobs of one generative engine instance: KV budget, batch limits, queue limits."""

from __future__ import annotations

import dataclasses

from aiaas.errors import InvalidArgument

COMPUTE_DTYPES = ("auto", "checkpoint", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Limits of one engine instance (one model worker).

    The KV cache is allocated once, at start, as `kv_cache_tokens` token slots in blocks of
    `block_size`; nothing grows past it. Requests are admitted while their prompt fits in the free
    blocks; a request that could never fit (prompt + max_tokens above the budget or the maximum
    sequence length) is refused when it is submitted.
    """

    kv_cache_tokens: int = 16384
    kv_cache_bytes: int | None = None  # when set, the budget in bytes (it wins over kv_cache_tokens)
    block_size: int = 16
    max_num_seqs: int = 64  # sequences in the running batch
    max_num_batched_tokens: int = 512  # tokens in one forward pass (decodes + prefill chunks)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_queue_size: int = 1024  # waiting requests; one more is refused (RESOURCE_EXHAUSTED)
    default_timeout_s: float = 0.0  # queue timeout when a request sets none; 0: wait forever
    # Free blocks kept back when admitting, so running sequences can grow without preemption.
    watermark_fraction: float = 0.01
    step_history: int = 4096  # recent StepMetrics kept for readers
    torch_threads: int | None = None  # None: leave torch's setting alone
    # CPU, bf16/fp32: give each linear layer the kernel timed fastest here for its shape and row
    # count (packed for oneDNN, plain, or a GEMM on the transposed weight), at the cost of a private
    # copy of its weights per instance (see generative/packing.py).
    pack_weights: bool = True
    # The dtype the model computes in: "auto" (the checkpoint's, but fp32 for a bf16/fp16 checkpoint
    # on a CPU with no native 16-bit path), "checkpoint", "float32", "bfloat16" or "float16". A
    # conversion is a private copy of the weights per instance, like packing.
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        positive = ("kv_cache_tokens", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_queue_size",
                    "step_history")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(f"{name} must be an integer >= 1, got {value!r}")
        if self.kv_cache_tokens < self.block_size:
            raise InvalidArgument(f"kv_cache_tokens ({self.kv_cache_tokens}) must hold one block of {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise InvalidArgument(f"kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidArgument(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.default_timeout_s < 0:
            raise InvalidArgument(f"default_timeout_s must be >= 0, got {self.default_timeout_s}")
        if not 0 <= self.watermark_fraction < 1:
            raise InvalidArgument(f"watermark_fraction must be in [0, 1), got {self.watermark_fraction}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise InvalidArgument(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                                  f"got {self.compute_dtype!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise InvalidArgument(f"torch_threads must be >= 1, got {self.torch_threads}")

    def num_blocks(self, bytes_per_token: int) -> int:
        """Blocks within the budget, given what one token's keys and values take in all layers."""
        tokens = self.kv_cache_tokens if self.kv_cache_bytes is None else self.kv_cache_bytes // bytes_per_token
        blocks = tokens // self.block_size
        if blocks < 1:
            raise InvalidArgument(f"a KV budget of {self.kv_cache_bytes} bytes holds no block of {self.block_size} "
                                  f"tokens ({bytes_per_token} bytes per token)")
        return blocks
