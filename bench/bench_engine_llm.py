"""Generative engine benchmark: continuous batching against plain transformers `generate` on CPU.

Run: .venv/bin/python -m bench.bench_engine_llm [--quick] [--model DIR] [--dtype auto|float32|bfloat16]

The model is a ~20M-parameter random-initialised Llama built like
../shared/peers/llm/make_tiny_llama.py (hidden 256, 4 layers, 4/2 heads, vocab 32000, byte-level
BPE trained on the CPython stdlib; cached in a temp directory), or any local checkpoint (--model).
Every request is a 128-token prompt cut from stdlib sources and produces exactly 64 greedy tokens.

Rows, all from this one run:
  naive        `generate` one request at a time
  static 16    `generate` on 16 equal-length prompts at once
  engine c=N   GenerativeEngine, N closed-loop async clients streaming their chunks
out tok/s = completion tokens / wall time; TTFT and ITL are measured by the clients.
With --dtype auto, fp32 and bf16 are timed on one batched forward and the faster one is used.
The ratios are what matter: on a shared machine other tenants slow every row (the load average
before and after is printed); `--rounds R` repeats every row and keeps the best of each.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.generation.streamers import BaseStreamer

from services.inference.generative import EngineConfig, GenerationRequest, GenerativeEngine, SamplingParams

TINY: dict[str, Any] = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "intermediate_size": 768, "tie_word_embeddings": False}
PROMPT_FILES = ("typing.py", "argparse.py", "inspect.py", "subprocess.py", "tarfile.py", "pathlib.py")


def _stdlib_texts(names: tuple[str, ...] | None = None) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = ([os.path.join(root, n) for n in names] if names
             else sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)))
    texts = []
    for path in files:
        if "site-packages" in path:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (UnicodeDecodeError, OSError):  # a few stdlib test files are Latin-1
            continue
    return texts


def build_tiny_llama(directory: Path) -> Path:
    """Tokenizer (byte-level BPE, 32000) and a 19.5M-parameter Llama, as make_tiny_llama.py builds them."""
    if (directory / "config.json").exists():
        return directory
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_stdlib_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token="<pad>", model_max_length=2048)
    config = LlamaConfig(vocab_size=len(hf_tok), max_position_embeddings=2048, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.02, **TINY)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    hf_tok.save_pretrained(directory)
    return directory


def prompt_ids(tokenizer: Any, n: int, length: int, offset: int = 0) -> list[list[int]]:
    ids = tokenizer("".join(_stdlib_texts(PROMPT_FILES)), add_special_tokens=False)["input_ids"]
    stride = length + 7
    starts = [((i + offset) * stride) % (len(ids) - length) for i in range(n)]
    return [[tokenizer.bos_token_id] + ids[s: s + length - 1] for s in starts]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class _Stamps(BaseStreamer):
    """Times of the tokens `generate` produces (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt = True

    def put(self, value: Any) -> None:
        if self._prompt:
            self._prompt = False
        else:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        return None


def naive(model: Any, prompts: list[list[int]], new: int) -> dict[str, float]:
    ttfts, tokens = [], 0
    start = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p])
        stamps = _Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, streamer=stamps)
        tokens += out.shape[1] - ids.shape[1]
        ttfts.append(stamps.times[0] - t0)
    wall = time.perf_counter() - start
    return {"tok_s": tokens / wall, "ttft_p50": _pct(ttfts, 0.5), "ttft_p99": _pct(ttfts, 0.99)}


def static(model: Any, prompts: list[list[int]], new: int) -> dict[str, float]:
    ids = torch.tensor(prompts)
    stamps = _Stamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, streamer=stamps)
    wall = time.perf_counter() - t0
    first = stamps.times[0] - t0
    return {"tok_s": (out.shape[1] - ids.shape[1]) * ids.shape[0] / wall, "ttft_p50": first, "ttft_p99": first}


async def engine_load(engine: GenerativeEngine, prompts: list[list[int]], new: int, concurrency: int,
                      tag: str) -> dict[str, float]:
    params = SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True, temperature=0)
    pending = iter(enumerate(prompts))
    ttfts: list[float] = []
    gaps: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        for i, p in pending:
            handle = engine.submit(GenerationRequest(f"{tag}-{i}", prompt_token_ids=tuple(p), params=params))
            t0 = last = time.perf_counter()
            async for chunk in handle:
                now = time.perf_counter()
                if chunk.token_ids:
                    (ttfts if last == t0 else gaps).append(now - last)
                    last = now
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"tok_s": tokens / wall, "ttft_p50": _pct(ttfts, 0.5), "ttft_p99": _pct(ttfts, 0.99),
            "itl_p50": _pct(gaps, 0.5)}


