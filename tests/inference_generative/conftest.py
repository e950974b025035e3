"""Fixtures for generative serving: a real registry process, tiny Llama checkpoints registered with
`aiaas.deploy_lm`, and a real inference service process whose sandboxed workers run the engine.

Nothing is downloaded: the tokenizer is trained and the model built in the test (tests/generative/models.py).
"""

from __future__ import annotations

import os

# Before transformers is imported, and inherited by every process the tests start.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import tritonclient.grpc as triton

from aiaas.lm import deploy_lm
from tests.generative.models import build_llama, train_tokenizer
from tests.inference.conftest import Registry, inference_args, start_inference, start_registry, wait_model
from tests.support.procs import ServiceProcess

# name: (model kwargs, serving config)
MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # One instance, room for many sequences: requests share its running batch.
    "tiny-llm": ({}, {"kv_cache_tokens": 4096, "max_num_seqs": 32}),
    # Two instances: requests go to the least loaded one.
    "two-llm": ({"seed": 1}, {"instance_count": 2, "kv_cache_tokens": 2048}),
    # One sequence at a time: a second request waits until the first one leaves the batch; two may wait.
    "one-seq-llm": ({"seed": 2, "max_positions": 2048}, {"kv_cache_tokens": 2048, "max_num_seqs": 1,
                                                         "max_queue_size": 2}),
}
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}<s>assistant:"


@dataclasses.dataclass
class Stack:
    registry: Registry
    inference: ServiceProcess
    checkpoints: dict[str, Path]
    references: dict[str, Any]
    tokenizer: Any

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.inference.address)

    def reference(self, model: str, prompt: str, max_tokens: int, *, add_special_tokens: bool = True,
                  exact_length: bool = False) -> tuple[list[int], str]:
        """transformers' own greedy `generate` on the same weights (EOS ends it, as in the engine), and the text.

        `exact_length`: EOS is masked until `max_tokens` tokens exist (to compare with `ignore_eos`).
        """
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids
        extra = {"min_new_tokens": max_tokens} if exact_length else {}
        with torch.inference_mode():
            out = self.references[model].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                                   do_sample=False, pad_token_id=self.tokenizer.pad_token_id, **extra)
        tokens = [int(t) for t in out[0, ids.shape[1]:]]
        return tokens, str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"])


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("genserve")
    registry_proc = start_registry(tmp / "registry")
    registry = Registry(registry_proc)
    tokenizer = train_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    checkpoints, references = {}, {}
    for name, (model_kwargs, serving) in MODELS.items():
        model = build_llama(tokenizer, **model_kwargs)
        path = tmp / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        deploy_lm(path, name=name, registry=registry.address, serving_config=serving)
        checkpoints[name], references[name] = path, model
    inference = start_inference(inference_args(registry, tmp / "cache", "--max-queue-size", "64"))
    try:
        for name in MODELS:
            wait_model(inference, name, timeout=180)
        yield Stack(registry, inference, checkpoints, references, tokenizer)
    finally:
        inference.stop()
        registry.close()
        registry_proc.stop()
