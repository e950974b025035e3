"""`aiaas` commands for the monitor.

    aiaas top [--model M] [--window 60] [--interval 1] [--once]    live table of every model and version
    aiaas slo set MODEL [--p99-ms 50] [--max-error-rate 0.01] [--window 300]
                        [--p99-ttft-ms 500] [--p99-itl-ms 50]                       (generative models)
                        [--min-accuracy 0.9 --min-labels 200] [--max-mean-abs-error 2.5]   (from feedback)
    aiaas slo list | aiaas slo delete MODEL
    aiaas alerts [--model M] [--active] [--watch]
    aiaas drift MODEL VERSION                                       PSI per feature against the baseline
    aiaas baseline MODEL VERSION (--learn N | --sample FILE.npy [--input NAME])
    aiaas canary MODEL                                              latest canary-vs-production verdict

Tables for people, `--json` for scripts. The monitor's address comes from `--url`, else
`AIAAS_MONITOR_URL`, else localhost:50053.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_URL = "localhost:50053"
TOP_COLUMNS = ("model", "version", "alias", "source", "rps", "err%", "p50_ms", "p99_ms", "queue_ms", "batch", "acc%",
               "ttft_ms", "tok/s", "count")


def _client(args: argparse.Namespace) -> Any:
    from aiaas.monitor_client import MonitorClient

    return MonitorClient(args.url)


def _table(rows: Sequence[Sequence[str]], columns: Sequence[str]) -> str:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _print(args: argparse.Namespace, data: Any, columns: Sequence[str] | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    elif columns is None:
        for key, value in data.items():
            print(f"{key:<22} {value}")
    else:
        print(_table([[_cell(item.get(c, "")) for c in columns] for item in data], columns))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import grpc

        try:
            return func(args)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "ERROR"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            print(f"error: {code}: {details}", file=sys.stderr)
            return 1

    return run


def top_rows(series: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in series:
        rows.append([
            s["model"], str(s["version"]), s["alias"] or "-", s["source"],
            f"{s['rate_per_second']:.1f}", f"{100 * s['error_rate']:.2f}",
            f"{s['latency']['p50_ms']:.2f}", f"{s['latency']['p99_ms']:.2f}", f"{s['queue']['p50_ms']:.2f}",
            f"{s['mean_batch_size']:.1f}", f"{100 * s['accuracy']:.1f}" if s["class_labels"] else "-",
            *_generation_cells(s.get("generation")), str(s["count"]),
        ])
    return rows


def _generation_cells(generation: dict[str, Any] | None) -> tuple[str, str]:
    """Time to first token (p50) and tokens generated per second, for a series with generative requests."""
    if not generation:
        return "-", "-"
    ttft = generation.get("ttft") or {}
    return f"{ttft.get('p50_ms', 0.0):.1f}", f"{generation.get('output_tokens_per_second', 0.0):.1f}"


def cmd_top(args: argparse.Namespace) -> int:
    with _client(args) as client:
        while True:
            series = client.metrics(model=args.model, source=args.source, window_s=args.window)
            if args.json:
                print(json.dumps(series, indent=2))
                return 0
            table = _table(top_rows(series), TOP_COLUMNS) if series else "(no traffic in the window)"
            header = f"aiaas top  {client.url}  window {args.window or 'default'}s  {time.strftime('%H:%M:%S')}"
            if args.once:
                print(header + "\n" + table)
                return 0
            # Home the cursor and clear below it: the table is redrawn in place.
            sys.stdout.write("\x1b[H\x1b[J" + header + "\n" + table + "\n")
            sys.stdout.flush()
            time.sleep(args.interval)


def cmd_slo_set(args: argparse.Namespace) -> int:
    objectives = (args.p99_ms, args.max_error_rate, args.p99_ttft_ms, args.p99_itl_ms, args.min_accuracy,
                  args.max_mean_abs_error)
    if all(v is None for v in objectives):
        print("error: give at least one of --p99-ms, --max-error-rate, --p99-ttft-ms, --p99-itl-ms, --min-accuracy, "
              "--max-mean-abs-error", file=sys.stderr)
        return 2
    with _client(args) as client:
        slo = client.set_slo(args.model, p99_latency_ms=args.p99_ms, max_error_rate=args.max_error_rate,
                             p99_ttft_ms=args.p99_ttft_ms, p99_inter_token_ms=args.p99_itl_ms,
                             window_s=args.window, min_requests=args.min_requests, source=args.source,
                             actor=os.environ.get("USER", ""), min_accuracy=args.min_accuracy,
                             max_mean_abs_error=args.max_mean_abs_error, min_labels=args.min_labels)
    _print(args, slo)
    return 0


def cmd_slo_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        slos = client.list_slos(args.model)
    _print(args, slos, ["model", "p99_latency_ms", "max_error_rate", "p99_ttft_ms", "p99_inter_token_ms",
                        "min_accuracy", "max_mean_abs_error", "window_seconds", "min_requests", "min_labels", "source"])
    return 0


def cmd_slo_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_slo(args.model, actor=os.environ.get("USER", ""))
    return 0


def _alert_row(alert: dict[str, Any]) -> dict[str, Any]:
    when = time.strftime("%H:%M:%S", time.localtime(alert["time_ns"] / 1e9))
    return {**alert, "time": when}


def cmd_alerts(args: argparse.Namespace) -> int:
    columns = ["time", "state", "kind", "model", "version", "summary"]
    with _client(args) as client:
        if not args.watch:
            _print(args, [_alert_row(a) for a in client.alerts(args.model, active_only=args.active)], columns)
            return 0
        for alert in client.watch_alerts(args.model, include_active=True):
            if args.json:
                print(json.dumps(alert), flush=True)
            else:
                row = _alert_row(alert)
                print(f"{row['time']}  {row['state'].upper():<8} {row['kind']:<16} {row['summary']}", flush=True)
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(args, client.drift(args.model, args.version, args.window), ["feature", "psi", "samples", "drifted"])
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    sample = None
    if args.sample:
        import numpy as np

        data = np.load(args.sample, allow_pickle=False)
        rows = data.reshape(data.shape[0], -1) if data.ndim > 1 else data.reshape(-1, 1)
        if rows.shape[1] == 1:
            sample = {args.input: rows[:, 0].tolist()}
        else:
            sample = {f"{args.input}[{j}]": rows[:, j].tolist() for j in range(rows.shape[1])}
    elif args.learn <= 0:
        print("error: give --learn N or --sample FILE.npy", file=sys.stderr)
        return 2
    with _client(args) as client:
        baseline = client.set_baseline(args.model, args.version, sample=sample, learn_from_requests=args.learn,
                                       bins=args.bins, actor=os.environ.get("USER", ""))
    features = [h["feature"] for h in baseline.get("histograms", [])]
    _print(args, {"model": args.model, "version": args.version,
                  "features": ", ".join(features) or f"learning from the first {args.learn} rows"})
    return 0


def cmd_canary(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.canary_status(args.model)
    if args.json:
        _print(args, status)
        return 0
    prod, canary = status.get("production", {}), status.get("canary", {})

    def side(s: dict[str, Any]) -> str:
        text = (f"{s.get('count', 0)} req, {100 * s.get('error_rate', 0):.2f}% errors, "
                f"p99 {s.get('latency', {}).get('p99_ms', 0):.2f} ms")
        if int(s.get("class_labels", 0)):
            text += f", accuracy {100 * s.get('accuracy', 0):.1f}% of {s['class_labels']} labels"
        return text

    _print(args, {
        "model": status["model"], "verdict": status["verdict"], "rolled_back": status["rolled_back"],
        "reason": status["reason"], "production": side(prod), "canary": side(canary),
    })
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this area's commands to the top-level parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("AIAAS_MONITOR_URL", DEFAULT_URL),
                        help="monitor address (env AIAAS_MONITOR_URL)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    top = subparsers.add_parser("top", parents=[common], help="live table of every model and version")
    top.add_argument("--model", default="")
    top.add_argument("--source", default="", choices=["", "gateway", "inference"])
    top.add_argument("--window", type=float, default=0.0, help="seconds; 0 = the monitor's default")
    top.add_argument("--interval", type=float, default=1.0)
    top.add_argument("--once", action="store_true", help="print one table and exit")
    top.set_defaults(func=_guard(cmd_top))

    slo = subparsers.add_parser("slo", help="service level objectives per model")
    slo_sub = slo.add_subparsers(dest="slo_command", metavar="ACTION", required=True)
    slo_set = slo_sub.add_parser("set", parents=[common], help="create or replace a model's SLO")
    slo_set.add_argument("model")
    slo_set.add_argument("--p99-ms", type=float, default=None)
    slo_set.add_argument("--max-error-rate", type=float, default=None, help="0..1")
    slo_set.add_argument("--p99-ttft-ms", type=float, default=None, help="generative models: p99 time to first token")
    slo_set.add_argument("--p99-itl-ms", type=float, default=None,
                         help="generative models: p99 of each request's mean inter-token latency")
    slo_set.add_argument("--window", type=float, default=0.0, help="seconds; 0 = the monitor's default")
    slo_set.add_argument("--min-requests", type=int, default=0)
    slo_set.add_argument("--source", default="", choices=["", "gateway", "inference"])
    slo_set.add_argument("--min-accuracy", type=float, default=None,
                         help="0..1, online accuracy from labels sent back (aiaas feedback)")
    slo_set.add_argument("--max-mean-abs-error", type=float, default=None,
                         help="online mean absolute error from numeric labels sent back")
    slo_set.add_argument("--min-labels", type=int, default=0, help="labels before quality is judged; 0 = default")
    slo_set.set_defaults(func=_guard(cmd_slo_set))
    slo_list = slo_sub.add_parser("list", parents=[common], help="list SLOs")
    slo_list.add_argument("--model", default="")
    slo_list.set_defaults(func=_guard(cmd_slo_list))
    slo_delete = slo_sub.add_parser("delete", parents=[common], help="delete a model's SLO")
    slo_delete.add_argument("model")
    slo_delete.set_defaults(func=_guard(cmd_slo_delete))

    alerts = subparsers.add_parser("alerts", parents=[common], help="list or follow alerts")
    alerts.add_argument("--model", default="")
    alerts.add_argument("--active", action="store_true", help="firing alerts only")
    alerts.add_argument("--watch", action="store_true", help="stream alerts as they fire and resolve")
    alerts.set_defaults(func=_guard(cmd_alerts))

    drift = subparsers.add_parser("drift", parents=[common], help="input drift (PSI per feature) of a version")
    drift.add_argument("model")
    drift.add_argument("version", type=int)
    drift.add_argument("--window", type=float, default=0.0)
    drift.set_defaults(func=_guard(cmd_drift))

    baseline = subparsers.add_parser("baseline", parents=[common], help="give a version an input baseline")
    baseline.add_argument("model")
    baseline.add_argument("version", type=int)
    baseline.add_argument("--learn", type=int, default=0, help="learn from the first N sampled rows")
    baseline.add_argument("--sample", default="", help=".npy file of reference inputs (rows first)")
    baseline.add_argument("--input", default="input", help="input tensor name the sample belongs to")
    baseline.add_argument("--bins", type=int, default=0)
    baseline.set_defaults(func=_guard(cmd_baseline))

    canary = subparsers.add_parser("canary", parents=[common], help="latest canary-vs-production verdict")
    canary.add_argument("model")
    canary.set_defaults(func=_guard(cmd_canary))
