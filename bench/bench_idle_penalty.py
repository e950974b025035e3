"""What an idle gap costs on this machine: the same work, hot and after the CPU sat idle.

At concurrency 1 every process on a request's path (client, frontend, core, model worker) wakes
from idle once or more per request, so the p50 at c=1 is set as much by what a wake-up costs on
the machine as by the code. This measures it without any server: the tiny MLP's forward
(10-50-10, one row, TorchScript, one torch thread) and an in-process grpc.aio echo round trip,
back to back (hot) and after a gap of 0.5, 1.5 and 5 ms, the gap slept (`time.sleep`: the CPU may
idle) or spun (a busy loop: it may not). Medians of 300 timings each.

    python -m bench.bench_idle_penalty

Read next to the side-by-side: on a machine where a 20 µs forward takes 150 µs after 1.5 ms of
sleep, a c=1 request that crosses four processes pays that several times whatever the server is.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GAPS_MS = (0.0, 0.5, 1.5, 5.0)


def _wait(gap_s: float, spin: bool) -> None:
    if not gap_s:
        return
    if not spin:
        time.sleep(gap_s)
        return
    end = time.perf_counter() + gap_s
    while time.perf_counter() < end:
        pass


def timed(work: Callable[[], Any], gap_s: float, spin: bool, n: int) -> float:
    """Median µs of `work` after each gap."""
    for _ in range(20):
        work()
    samples = []
    for _ in range(n):
        _wait(gap_s, spin)
        started = time.perf_counter_ns()
        work()
        samples.append(time.perf_counter_ns() - started)
    return statistics.median(samples) / 1e3


def forward_rows(n: int) -> list[tuple[str, list[float]]]:
    import torch

    from aiaas.artifact_gate import load_torchscript
    from bench.bench_inference import build_mlp

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.pt"
        build_mlp((10, 50, 10), path)
        model = load_torchscript(str(path)).eval()
    x = torch.randn(1, 10)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    return [(f"tiny MLP forward, gap {'spun' if spin else 'slept'}",
             [timed(forward, gap / 1e3, spin, n) for gap in GAPS_MS]) for spin in (False, True)]


def echo_rows(n: int) -> list[tuple[str, list[float]]]:
    import grpc

    from services.common import eventloop

    async def main() -> list[float]:
        server = grpc.aio.server()

        async def echo(request: bytes, context: Any) -> bytes:
            return request

        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        figures = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/bench.Echo/Echo")
            for gap in GAPS_MS:
                for _ in range(20):
                    await call(b"x")
                samples = []
                for _ in range(n):
                    if gap:
                        await asyncio.sleep(gap / 1e3)
                    started = time.perf_counter_ns()
                    await call(b"x")
                    samples.append(time.perf_counter_ns() - started)
                figures.append(statistics.median(samples) / 1e3)
        await server.stop(0)
        return figures

    return [("grpc.aio echo round trip (one process), gap slept", eventloop.run(main()))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="timings per cell")
    args = parser.parse_args(argv)
    rows = forward_rows(args.n) + echo_rows(args.n)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(f"Idle penalty on this machine ({cpu}): median µs of the same work, hot and after an idle gap\n")
    print("| work | " + " | ".join("hot" if not g else f"after {g:g} ms" for g in GAPS_MS) + " | 1.5 ms / hot |")
    print("|---|" + "---|" * (len(GAPS_MS) + 1))
    for label, figures in rows:
        print(f"| {label} | " + " | ".join(f"{f:,.0f}" for f in figures) + f" | {figures[2] / figures[0]:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
