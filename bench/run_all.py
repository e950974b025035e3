"""Run every benchmark, one after the other (each starts its own processes): `python -m bench.run_all [--quick]`."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("bench.bench_engine", "bench.bench_inference", "bench.bench_gateway", "bench.bench_telemetry",
              "bench.bench_attacks", "bench.bench_eval")


def main() -> int:
    extra = sys.argv[1:]
    failed = []
    for module in BENCHMARKS:
        print(f"\n=== {module} {' '.join(extra)}", flush=True)
        if subprocess.run([sys.executable, "-m", module, *extra], check=False).returncode != 0:
            failed.append(module)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
