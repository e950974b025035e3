"""A generative engine: continuous batching over a paged KV cache for one transformers causal LM.

`GenerativeEngine` (engine.py) is what a model worker owns: `submit` a `GenerationRequest`, read
its `GenerationChunk`s from the handle (or a sink), `cancel` it; a scheduler thread runs `step()`.
The scheduler (scheduler.py) and the KV-block allocator (kv_cache.py) know nothing of torch; the
model runner (runner.py, attention.py) knows nothing of requests.
"""

from services.inference.generative.config import EngineConfig
from services.inference.generative.engine import GenerativeEngine
from services.inference.generative.entities import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    RequestMetrics,
    SamplingParams,
    StepMetrics,
    Usage,
)
from services.inference.generative.streams import GenerationHandle

__all__ = [
    "EngineConfig",
    "FinishReason",
    "GenerationChunk",
    "GenerationHandle",
    "GenerationRequest",
    "GenerationResult",
    "GenerativeEngine",
    "RequestMetrics",
    "SamplingParams",
    "StepMetrics",
    "Usage",
]
