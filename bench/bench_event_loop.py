"""What the event loop costs the services: uvloop against asyncio's own loop (docs/inference.md, "Event loop").

Run: .venv/bin/python -m bench.bench_event_loop [--reps 3] [--frontends 1] [--doors inference,gateway]

Two stacks of the same versions (the side-by-side's tiny and heavy MLPs, max batch 32, 2 ms queue
delay, one instance), each an inference replica and a gateway in front of it: one with
AIAAS_EVENT_LOOP=uvloop (the default where uvloop is installed), one with AIAAS_EVENT_LOOP=asyncio.
The same lean client alternates between them point by point (`bench/replica_ab.py`).
"""

from __future__ import annotations

import argparse

from bench.replica_ab import compare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per model worker")
    parser.add_argument("--frontends", type=int, default=1, help="processes on each replica's port")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--models", default="tiny,heavy")
    parser.add_argument("--requests", type=int, default=3000, help="per run (capped at 6 s)")
    parser.add_argument("--doors", default="inference,gateway", help="inference, gateway or both")
    args = parser.parse_args(argv)
    compare({"uvloop": {"AIAAS_EVENT_LOOP": "uvloop"}, "asyncio": {"AIAAS_EVENT_LOOP": "asyncio"}},
            threads=args.threads, levels=[int(c) for c in args.concurrency.split(",") if c], reps=args.reps,
            requests=args.requests, frontends=args.frontends, doors=[d for d in args.doors.split(",") if d],
            models=[m for m in args.models.split(",") if m], title="event loop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
