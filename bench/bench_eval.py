"""Evaluation benchmark: `aiaas evaluate` on a 100,000-row data set through the serving path and in process.

    python -m bench.bench_eval [--rows 100000] [--width 64] [--scale 4] [--json results.json]

Starts a registry and an inference service as real processes, registers a classifier MLP
(TorchScript, width -> 256 -> 10) as production and Parquet data sets of `--rows` and
`--scale` x `--rows` examples (written in chunks), then runs `aiaas evaluate` on each, each run in
its own process: through the inference service (`--path serving`, batches of 256, `--concurrency`
in flight) and in process (`--path in-process`, the serving loader). Prints rows/s of each path
and their ratio, and each run's peak RSS: between the two sizes it grows by what the metrics need
per example (label, prediction, class probabilities, slicing features, and scikit-learn's working
copies while measuring: rows x classes), not by the inputs, which are read a batch at a time.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CLASSES = 10
SPEC = """
name: bench
task: classification
metrics: [accuracy, f1_macro, log_loss, ece, example_count, latency]
slices:
  - overall
  - feature: country
  - {feature: age, buckets: [30, 50]}
thresholds:
  - {metric: accuracy, min: 0.0}
batch_size: 256
"""
# Runs `aiaas ...` and reports the process's own peak RSS on stderr.
MEASURED = ("import resource, sys\nfrom aiaas.cli.main import main\ncode = main(sys.argv[1:])\n"
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
            "sys.exit(code)\n")


def build_model(width: int, path: Path) -> np.ndarray:
    """An MLP classifier; returns the weights of a linear teacher the labels come from."""
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(width, 256), torch.nn.ReLU(), torch.nn.Linear(256, CLASSES)).eval()
    torch.jit.save(torch.jit.script(module), str(path))
    return np.random.default_rng(1).normal(size=(CLASSES, width)).astype(np.float32)


def write_dataset(path: Path, rows: int, width: int, teacher: np.ndarray) -> None:
    """Chunked, so writing it needs no more memory than reading it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    writer = None
    for start in range(0, rows, 20_000):
        n = min(20_000, rows - start)
        x = rng.normal(size=(n, width)).astype(np.float32)
        table = pa.table({
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), width),
            "label": (x @ teacher.T).argmax(axis=1),
            "country": np.array(["fr", "de", "us", "jp"], dtype=object)[rng.integers(0, 4, n)],
            "age": rng.integers(18, 80, n),
        })
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=10_000)
    if writer is not None:
        writer.close()


def _peak_kb(stderr: str) -> int:
    for line in stderr.splitlines():
        if line.startswith("PEAK_RSS_KB"):
            return int(line.split()[1])
    raise RuntimeError(f"no peak RSS reported:\n{stderr[-2000:]}")


