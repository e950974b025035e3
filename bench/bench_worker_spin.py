"""What idle torch threads spinning in model workers cost the service (docs/inference.md, "Worker threads").

Run: .venv/bin/python -m bench.bench_worker_spin [--reps 3] [--threads 2]

Two inference replicas of the same versions (the side-by-side's tiny and heavy MLPs, max batch 32,
2 ms queue delay, one instance, `--threads` torch threads, one process on the port) from one
registry: one as shipped (workers start with GOMP_SPINCOUNT=1000), one with libgomp's default
forced (GOMP_SPINCOUNT=300000 in its environment, which workers inherit). The same lean client
(`bench/lean_client.py`, 8 connections) alternates between them, point by point; the median of
`--reps` runs is printed with the ratio. Both replicas are up the whole time; the one not being
measured is idle.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

from bench import lean_client
from bench.bench_inference import build_mlp, register
from bench.side_by_side import MAX_BATCH, MODELS, QUEUE_DELAY_US

LIBGOMP_DEFAULT = "300000"


def main(argv: list[str] | None = None) -> int:
    from tests.support.procs import ServiceProcess

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per model worker")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=3000, help="per run (capped at 6 s)")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):  # the replicas' settings below, not the shell's
        os.environ.pop(name, None)
    work = Path(tempfile.mkdtemp(prefix="aiaas-spin-"))
    files = {name: work / f"{name}.pt" for name in MODELS}
    started: list[ServiceProcess] = []
    try:
        registry = ServiceProcess("registry", args=[
            "--database-url", f"sqlite:///{work}/registry.db", "--artifact-dir", str(work / "artifacts"),
            "--log-level", "warning"]).start()
        started.append(registry)
        for name, path in files.items():
            build_mlp(MODELS[name], path)
            register(registry.address, name, path, MODELS[name], MAX_BATCH, QUEUE_DELAY_US)
        replicas = {}
        for label, env in (("short spin", {}), ("libgomp default", {"GOMP_SPINCOUNT": LIBGOMP_DEFAULT})):
            replica = ServiceProcess("inference", args=[
                "--registry-url", registry.address, "--model-cache-dir", str(work / label.replace(" ", "-")),
                "--torch-threads", str(args.threads), "--frontends", "1", "--log-level", "warning"],
                env=env)
            started.append(replica.start(timeout=300))
            for name in files:
                replica.wait_ready(name, timeout=300)
            replicas[label] = replica
        print(f"worker spin: {args.threads} torch threads, medians of {args.reps} alternating runs, req/s (p50 ms)\n")
        print("| model | c | short spin (shipped) | libgomp default | ratio |")
        print("|---|---|---|---|---|")
        for name in files:
            for level in levels:
                runs: dict[str, list[dict[str, float]]] = {label: [] for label in replicas}
                for _ in range(args.reps):
                    for label, replica in replicas.items():
                        target = lean_client.Target(label, replica.address, name, MODELS[name][0])
                        runs[label].append(asyncio.run(lean_client.run(target, level, args.requests, connections=8,
                                                                       cap_s=6.0)))
                rps = {label: statistics.median(r["rps"] for r in rows) for label, rows in runs.items()}
                p50 = {label: statistics.median(r["p50_ms"] for r in rows) for label, rows in runs.items()}
                short, default = rps["short spin"], rps["libgomp default"]
                print(f"| {name} | {level} | {short:,.0f} ({p50['short spin']:.2f}) | "
                      f"{default:,.0f} ({p50['libgomp default']:.2f}) | {short / default:.2f}x |", flush=True)
    finally:
        for service in reversed(started):
            service.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
