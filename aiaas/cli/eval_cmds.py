"""`aiaas dataset`, `aiaas evaluate`, `aiaas evaluations` and `aiaas eval-gate`: model quality.

    aiaas dataset register demo-test test.parquet --model demo --label label
    aiaas evaluate demo 2 --dataset demo-test --spec spec.yaml --baseline production --html report.html
    aiaas eval-gate set demo --dataset demo-test --spec spec.yaml    # production now needs it passed
    aiaas evaluations demo 2

`aiaas evaluate` exits 0 when every threshold held, 3 when one failed (the result is stored
either way), 1 on an error. Tables for people, `--json` for scripts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from aiaas.cli import output

DEFAULT_REGISTRY = "localhost:50051"
EXIT_FAILED = 3


def _client(args: argparse.Namespace) -> Any:
    from aiaas.registry_client import RegistryClient

    target = args.registry or os.environ.get("AIAAS_REGISTRY_URL") or DEFAULT_REGISTRY
    return RegistryClient(target, actor=args.actor or "")


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from aiaas.errors import AiaasError
        from aiaas.registry_client import RegistryError

        try:
            return func(args)
        except RegistryError as exc:
            return output.error(f"{exc.code().name}: {exc.details()}")
        except AiaasError as exc:
            return output.error(f"{exc.code.status_name}: {exc.message}")
        except (ValueError, OSError) as exc:
            return output.error(str(exc), 2)

    return run


class RowProgress:
    """`(rows done, rows in all, seconds)`: rows/s and ETA on one line of a terminal, or a line every few
    seconds elsewhere (logs)."""

    def __init__(self, label: str, file: IO[str] | None = None, interval_s: float | None = None) -> None:
        self.label = label
        self.file = file or sys.stderr
        self.tty = self.file.isatty()
        self.interval_s = interval_s if interval_s is not None else (0.2 if self.tty else 5.0)
        self._last = 0.0

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s and done < total:
            return
        self._last = now
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        line = f"{self.label}: {done:,}/{total:,} rows, {rate:,.0f} rows/s, ETA {eta:.0f}s"
        if self.tty:
            self.file.write("\r" + line + ("\n" if done >= total else ""))
        else:
            self.file.write(line + "\n")
        self.file.flush()


# Data sets -------------------------------------------------------------------------------------

def _dataset_row(d: Any) -> dict[str, Any]:
    from aiaas.eval.formats import DatasetFormat
    from aiaas.registry.v1 import evaluation_pb2 as epb

    roles = {epb.COLUMN_ROLE_INPUT: "inputs", epb.COLUMN_ROLE_LABEL: "labels", epb.COLUMN_ROLE_FEATURE: "features"}
    grouped: dict[str, list[str]] = {}
    for column in d.columns:
        grouped.setdefault(roles.get(column.role, "other"), []).append(column.name)
    return {"name": d.name, "format": DatasetFormat.from_pb(d.format).value, "rows": d.num_rows,
            "size": output.human_bytes(d.size), "sha256": d.sha256[:12], "model": f"{d.model}/{d.model_version}",
            "inputs": grouped.get("inputs", []), "labels": grouped.get("labels", []),
            "features": grouped.get("features", []), "created_by": d.created_by}


def cmd_dataset_register(args: argparse.Namespace) -> int:
    from aiaas.eval import registry_io

    with _client(args) as client, output.ProgressBar(f"uploading {os.path.basename(args.file)}") as progress:
        found, deduplicated = registry_io.upload_dataset(
            client, args.name, args.file, labels=args.label, model=args.model, version=args.version,
            fmt=args.format, description=args.description, progress=progress)
    if args.json:
        output.print_json({"dataset": found, "deduplicated": deduplicated})
        return 0
    again = " (already registered with this content)" if deduplicated else ""
    print(f"registered data set {found.name}: {found.num_rows:,} rows, {output.human_bytes(found.size)}, sha256 "
          f"{found.sha256[:12]}, fits {found.model} version {found.model_version}{again}")
    return 0


def cmd_dataset_list(args: argparse.Namespace) -> int:
    from aiaas.eval import registry_io

    with _client(args) as client:
        found = list(registry_io.list_datasets(client))
    if args.json:
        output.print_json(found)
        return 0
    output.print_table([_dataset_row(d) for d in found], ["name", "format", "rows", "size", "model", "labels",
                                                          "features", "created_by"])
    return 0


def cmd_dataset_show(args: argparse.Namespace) -> int:
    from aiaas.eval import registry_io

    with _client(args) as client:
        found = registry_io.get_dataset(client, args.name)
    if args.json:
        output.print_json(found)
        return 0
    output.print_fields(_dataset_row(found))
    return 0


def cmd_dataset_delete(args: argparse.Namespace) -> int:
    from aiaas.eval import registry_io

    with _client(args) as client:
        registry_io.delete_dataset(client, args.name)
    print(f"deleted data set {args.name}")
    return 0


def cmd_dataset_download(args: argparse.Namespace) -> int:
    from aiaas.eval import registry_io

    with _client(args) as client, output.ProgressBar("downloading") as progress:
        found = registry_io.get_dataset(client, args.name)
        dest = args.output or f"{args.name}.{_suffix(found)}"
        registry_io.download_dataset(client, args.name, dest, progress=progress)
    print(f"wrote {dest} (data set {args.name}, sha256 verified)")
    return 0


def _suffix(found: Any) -> str:
    from aiaas.eval.formats import DatasetFormat

    return DatasetFormat.from_pb(found.format).value


# Evaluations -----------------------------------------------------------------------------------

def cmd_evaluate(args: argparse.Namespace) -> int:
    from aiaas.eval import registry_io, report_text
    from aiaas.eval.spec import load_spec
    from aiaas.eval.workflow import Evaluator, Subject, as_dict

    spec = load_spec(args.spec)
    with _client(args) as client:
        version = client.get_version(args.model, args.version)
        progress = None if args.quiet else RowProgress(f"evaluating {args.model} version {version.version}")
        with Evaluator(client, inference_url=args.inference or os.environ.get("AIAAS_INFERENCE_URL"),
                       path=args.path, concurrency=args.concurrency, progress=progress) as evaluator:
            result = evaluator.evaluate(Subject.of(version), args.dataset, spec, args.baseline)
        if not args.no_store:
            result = registry_io.put_evaluation(client, result)
    if args.html:
        from aiaas.eval import report_html

        report_html.write(result, args.html)
    if args.json:
        output.print_json(as_dict(result))
    else:
        print("\n".join(report_text.format_result(result)))
        if args.html:
            print(f"report: {args.html}")
    return 0 if result.passed else EXIT_FAILED


def cmd_evaluations(args: argparse.Namespace) -> int:
    from aiaas.eval import registry_io, report_text

    with _client(args) as client:
        if args.name:
            if not args.version:
                raise ValueError("--name needs the VERSION too")
            results = [registry_io.get_evaluation(client, args.model, int(args.version), args.name)]
        else:
            number = client.get_version(args.model, args.version).version if args.version else 0
            results = list(registry_io.list_evaluations(client, args.model, number))
    if args.json:
        from aiaas.eval.workflow import as_dict

        output.print_json([as_dict(r) for r in results])
        return 0
    if args.name:
        print("\n".join(report_text.format_result(results[0])))
        return 0
    output.print_table([{"version": r.version, "name": r.name, "dataset": r.dataset, "passed": r.passed,
                         "failed": sum(t.outcome == report_text.FAILED for t in r.thresholds),
                         "baseline": r.baseline_version or "", "path": r.path, "actor": r.actor,
                         "time": r.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")} for r in results],
                       ["version", "name", "dataset", "passed", "failed", "baseline", "path", "actor", "time"])
    return 0


# Evaluation gates ------------------------------------------------------------------------------

def cmd_gate_set(args: argparse.Namespace) -> int:
    from aiaas.eval import registry_io
    from aiaas.eval.spec import load_spec
    from aiaas.eval.workflow import gate_requirement
    from aiaas.registry.v1 import evaluation_pb2 as epb

    spec = load_spec(args.spec)
    with _client(args) as client:
        client.get_model(args.model)
        registry_io.get_dataset(client, args.dataset)
        gate = registry_io.get_gate(client, args.model)
        kept = [r for r in gate.required if r.name != spec.name]
        registry_io.put_gate(client, args.model, epb.EvaluationGate(
            required=[*kept, gate_requirement(spec, args.dataset)]))
    print(f"{args.model}: gated aliases now need evaluation {spec.name!r} on data set {args.dataset} passed")
    return 0


def cmd_gate_show(args: argparse.Namespace) -> int:
    from aiaas.eval import registry_io

    with _client(args) as client:
        gate = registry_io.get_gate(client, args.model)
    if args.json:
        output.print_json(gate)
        return 0
    output.print_table([{"evaluation": r.name, "dataset": r.dataset, "spec_sha256": r.spec_sha256[:12]}
                        for r in gate.required], ["evaluation", "dataset", "spec_sha256"])
    return 0


def cmd_gate_remove(args: argparse.Namespace) -> int:
    from aiaas.eval import registry_io
    from aiaas.registry.v1 import evaluation_pb2 as epb

    with _client(args) as client:
        gate = registry_io.get_gate(client, args.model)
        kept = [r for r in gate.required if args.name and r.name != args.name]
        if args.name and len(kept) == len(gate.required):
            raise ValueError(f"model {args.model} requires no evaluation {args.name!r}")
        registry_io.put_gate(client, args.model, epb.EvaluationGate(required=kept))
    print(f"{args.model}: " + (f"evaluation {args.name!r} no longer required" if args.name
                               else "no evaluation required any more"))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `dataset`, `evaluate`, `evaluations` and `eval-gate`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, help="registry address ($AIAAS_REGISTRY_URL, localhost:50051)")
    common.add_argument("--actor", default=None, help="who you are, for the audit log ($AIAAS_ACTOR, $USER)")
    output.add_json_flag(common)

    def command(parent: Any, name: str, func: Callable[[argparse.Namespace], int], help: str,
                description: str | None = None) -> Any:
        parser = parent.add_parser(name, parents=[common], help=help, description=description or help)
        parser.set_defaults(func=_guarded(func))
        return parser

    dataset = subparsers.add_parser("dataset", help="labeled data sets for evaluations")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    reg = command(dataset_sub, "register", cmd_dataset_register,
                  "upload a labeled data set (Parquet, CSV, .npz), checked against a model version's signature",
                  "Columns named after the model's inputs (a list column, or scalar columns NAME[0], NAME[1]...), "
                  "the label column(s), and any other columns to slice by.")
    reg.add_argument("name", help="data set name")
    reg.add_argument("file", help="a .parquet, .csv or .npz file")
    reg.add_argument("--model", required=True, help="model whose signature the columns must fit")
    reg.add_argument("--version", default=None, help="version number or alias to check against (latest)")
    reg.add_argument("--label", action="append", required=True, help="label column (repeatable)")
    reg.add_argument("--format", default=None, help="parquet, csv or npz (default: from the file's suffix)")
    reg.add_argument("--description", default="")
    command(dataset_sub, "list", cmd_dataset_list, "list data sets")
    command(dataset_sub, "show", cmd_dataset_show, "show a data set and its columns").add_argument("name")
    command(dataset_sub, "delete", cmd_dataset_delete, "delete a data set no evaluation gate requires") \
        .add_argument("name")
    download = command(dataset_sub, "download", cmd_dataset_download, "download a data set, sha256-verified")
    download.add_argument("name")
    download.add_argument("-o", "--output", help="destination file")

    evaluate = command(subparsers, "evaluate", cmd_evaluate,
                       "evaluate a version on a data set with a spec; stores the result on the version",
                       "Runs the version through the inference service when --inference names one that serves "
                       "it (else in process, through the loader inference uses), computes the spec's metrics "
                       "per slice, checks its thresholds and stores the result. Exit code 3: a threshold failed.")
    evaluate.add_argument("model", metavar="MODEL")
    evaluate.add_argument("version", metavar="VERSION", help="version number or alias")
    evaluate.add_argument("--dataset", required=True, help="registered data set name")
    evaluate.add_argument("--spec", required=True, help="evaluation spec (YAML)")
    evaluate.add_argument("--baseline", default=None,
                          help="version or alias relative thresholds compare with (default: the spec's baseline)")
    evaluate.add_argument("--html", default=None, metavar="FILE", help="also write a self-contained HTML report")
    evaluate.add_argument("--inference", default=None,
                          help="inference service serving the version ($AIAAS_INFERENCE_URL)")
    evaluate.add_argument("--path", choices=["auto", "serving", "in-process"], default="auto",
                          help="auto: the inference service when it serves the version, else in process")
    evaluate.add_argument("--concurrency", type=int, default=4, help="batches in flight on the serving path")
    evaluate.add_argument("--no-store", action="store_true", help="print the result without storing it")
    evaluate.add_argument("--quiet", action="store_true", help="no progress line")

    listing = command(subparsers, "evaluations", cmd_evaluations,
                      "stored evaluation results of a model or a version (one in full with --name)")
    listing.add_argument("model", metavar="MODEL")
    listing.add_argument("version", metavar="VERSION", nargs="?", help="version number or alias")
    listing.add_argument("--name", default=None, help="show this evaluation in full")

    gate = subparsers.add_parser("eval-gate", help="evaluations a model requires before production moves")
    gate_sub = gate.add_subparsers(dest="gate_command", metavar="ACTION", required=True)
    gate_set = command(gate_sub, "set", cmd_gate_set,
                       "require an evaluation (the spec's name, on a data set) before a gated alias moves")
    gate_set.add_argument("model", metavar="MODEL")
    gate_set.add_argument("--dataset", required=True)
    gate_set.add_argument("--spec", required=True)
    command(gate_sub, "show", cmd_gate_show, "the evaluations a model requires").add_argument("model")
    remove = command(gate_sub, "remove", cmd_gate_remove, "stop requiring one evaluation (or all)")
    remove.add_argument("model", metavar="MODEL")
    remove.add_argument("name", nargs="?", help="evaluation name; all when omitted")