def run_cli(argv: list[str], env: dict[str, str]) -> tuple[dict[str, Any], int]:
    done = subprocess.run([sys.executable, "-c", MEASURED, *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, check=False, timeout=3600)
    if done.returncode not in (0, 3):
        raise RuntimeError(f"aiaas {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), _peak_kb(done.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--width", type=int, default=64, help="input features per example")
    parser.add_argument("--scale", type=int, default=4, help="also evaluate a data set this many times larger")
    parser.add_argument("--concurrency", type=int, default=4, help="batches in flight on the serving path")
    parser.add_argument("--quick", action="store_true", help="accepted for run_all; the run is already short")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    from aiaas.eval import registry_io
    from aiaas.registry_client import RegistryClient
    from tests.support.procs import ServiceProcess

    tmp = Path(tempfile.mkdtemp(prefix="aiaas-bench-eval-"))
    atexit.register(shutil.rmtree, tmp, True)
    teacher = build_model(args.width, tmp / "model.pt")
    sizes = [args.rows, args.rows * args.scale] if args.scale > 1 else [args.rows]
    (tmp / "spec.yaml").write_text(SPEC)
    registry = ServiceProcess("registry", args=["--database-url", f"sqlite:///{tmp}/registry.db",
                                                "--artifact-dir", str(tmp / "artifacts")]).start()
    inference = None
    rows: list[dict[str, Any]] = []
    try:
        with RegistryClient(registry.address, actor="bench") as client:
            client.register("bench-clf", tmp / "model.pt", format="torchscript",
                            signature={"inputs": [f"x:FP32:-1,{args.width}"], "outputs": [f"logits:FP32:-1,{CLASSES}"]},
                            serving_config={"max_batch_size": 256, "max_queue_size": 4096})
            client.set_alias("bench-clf", "production", 1)
            for size in sizes:
                data = tmp / f"data-{size}.parquet"
                write_dataset(data, size, args.width, teacher)
                registry_io.upload_dataset(client, f"bench-{size}", data, labels=["label"], model="bench-clf")
                data.unlink()
        inference = ServiceProcess("inference", args=[
            "--registry-url", registry.address, "--model-cache-dir", str(tmp / "cache"), "--torch-threads", "1",
            "--log-level", "warning"]).start(timeout=300)
        inference.wait_ready("bench-clf/1", timeout=300)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for size in sizes:
            common = ["evaluate", "bench-clf", "1", "--dataset", f"bench-{size}", "--spec", str(tmp / "spec.yaml"),
                      "--registry", registry.address, "--json", "--quiet", "--no-store"]
            for route in ("serving", "in-process"):
                extra = ["--inference", inference.address, "--concurrency", str(args.concurrency)] \
                    if route == "serving" else []
                result, peak_kb = run_cli([*common, "--path", route, *extra], env)
                overall = result["slices"][0]
                rows.append({"path": result["path"], "rows": int(overall["example_count"]),
                             "input_mib": size * args.width * 4 / 2**20, "seconds": result["duration_s"],
                             "rows_per_s": result["rows_per_s"], "accuracy": overall["metrics"]["accuracy"],
                             "batch_p50_ms": overall["metrics"].get("latency_ms_p50", 0.0),
                             "peak_rss_mib": peak_kb / 1024})
                print(_line(rows[-1]), flush=True)
    finally:
        if inference is not None:
            inference.stop()
        registry.stop()
    print()
    print(_table(rows))
    serving, local = rows[0], rows[1]
    ratio = serving["rows_per_s"] / local["rows_per_s"]
    print(f"\nserving / in-process throughput at {args.rows:,} rows: {ratio:.2f} (same accuracy: "
          f"{abs(serving['accuracy'] - local['accuracy']) < 1e-6})")
    growth = {}
    if len(sizes) > 1:
        for route in ("serving", "in-process"):
            small, large = (r for r in rows if r["path"] == route)
            growth[route] = (large["peak_rss_mib"] - small["peak_rss_mib"]) / (large["input_mib"] - small["input_mib"])
            print(f"{route}: {large['input_mib'] - small['input_mib']:.0f} MiB more inputs -> peak RSS "
                  f"{large['peak_rss_mib'] - small['peak_rss_mib']:+.0f} MiB ({growth[route]:.2f} MiB per MiB of inputs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio, "rss_growth_per_input_mib": growth,
                                               "cpus": os.cpu_count()}, indent=1))
    return 0 if all(r["rows"] in sizes for r in rows) else 1


def _line(row: dict[str, Any]) -> str:
    return (f"{row['path']:<10} {row['rows']:>8,} rows ({row['input_mib']:5.0f} MiB of inputs) in "
            f"{row['seconds']:6.1f} s = {row['rows_per_s']:9,.0f} rows/s  batch p50 {row['batch_p50_ms']:6.2f} ms  "
            f"peak RSS {row['peak_rss_mib']:6.0f} MiB")


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| path | rows | inputs MiB | seconds | rows/s | batch p50 ms | peak RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['rows']:,} | {r['input_mib']:.0f} | {r['seconds']:.1f} | "
                     f"{r['rows_per_s']:,.0f} | {r['batch_p50_ms']:.2f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
