"""What idle torch threads spinning in model workers cost the service (docs/inference.md, "Worker threads").

Run: .venv/bin/python -m bench.bench_worker_spin [--reps 3] [--threads 2]

Two inference replicas of the same versions (the side-by-side's tiny and heavy MLPs, max batch 32,
2 ms queue delay, one instance, `--threads` torch threads, one process on the port) from one
registry: one as shipped (workers start with GOMP_SPINCOUNT=1000), one with libgomp's default
forced (GOMP_SPINCOUNT=300000 in its environment, which workers inherit). The same lean client
(`bench/lean_client.py`, 8 connections) alternates between them, point by point; the median of
`--reps` runs is printed with the ratio (`bench/replica_ab.py`).
"""

from __future__ import annotations

import argparse
import os

from bench.replica_ab import compare

LIBGOMP_DEFAULT = "300000"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per model worker")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=3000, help="per run (capped at 6 s)")
    args = parser.parse_args(argv)
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):  # the replicas' settings below, not the shell's
        os.environ.pop(name, None)
    compare({"short spin": {}, "libgomp default": {"GOMP_SPINCOUNT": LIBGOMP_DEFAULT}}, threads=args.threads,
            levels=[int(c) for c in args.concurrency.split(",") if c], reps=args.reps, requests=args.requests,
            title="worker spin")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
