"""What telemetry costs the serving path: throughput with and without reporting, in one run.

Run: .venv/bin/python -m bench.bench_telemetry [--quick] [--seconds 4] [--rounds 3] [--concurrency 16]

1. Reporter micro-costs: `record()` per call (the only work on the request path), encoding a
   batch for the monitor (per record, paid once per flush in the background task), and
   `sample_inputs` per offered request.
2. The serving path end to end, gateway -> inference, driven with tritonclient.grpc.aio:
   arm "off"  gateway and inference without a monitor (no reporter),
   arm "on"   gateway and inference reporting every request to a live monitor,
   arm "down" the same, with the monitor gone (every batch dropped and counted).
   Rounds alternate between arms (on, off, down, off, on, ...) so a noisy neighbour hurts
   each alike; the figure is the median round of each arm and its ratio to "off".
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as tca

from services.common.reporting import RequestRecord, TelemetryReporter


def micro(n: int) -> None:
    reporter = TelemetryReporter("127.0.0.1:1", source="gateway", max_buffer=n + 1)
    recs = [RequestRecord("gateway", "m", 1, "production", "OK", 1234, key_id="k") for _ in range(n)]
    t0 = time.perf_counter_ns()
    for rec in recs:
        reporter.record(rec)
    record_ns = (time.perf_counter_ns() - t0) / n

    from aiaas.monitor.v1 import monitor_pb2

    make = monitor_pb2.RequestRecord
    t0 = time.perf_counter_ns()
    for start in range(0, n, 2000):
        monitor_pb2.ReportRequest(source="gateway", records=[
            make(source=r.source, model=r.model, version=r.version, alias=r.alias, status=r.status,
                 latency_us=r.latency_us, queue_us=r.queue_us, compute_us=r.compute_us, batch_size=r.batch_size,
                 key_id=r.key_id, time_ns=r.time_ns) for r in reporter._records[start:start + 2000]
        ]).SerializeToString()
    encode_ns = (time.perf_counter_ns() - t0) / n

    x = {"x": np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)}
    sampler = TelemetryReporter("127.0.0.1:1", source="inference", samples_per_second=1e9)
    t0 = time.perf_counter_ns()
    for _ in range(2000):
        sampler.sample_inputs("m", 1, x)
        sampler._samples.clear()
    sample_ns = (time.perf_counter_ns() - t0) / 2000
    limited = TelemetryReporter("127.0.0.1:1", source="inference")
    t0 = time.perf_counter_ns()
    for _ in range(n):
        limited.sample_inputs("m", 1, x)
    limited_ns = (time.perf_counter_ns() - t0) / n
    print("reporter micro-costs (this process, one core):")
    print(f"  record() on the request path          {record_ns:8.0f} ns per request")
    print(f"  batch encoding (background flush)     {encode_ns:8.0f} ns per record")
    print(f"  sample_inputs, taken                  {sample_ns:8.0f} ns per sample")
    print(f"  sample_inputs, rate-limited away      {limited_ns:8.0f} ns per request")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and every descendant alive now (Linux /proc)."""
    import os

    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    total = 0
    for p in tree:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def drive(address: str, seconds: float, concurrency: int) -> tuple[float, int]:
    client = tca.InferenceServerClient(address)
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    ok = failed = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal ok, failed
        tensor = tca.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        while time.monotonic() < deadline:
            try:
                await client.infer("bench", [tensor], client_timeout=30)
                ok += 1
            except Exception:  # noqa: BLE001 - counted; a failure is a finding
                failed += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    await client.close()
    return ok / elapsed, failed