def probe_dtype(path: Path, trials: int = 3) -> tuple[torch.dtype, dict[str, float]]:
    """Time a 16 x 128-token forward and 8 single-token forwards in fp32 and bf16, alternating; best of `trials`.

    bf16 wins only on CPUs with native bf16 matmuls (AVX512-BF16, AMX); elsewhere it is emulated.
    """
    models = {name: AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, name)).eval()
              for name in ("float32", "bfloat16")}
    prompt = torch.randint(4, 1000, (16, 128))
    timings = dict.fromkeys(models, float("inf"))
    with torch.inference_mode():
        for model in models.values():
            model(prompt, logits_to_keep=1)
        for _ in range(trials):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(prompt, logits_to_keep=1)
                for _ in range(8):
                    model(prompt[:, :1], logits_to_keep=1)
                timings[name] = min(timings[name], time.perf_counter() - t0)
    best = min(timings, key=lambda k: timings[k])
    return getattr(torch, best), timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a local checkpoint (default: build the tiny Llama)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer requests per row")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()}, torch threads: {args.threads})")

    path = args.model or build_tiny_llama(Path(tempfile.gettempdir()) / "aiaas-bench-tiny-llama")
    if args.dtype == "auto":
        dtype, timings = probe_dtype(path)
        print("dtype probe (s): " + ", ".join(f"{k} {v:.3f}" for k, v in timings.items()) + f" -> {dtype}")
    else:
        dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    engine = GenerativeEngine.from_pretrained(path, EngineConfig(kv_cache_tokens=64 * (args.prompt_len + args.new)
                                                                 + 1024, max_num_seqs=64), dtype=dtype)
    engine.start()
    n = {"naive": 4 if args.quick else 8, 1: 4 if args.quick else 8, 16: 32 if args.quick else 64,
         64: 64 if args.quick else 128}
    new = args.new
    warm = prompt_ids(tokenizer, 8, args.prompt_len, offset=999)
    naive(reference, warm[:1], 8)
    asyncio.run(engine_load(engine, warm, 8, 8, "warm"))

    best: dict[str, dict[str, float]] = {}
    for r in range(args.rounds):
        rows = {
            "naive": naive(reference, prompt_ids(tokenizer, n["naive"], args.prompt_len), new),
            "static 16": static(reference, prompt_ids(tokenizer, 16, args.prompt_len, offset=100), new),
        }
        for c in (1, 16, 64):
            rows[f"engine c={c}"] = asyncio.run(engine_load(engine, prompt_ids(tokenizer, n[c], args.prompt_len,
                                                                                offset=200 + c), new, c, f"r{r}c{c}"))
        for name, row in rows.items():
            if name not in best or row["tok_s"] > best[name]["tok_s"]:
                best[name] = row
    engine.close()
    steps = engine.step_metrics()

    print(f"model {path} ({sum(p.numel() for p in reference.parameters()) / 1e6:.1f} M params, {dtype}), "
          f"prompt {args.prompt_len} tokens -> {new} tokens, best of {args.rounds} round(s)")
    print(f"  {'row':<14} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'ITL p50 ms':>11}")
    for name, row in best.items():
        itl = f"{row['itl_p50'] * 1e3:11.1f}" if "itl_p50" in row else f"{'-':>11}"
        print(f"  {name:<14} {row['tok_s']:10.0f} {row['ttft_p50'] * 1e3:12.1f} {row['ttft_p99'] * 1e3:12.1f} {itl}")
    base, batch = best["naive"]["tok_s"], best["static 16"]["tok_s"]
    c16, c64 = best["engine c=16"]["tok_s"], best["engine c=64"]["tok_s"]
    print(f"ratios: engine c=16 / naive {c16 / base:.1f}x (goal >= 8x), engine c=16 / static 16 {c16 / batch:.2f}x "
          f"(goal >= 1x), engine c=64 / static 16 {c64 / batch:.2f}x")
    sizes = [s.num_seqs for s in steps]
    print(f"engine steps: {len(steps)}, mean batch {statistics.mean(sizes):.1f}, max batch {max(sizes)}, "
          f"preemptions {sum(s.preemptions for s in steps)}, peak KV use "
          f"{max(s.kv_usage for s in steps):.0%} of {engine.pool.num_blocks * engine.pool.block_size} tokens")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
