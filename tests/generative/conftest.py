"""Fixtures for the generative engine tests: a tiny local checkpoint, the reference model, engines.

Everything runs in-process on CPU; nothing is downloaded (HF_HUB_OFFLINE=1, local files only).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.inference.generative import EngineConfig, GenerativeEngine
from tests.generative.models import write_checkpoint

PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "A journey of a thousand miles begins with a single step. Il était une fois un petit chat",
    "x",
    "for i in range(10):\n    print(i",
    "Continuous batching lets sequences join and leave the batch at every decode step. " * 3,
]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(checkpoint: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)


@pytest.fixture(scope="session")
def reference(checkpoint: Path) -> Any:
    """The same checkpoint as a plain transformers model (SDPA attention), for `generate`."""
    return AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True).eval()


@pytest.fixture(scope="session")
def prompt_ids(tokenizer: Any) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture
def make_engine(checkpoint: Path) -> Iterator[Callable[..., GenerativeEngine]]:
    engines: list[GenerativeEngine] = []

    def make(*, start: bool = True, **config: Any) -> GenerativeEngine:
        engine = GenerativeEngine.from_pretrained(checkpoint, EngineConfig(**config))
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in engines:
        engine.close()


def generate(reference: Any, prompt: Sequence[int], max_new_tokens: int, *, ignore_eos: bool = True,
             **kwargs: Any) -> list[int]:
    """transformers' own greedy `generate` (or sampling, with kwargs): the new token ids."""
    ids = torch.tensor([list(prompt)])
    extra: dict[str, Any] = {"min_new_tokens": max_new_tokens} if ignore_eos else {}
    with torch.inference_mode():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=reference.config.pad_token_id, **{"do_sample": False, **extra, **kwargs})
    return out[0, ids.shape[1]:].tolist()
