"""Tiny causal LMs made in the test: a Llama from `LlamaConfig` and a byte-level BPE tokenizer trained
locally with `tokenizers`, saved as a Hugging Face checkpoint directory. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

TEXT = ["the quick brown fox jumps over the lazy dog", "models as a service, served with aiaas",
        "large language models predict the next token"]
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
PROMPT = "the quick brown"


def tokenizer() -> Any:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama(vocab_size: int, *, seed: int = 0, hidden_size: int = 64, layers: int = 2,
          intermediate_size: int = 128) -> Any:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config).eval()


def save(directory: Path, model: Any, tok: Any) -> Path:
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def greedy(model: Any, tok: Any, prompt: str = PROMPT, new_tokens: int = 8) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return [int(t) for t in out[0, ids.shape[1]:]]


def edit_json(path: Path, **changes: Any) -> None:
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))
