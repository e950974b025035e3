"""`aiaas` commands for the registry: models, register, versions, alias, rollback, audit, download."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiaas import _registry_convert as conv
from aiaas.cli import output
from aiaas.formats import ArtifactFormat
from aiaas.registry.v1 import registry_pb2 as pb
from aiaas.registry_client import RegistryClient, RegistryError

DEFAULT_REGISTRY = "localhost:50051"
_RELATIVE = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _client(args: argparse.Namespace) -> RegistryClient:
    target = args.registry or os.environ.get("AIAAS_REGISTRY_URL") or DEFAULT_REGISTRY
    return RegistryClient(target, actor=args.actor or "")


def _when(text: str | None) -> datetime | None:
    """`2026-01-31T12:00:00`, `2026-01-31`, or an age such as `30m`, `6h`, `7d`."""
    if not text:
        return None
    match = _RELATIVE.fullmatch(text.strip())
    if match:
        return datetime.now(UTC) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"cannot read time {text!r}: use ISO 8601 (2026-01-31T12:00) or an age (30m, 6h, 7d)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _time(ts: Any) -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S") if ts.seconds or ts.nanos else ""


def _shape(spec: pb.TensorSpec) -> str:
    return f"{spec.name}:{spec.datatype}:{','.join(str(d) for d in spec.shape)}"


def _version_row(v: pb.ModelVersion) -> dict[str, Any]:
    lineage = f"{v.lineage.parent_model or v.model}/{v.lineage.parent_version}" if v.lineage.parent_version else ""
    size = sum(f.size for f in v.files) if v.files else v.artifact_size
    return {
        "version": v.version, "format": conv.format_name(v.format), "size": output.human_bytes(size),
        "sha256": v.artifact_sha256[:12], "aliases": list(v.aliases),
        "inputs": " ".join(_shape(t) for t in v.signature.inputs),
        "outputs": " ".join(_shape(t) for t in v.signature.outputs),
        "lineage": f"{lineage} {v.lineage.transformation}".strip(), "created_by": v.created_by,
        "created": _time(v.create_time),
    }


def _move_row(m: pb.AliasMove) -> dict[str, Any]:
    return {"time": _time(m.time), "alias": m.alias, "from": m.from_version or "-", "to": m.to_version or "-",
            "actor": m.actor, "reason": m.reason}


def cmd_models_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = list(client.list_models())
    if args.json:
        output.print_json(models)
        return 0
    output.print_table([{"name": m.name, "latest": m.latest_version, "aliases": dict(m.aliases),
                         "description": m.description, "updated": _time(m.update_time)} for m in models],
                       ["name", "latest", "aliases", "description", "updated"])
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = client.get_model(args.name)
        versions = list(client.list_versions(args.name))
    if args.json:
        output.print_json({"model": model, "versions": versions})
        return 0
    output.print_fields({"name": model.name, "description": model.description, "labels": dict(model.labels),
                         "aliases": dict(model.aliases), "latest version": model.latest_version,
                         "created": f"{_time(model.create_time)} by {model.created_by}"})
    print()
    output.print_table([_version_row(v) for v in versions], ["version", "format", "size", "aliases", "inputs",
                                                             "outputs", "lineage", "created"])
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    with _client(args) as client:
        versions = list(client.list_versions(args.name))
    if args.json:
        output.print_json(versions)
        return 0
    output.print_table([_version_row(v) for v in versions],
                       ["version", "format", "size", "sha256", "aliases", "lineage", "created_by", "created"])
    return 0


def _signature(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.signature:
        signature = json.loads(Path(args.signature).read_text())
        if args.input or args.output:
            raise ValueError("give --signature FILE or --input/--output, not both")
        return dict(signature)
    if not args.input and not args.output and ArtifactFormat.parse(args.format).multi_file:
        return None  # a checkpoint speaks text: a tensor signature is optional
    if not args.input or not args.output:
        raise ValueError("a signature is required: --input NAME:DATATYPE:SHAPE and --output ... (repeatable), "
                         "or --signature sig.json")
    return {"inputs": args.input, "outputs": args.output}


def _serving_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for key in ("max_batch_size", "max_queue_delay_us", "instance_count", "device", "kv_cache_tokens",
                "max_num_seqs", "max_num_batched_tokens", "engine"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.preferred_batch_sizes:
        config["preferred_batch_sizes"] = [int(s) for s in args.preferred_batch_sizes.split(",") if s.strip()]
    return config


def _metadata(pairs: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata {pair!r}: write KEY=VALUE (VALUE may be JSON)")
        try:
            found[key] = json.loads(value)
        except ValueError:
            found[key] = value
    return found


def cmd_register(args: argparse.Namespace) -> int:
    lineage = {"parent_version": args.parent_version or 0, "transformation": args.transformation or "",
               "parent_model": args.parent_model or ""}
    with _client(args) as client, output.ProgressBar(f"uploading {Path(args.file).resolve().name}") as progress:
        version = client.register(
            args.name, Path(args.file), format=args.format, signature=_signature(args),
            serving_config=_serving_config(args), metadata=_metadata(args.metadata), lineage=lineage,
            create_model=not args.no_create, progress=progress)
        if args.alias:
            client.set_alias(args.name, args.alias, version.version, reason="aiaas register")
            version = client.get_version(args.name, version.version)
    if args.json:
        output.print_json(version)
    else:
        size = _version_row(version)["size"]
        files = f"{len(version.files)} files, " if version.files else ""
        print(f"registered {version.model} version {version.version} "
              f"({files}{size}, sha256 {version.artifact_sha256[:12]})"
              + (f", alias {args.alias}" if args.alias else ""))
    return 0


def cmd_alias_set(args: argparse.Namespace) -> int:
    with _client(args) as client:
        move = client.set_alias(args.name, args.alias, args.version, expected_version=args.expect, reason=args.reason)
    return _print_move(args, move)


def cmd_rollback(args: argparse.Namespace) -> int:
    with _client(args) as client:
        move = client.rollback_alias(args.name, args.alias, reason=args.reason)
    return _print_move(args, move)


def _print_move(args: argparse.Namespace, move: pb.AliasMove) -> int:
    if args.json:
        output.print_json(move)
    else:
        print(f"{move.model}:{move.alias} -> version {move.to_version} (was {move.from_version or 'unset'})")
    return 0


def cmd_alias_history(args: argparse.Namespace) -> int:
    with _client(args) as client:
        moves = client.alias_history(args.name, args.alias or "", limit=args.limit)
    if args.json:
        output.print_json(moves)
        return 0
    output.print_table([_move_row(m) for m in moves], ["time", "alias", "from", "to", "actor", "reason"])
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        events = []
        for event in client.audit_events(model=args.model or "", since=_when(args.since), until=_when(args.until)):
            events.append(event)
            if len(events) >= args.limit:
                break
    if args.json:
        output.print_json(events)
        return 0
    output.print_table([{"time": _time(e.time), "actor": e.actor, "action": e.action, "model": e.model,
                         "version": e.version or "", "details": json.dumps(output.jsonable(e.details), sort_keys=True)}
                        for e in events], ["time", "actor", "action", "model", "version", "details"])
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as client, output.ProgressBar("downloading") as progress:
        if client.get_version(args.name, args.version).files:
            dest = args.output or f"{args.name}-{args.version}"
            version = client.download_files(args.name, args.version, dest, progress=progress)
            print(f"wrote {dest}/ ({version.model} version {version.version}, {len(version.files)} files, "
                  "each sha256 verified)")
            return 0
        dest = args.output or f"{args.name}-{args.version}.bin"
        version = client.download_artifact(args.name, args.version, dest, progress=progress)
    print(f"wrote {dest} ({version.model} version {version.version}, sha256 verified)")
    return 0


def _format_name(text: str) -> str:
    return text.strip().lower().replace("-", "_")


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except RegistryError as exc:
            return output.error(f"{exc.code().name}: {exc.details()}")
        except (ValueError, OSError) as exc:
            return output.error(str(exc), 2)

    return run


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this area's commands to the top-level parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, help="registry address ($AIAAS_REGISTRY_URL, localhost:50051)")
    common.add_argument("--actor", default=None, help="who you are, for the audit log ($AIAAS_ACTOR, $USER)")
    output.add_json_flag(common)

    def command(parent: Any, name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        parser = parent.add_parser(name, parents=[common], help=help, description=help)
        parser.set_defaults(func=_guarded(func))
        return parser

    models = subparsers.add_parser("models", help="list and show registered models")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    command(models_sub, "list", cmd_models_list, "list models")
    command(models_sub, "show", cmd_models_show, "show a model, its aliases and versions").add_argument("name")

    reg = command(subparsers, "register", cmd_register, "upload a model artifact as a new version")
    reg.add_argument("name", help="model name (created when missing unless --no-create)")
    reg.add_argument("file", help="artifact file, or checkpoint directory (--format hf-causal-lm)")
    reg.add_argument("--format", required=True, choices=sorted(conv.FORMATS), type=_format_name,
                     help="artifact format ('-' or '_' alike)")
    reg.add_argument("--input", action="append", default=[], metavar="NAME:DATATYPE:SHAPE",
                     help="input tensor, e.g. x:FP32:-1,10 (repeatable)")
    reg.add_argument("--output", action="append", default=[], metavar="NAME:DATATYPE:SHAPE",
                     help="output tensor, e.g. y:FP32:-1,2 (repeatable)")
    reg.add_argument("--signature", help='JSON file: {"inputs": [{"name", "datatype", "shape"}], "outputs": [...]}')
    reg.add_argument("--max-batch-size", type=int, dest="max_batch_size")
    reg.add_argument("--preferred-batch-sizes", help="e.g. 4,8")
    reg.add_argument("--max-queue-delay-us", type=int, dest="max_queue_delay_us")
    reg.add_argument("--instance-count", type=int, dest="instance_count")
    reg.add_argument("--device", help="cpu, cuda or cuda:N")
    reg.add_argument("--kv-cache-tokens", type=int, dest="kv_cache_tokens",
                     help="hf-causal-lm: each instance's KV-cache budget in tokens")
    reg.add_argument("--max-num-seqs", type=int, dest="max_num_seqs",
                     help="hf-causal-lm: sequences in one instance's running batch")
    reg.add_argument("--max-num-batched-tokens", type=int, dest="max_num_batched_tokens",
                     help="hf-causal-lm: tokens in one forward pass")
    reg.add_argument("--engine", choices=("builtin", "vllm"),
                     help="hf-causal-lm: the generative engine (default builtin; vllm where the inference service has it)")
    reg.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    reg.add_argument("--parent-version", type=int, help="lineage: the version this one derives from")
    reg.add_argument("--parent-model", help="lineage: the parent's model when it is another one")
    reg.add_argument("--transformation", help="lineage: what produced it, e.g. quantize:int8-dynamic")
    reg.add_argument("--alias", help="point this alias at the new version")
    reg.add_argument("--no-create", action="store_true", help="fail when the model does not exist")

    command(subparsers, "versions", cmd_versions, "list a model's versions").add_argument("name")

    alias = subparsers.add_parser("alias", help="move aliases and show their history")
    alias_sub = alias.add_subparsers(dest="alias_command", metavar="ACTION", required=True)
    alias_set = command(alias_sub, "set", cmd_alias_set, "point an alias at a version")
    alias_set.add_argument("name")
    alias_set.add_argument("alias")
    alias_set.add_argument("version", type=int)
    alias_set.add_argument("--expect", type=int, default=None,
                           help="compare-and-set: only move when the alias points at this version (0: unset)")
    alias_set.add_argument("--reason", default="")
    history = command(alias_sub, "history", cmd_alias_history, "an alias's moves, newest first")
    history.add_argument("name")
    history.add_argument("alias", nargs="?", help="one alias; all of the model's when omitted")
    history.add_argument("--limit", type=int, default=100)

    rollback = command(subparsers, "rollback", cmd_rollback, "move an alias back to its previous version")
    rollback.add_argument("name")
    rollback.add_argument("alias")
    rollback.add_argument("--reason", default="")

    audit = command(subparsers, "audit", cmd_audit, "the audit log, newest first")
    audit.add_argument("--model")
    audit.add_argument("--since", help="ISO time or age (30m, 6h, 7d)")
    audit.add_argument("--until", help="ISO time or age")
    audit.add_argument("--limit", type=int, default=50)

    download = command(subparsers, "download", cmd_download,
                       "download a version's artifact (a checkpoint: its files, resumably), sha256-verified")
    download.add_argument("name")
    download.add_argument("version", help="number or alias")
    download.add_argument("-o", "--output", help="destination file (a checkpoint: directory; run again to resume)")