def serving(args: argparse.Namespace) -> None:
    from tests.inference.conftest import Registry, inference_args, start_registry, wait_model
    from tests.monitor.test_e2e import write_double
    from tests.support.procs import ServiceProcess
    from tests.support.servers import free_port

    tmp = Path(tempfile.mkdtemp(prefix="aiaas-bench-telemetry-"))
    atexit.register(shutil.rmtree, tmp, True)
    registry_proc = start_registry(tmp)
    registry = Registry(registry_proc)
    registry.register("bench", write_double(tmp), max_batch_size=16, max_queue_delay_us=200, alias="production")
    monitor = ServiceProcess("monitor", ["--registry-url", registry.address, "--metrics-port", "0"], port=free_port())
    procs: list[ServiceProcess] = [monitor]

    def inference(report: bool) -> ServiceProcess:
        extra = ["--monitor-url", monitor.address] if report else []
        return ServiceProcess("inference", inference_args(registry, tmp / f"cache-{report}", *extra))

    def gateway(upstream: ServiceProcess, report: bool) -> ServiceProcess:
        extra = ["--monitor-url", monitor.address] if report else []
        return ServiceProcess("gateway", ["--registry-url", registry.address, "--inference-targets",
                                          upstream.address, "--no-auth-enabled", *extra])

    inf_on, inf_off = inference(True), inference(False)
    gw_on, gw_off = gateway(inf_on, True), gateway(inf_off, False)
    procs += [inf_on, inf_off, gw_on, gw_off]
    try:
        for proc in procs:
            proc.start(wait=False)
        for proc in procs:
            proc.wait_ready(timeout=180)
        wait_model(inf_on, "bench")
        wait_model(inf_off, "bench")
        for gw in (gw_on, gw_off):  # warm both paths
            asyncio.run(drive(gw.address, 1.0, args.concurrency))
        serving_pids = {"on": (gw_on, inf_on), "down": (gw_on, inf_on), "off": (gw_off, inf_off)}

        def one_round(arm: str) -> tuple[float, float, int]:
            pair = serving_pids[arm]
            before = sum(tree_cpu_s(p.proc.pid) for p in pair if p.proc)
            rps, failed = asyncio.run(drive(pair[0].address, args.seconds, args.concurrency))
            after = sum(tree_cpu_s(p.proc.pid) for p in pair if p.proc)
            return rps, (after - before) / max(1.0, rps * args.seconds) * 1e6, failed

        def paired(arm: str) -> dict[str, list[float]]:
            # Each pair runs the arm and "off" back to back (order alternating): a neighbour's
            # load hits both halves of a pair alike, and the pair's ratio cancels it.
            out: dict[str, list[float]] = {"rps": [], "off_rps": [], "rps_ratio": [], "cpu_ratio": [],
                                           "cpu": [], "failed": [0.0]}
            for i in range(args.rounds):
                order = (arm, "off") if i % 2 == 0 else ("off", arm)
                got = {name: one_round(name) for name in order}
                (rps, cpu, failed), (off_rps, off_cpu, off_failed) = got[arm], got["off"]
                out["rps"].append(rps)
                out["off_rps"].append(off_rps)
                out["rps_ratio"].append(rps / off_rps)
                out["cpu"].append(cpu)
                out["cpu_ratio"].append(cpu / off_cpu)
                out["failed"][0] += failed + off_failed
            return out

        live = paired("on")
        monitor.kill()
        down = paired("down")
        med = statistics.median
        print(f"\nserving path gateway -> inference, 1x4 FP32 rows, concurrency {args.concurrency}, "
              f"{args.rounds} pairs of {args.seconds:g}s rounds (arm vs no reporting, back to back):")
        print(f"  no reporting                        {med(live['off_rps'] + down['off_rps']):8.0f} req/s")
        for label, res in (("reporting to a live monitor", live), ("reporting, monitor down (dropped)", down)):
            print(f"  {label:<35} {med(res['rps']):8.0f} req/s  throughput ratio {med(res['rps_ratio']):.3f}  "
                  f"serving CPU/request ratio {med(res['cpu_ratio']):.3f}  (pairs: "
                  f"{', '.join(f'{r:.2f}' for r in res['rps_ratio'])}; failed requests {res['failed'][0]:.0f})")
        print(f"  telemetry cost on throughput: {100 * (1 - med(live['rps_ratio'])):+.1f}% with a live monitor, "
              f"{100 * (1 - med(down['rps_ratio'])):+.1f}% with it down (aim: under 5%)")
    finally:
        for proc in reversed(procs):
            proc.stop()
        registry.close()
        registry_proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="micro-costs only")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    micro(50_000)
    if not args.quick:
        serving(args)


if __name__ == "__main__":
    main()
