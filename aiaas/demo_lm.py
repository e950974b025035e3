"""The generative demo `aiaas up` serves as `demo-lm`: a tiny Llama-architecture decoder and its
BPE tokenizer, both trained here in seconds on text shipped with the project, so nothing is
downloaded and the text it writes looks like (garbled) aiaas documentation.

- Text: `aiaas/demo_corpus.txt`, the prose paragraphs of this project's README and docs/ (code
  blocks and tables left out), about 135 KB.
- Tokenizer: byte-level BPE (`tokenizers`), 1,024 tokens with `<unk> <s> </s> <pad>`, a simple
  chat template (`role: content` lines, then `assistant:`), so the chat door has one to apply.
- Model: `transformers.LlamaConfig` (hidden 128, 2 layers, 4 heads, 2 KV heads, MLP 256; about
  0.56M parameters), trained with AdamW (one-cycle schedule) on windows of 64 tokens of the
  corpus, each paragraph between `<s>` and `</s>` so it learns where text ends.
- Saved with `save_pretrained` (safetensors; fp32) and the tokenizer files: an `hf_causal_lm`
  checkpoint that passes the artifact gate and loads with `aiaas.lm.load_causal_lm`.

Deterministic: a fixed seed, a fixed number of steps and one torch thread while training give
the same bytes on every run on one machine (float sums may differ on other CPUs).
`cached_demo_lm` keeps the checkpoint under `$AIAAS_HOME/demo/`, named by everything it depends
on, so a second `aiaas up` does not train again. `aiaas up` runs it as a child process
(`python -m aiaas.demo_lm --cache-root DIR`, one JSON line out), so the training neither
competes with `up` for the GIL nor leaves transformers loaded in it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEMO_LM_MODEL = "demo-lm"
CORPUS = Path(__file__).resolve().parent / "demo_corpus.txt"
# Bump when the builder changes what it makes (the cache key includes it).
BUILDER_VERSION = 1
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MAX_STEPS = 100_000
PROMPT = "The registry"


@dataclasses.dataclass(frozen=True)
class LMRecipe:
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    context: int = 256
    window: int = 64
    batch: int = 32
    steps: int = 400
    learning_rate: float = 5e-3
    seed: int = 0

    def key(self, corpus: bytes) -> str:
        """Names the checkpoint by everything it is made from."""
        text = json.dumps({"builder": BUILDER_VERSION, **dataclasses.asdict(self),
                           "corpus": hashlib.sha256(corpus).hexdigest()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class BuildStopped(Exception):
    """`should_stop` said so: the build gave up, leaving nothing behind."""


@dataclasses.dataclass(frozen=True)
class BuiltLM:
    directory: Path
    parameters: int
    train_seconds: float
    steps: int
    final_loss: float
    cached: bool


def train_tokenizer(text: str, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_paragraphs(text), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", model_max_length=256)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a bar per shard it writes; `aiaas up` prints its own line instead."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def build_demo_lm(directory: Path, recipe: LMRecipe = LMRecipe(), *, corpus: Path = CORPUS,
                  max_seconds: float = 600.0, should_stop: Callable[[], bool] | None = None) -> BuiltLM:
    """Train the tokenizer and the model and save the checkpoint into `directory` (made here; must
    not exist). `max_seconds` only guards a very slow machine: training stops there, early.
    `should_stop` is asked at every step; BuildStopped when it says yes."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if not 1 <= recipe.steps <= MAX_STEPS:
        raise ValueError(f"steps must be 1..{MAX_STEPS}, not {recipe.steps}")
    text = corpus.read_text(encoding="utf-8")
    tokenizer = train_tokenizer(text, recipe.vocab_size)
    bos, eos, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>"))
    stream: list[int] = []
    for paragraph in _paragraphs(text):  # the post-processor puts <s> first
        stream += [*tokenizer.backend_tokenizer.encode(paragraph).ids, eos]
    ids = torch.tensor(stream, dtype=torch.long)
    if len(ids) <= recipe.window + 1:
        raise ValueError(f"{corpus} is too short to train on ({len(ids)} tokens)")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden, intermediate_size=2 * recipe.hidden,
                         num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                         num_key_value_heads=recipe.kv_heads, max_position_embeddings=recipe.context,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)
    started = time.monotonic()
    with _torch_threads(1):
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(config)
        generator = torch.Generator().manual_seed(recipe.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.learning_rate,
                                                       total_steps=recipe.steps, pct_start=0.1)
        offsets = torch.arange(recipe.window + 1)
        model.train()
        steps, loss_value = 0, float("nan")
        while steps < recipe.steps and time.monotonic() - started < max_seconds:
            if should_stop is not None and should_stop():
                raise BuildStopped
            starts = torch.randint(0, len(ids) - recipe.window - 1, (recipe.batch, 1), generator=generator)
            batch = ids[starts + offsets]
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            steps += 1
            loss_value = loss.item()
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                                               do_sample=True, temperature=0.8, top_k=40, max_new_tokens=64)
    train_seconds = time.monotonic() - started
    directory.mkdir(parents=True)
    with _no_progress_bars():
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return BuiltLM(directory, sum(p.numel() for p in model.parameters()), train_seconds, steps, loss_value, False)


def cached_demo_lm(cache_root: Path, recipe: LMRecipe = LMRecipe(), *, corpus: Path = CORPUS,
                   should_stop: Callable[[], bool] | None = None) -> BuiltLM:
    """The checkpoint for `recipe` under `cache_root` (`$AIAAS_HOME/demo`), built when missing.

    Built in a temporary folder beside it and renamed into place; its record (`lm-KEY.json`, beside
    the checkpoint: the artifact gate allows only a checkpoint's own files in it) is written last,
    so an interrupted build leaves nothing a later run takes for a checkpoint."""
    directory = cache_root / f"lm-{recipe.key(corpus.read_bytes())}"
    record = cache_root / f"{directory.name}.json"
    if record.exists() and directory.is_dir():
        info = json.loads(record.read_text())
        return BuiltLM(directory, int(info["parameters"]), float(info["train_seconds"]), int(info["steps"]),
                       float(info["final_loss"]), True)
    cache_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lm-build-", dir=cache_root) as tmp:
        built = build_demo_lm(Path(tmp) / "checkpoint", recipe, corpus=corpus, should_stop=should_stop)
        if directory.exists():  # left by a build that stopped before writing its record
            shutil.rmtree(directory)
        built.directory.rename(directory)
    record.write_text(json.dumps({
        "parameters": built.parameters, "train_seconds": round(built.train_seconds, 2), "steps": built.steps,
        "final_loss": round(built.final_loss, 4), "recipe": dataclasses.asdict(recipe)}))
    return dataclasses.replace(built, directory=directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiaas.demo_lm",
                                     description="build (or find cached) the demo LM; print it as one JSON line")
    parser.add_argument("--cache-root", required=True, type=Path, help="where checkpoints are cached")
    parser.add_argument("--steps", type=int, default=LMRecipe.steps, help="training steps")
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= MAX_STEPS:
        parser.error(f"--steps must be 1..{MAX_STEPS}")
    # SIGTERM (`aiaas up` stopping) unwinds, so the half-built temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    built = cached_demo_lm(args.cache_root, LMRecipe(steps=args.steps))
    print(json.dumps({**dataclasses.asdict(built), "directory": str(built.directory)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
