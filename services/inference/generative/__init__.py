"""A generative engine: continuous batching over a paged KV cache for one transformers causal LM.

`GenerativeEngine` (engine.py) is what a model worker owns: `submit` a `GenerationRequest`, read
its `GenerationChunk`s from the handle (or a sink), `cancel` it; a scheduler thread runs `step()`.
The scheduler (scheduler.py) and the KV-block allocator (kv_cache.py) know nothing of torch; the
model runner (runner.py, attention.py) knows nothing of requests.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Names load on first use: the inference service parses generate requests with the plain types
# (`entities`) without importing torch or transformers; only worker processes load the engine.
_HOMES = {"EngineConfig": "config", "GenerativeEngine": "engine", "GenerationHandle": "streams",
          **{name: "entities" for name in ("FinishReason", "GenerationChunk", "GenerationRequest", "GenerationResult",
                                           "RequestMetrics", "SamplingParams", "StepMetrics", "Usage")}}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


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
