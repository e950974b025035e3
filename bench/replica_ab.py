"""Two or more aiaas stacks that differ only in their environment, measured point by point in one run.

Used by `bench.bench_worker_spin` (libgomp's spin) and `bench.bench_event_loop` (uvloop or asyncio's
loop). One registry holds the side-by-side's tiny and heavy MLPs (max batch 32, 2 ms queue delay,
one instance); each variant gets its own inference replica of those versions (`frontends`
processes on its port) started with the variant's environment and its own
gateway in front of it (same environment, an API key) when `doors` names it. The same lean client
(`bench/lean_client.py`, 8 connections) alternates between the variants point by point, starting one
further on each repetition; the median of `reps` runs is printed with the ratio of the first variant
to each other. Every replica is up the whole time; the ones not being measured are idle.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import lean_client
from bench.bench_inference import build_mlp, register
from bench.side_by_side import MAX_BATCH, MODELS, QUEUE_DELAY_US, busy_cores


def compare(variants: Mapping[str, Mapping[str, str]], *, threads: int = 2, levels: Sequence[int] = (1, 16, 64),
            reps: int = 3, requests: int = 3000, frontends: int = 1, doors: Sequence[str] = ("inference",),
            models: Sequence[str] = tuple(MODELS), title: str = "") -> list[dict[str, Any]]:
    """Measure every variant at every (model, level, door); print a markdown table; return its rows."""
    from tests.gateway.stack import ADMIN_TOKEN, PEPPER
    from tests.support.procs import ServiceProcess

    work = Path(tempfile.mkdtemp(prefix="aiaas-ab-"))
    files = {name: work / f"{name}.pt" for name in models}
    started: list[Any] = []
    rows: list[dict[str, Any]] = []
    labels = list(variants)
    try:
        registry = ServiceProcess("registry", args=[
            "--database-url", f"sqlite:///{work}/registry.db", "--artifact-dir", str(work / "artifacts"),
            "--log-level", "warning"]).start()
        started.append(registry)
        for name, path in files.items():
            build_mlp(MODELS[name], path)
            register(registry.address, name, path, MODELS[name], MAX_BATCH, QUEUE_DELAY_US)
        targets: dict[str, dict[str, dict[str, lean_client.Target]]] = {"inference": {}, "gateway": {}}
        for index, (label, env) in enumerate(variants.items()):
            replica = ServiceProcess("inference", args=[
                "--registry-url", registry.address, "--model-cache-dir", str(work / f"cache-{index}"),
                "--torch-threads", str(threads), "--frontends", str(frontends), "--log-level", "warning"],
                env=dict(env))
            started.append(replica.start(timeout=300))
            for name in files:
                replica.wait_ready(name, timeout=300)
            targets["inference"][label] = {m: lean_client.Target(label, replica.address, m, MODELS[m][0])
                                           for m in files}
            if "gateway" in doors:
                from aiaas.gateway_client import GatewayClient

                gateway = ServiceProcess("gateway", args=[
                    "--registry-url", registry.address, "--inference-targets", replica.address,
                    "--key-pepper", PEPPER, "--bootstrap-admin-key", ADMIN_TOKEN, "--grace-period-s", "2",
                    "--log-level", "warning"], env=dict(env))
                started.append(gateway.start(timeout=120))
                with GatewayClient(gateway.address, api_key=ADMIN_TOKEN) as admin:
                    _, token = admin.create_key("bench", models=list(files), roles=["infer"])
                auth = (("authorization", f"Bearer {token}"),)
                targets["gateway"][label] = {m: lean_client.Target(label, gateway.address, m, MODELS[m][0],
                                                                   metadata=auth) for m in files}
        print(f"{title}: {threads} torch threads, {frontends} process(es) per replica, medians of {reps} "
              f"alternating runs, req/s (p50 ms); * a run started with the machine > 0.5 cores busy\n")
        others = labels[1:]
        print("| door | model | c | " + " | ".join(labels) + " | " + " | ".join(f"{labels[0]} / {o}" for o in others)
              + " |")
        print("|---" * (3 + len(labels) + len(others)) + "|")
        for door in doors:
            for name in files:
                for level in levels:
                    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
                    busy: dict[str, bool] = dict.fromkeys(labels, False)
                    for rep in range(reps):
                        order = labels[rep % len(labels):] + labels[:rep % len(labels)]
                        for label in order:
                            busy[label] |= busy_cores() > 0.5
                            target = targets[door][label][name]
                            runs[label].append(asyncio.run(lean_client.run(target, level, requests, connections=8,
                                                                           cap_s=6.0)))
                    row: dict[str, Any] = {"door": door, "model": name, "concurrency": level}
                    for label in labels:
                        row[label] = {"rps": statistics.median(r["rps"] for r in runs[label]),
                                      "p50_ms": statistics.median(r["p50_ms"] for r in runs[label]),
                                      "errors": sum(r["errors"] for r in runs[label]), "busy": busy[label]}
                    rows.append(row)
                    cells = [f"{row[label]['rps']:,.0f} ({row[label]['p50_ms']:.2f})"
                             + (" *" if busy[label] else "") + (f" {row[label]['errors']} errors"
                                                                 if row[label]["errors"] else "")
                             for label in labels]
                    ratios = [f"{row[labels[0]]['rps'] / row[o]['rps']:.2f}x" if row[o]["rps"] else "-"
                              for o in others]
                    print(f"| {door} | {name} | {level} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |",
                          flush=True)
    finally:
        for service in reversed(started):
            service.stop()
    return rows
