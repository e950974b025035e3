"""`aiaas keys ...`, `aiaas route ...` and `aiaas predict ...`: the gateway from the shell.

    aiaas keys create [--name N] [--models 'fraud*,resnet'] [--roles infer,read] [--rps R --burst B] [--tokens-per-minute T]
                      [--expires-in 30d] [--registry URL]     the token is printed once
    aiaas keys list [--all]
    aiaas keys revoke KEY_ID [--reason TEXT]
    aiaas keys rotate KEY_ID [--reason TEXT]                  a new key like it (token printed once), then it revoked
    aiaas keys expire KEY_ID [--in 1h]
    aiaas route set MODEL --split production=90,canary=10 [--sticky] [--shadow shadow=0.05] [--rps R]
    aiaas route show [MODEL]
    aiaas route delete MODEL
    aiaas predict MODEL --input input='[[1,2,3]]' [--input other=@x.npy] [--alias A | --version N] [--id ID]
    aiaas feedback MODEL REQUEST_ID --label 2 [--label 0 ...] [--score 0.8]   labels one per row:
                                              an integer is a class id, a number a value, else a text

The gateway is `--gateway`, else `AIAAS_GATEWAY_URL`, else localhost:8001; the key is `--api-key`,
else `AIAAS_API_KEY`. A key creates only keys within its own models, roles and expiry.
`keys create --registry URL` writes the key straight into the registry (to recover when no admin
key is left; it needs the gateways' pepper in `AIAAS_GATEWAY_KEY_PEPPER`). Rotate the bootstrap
admin key of `aiaas up` or `--bootstrap-admin-key` with `aiaas keys rotate <its id> --api-key <it>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiaas.cli import output

DEFAULT_GATEWAY = "localhost:8001"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '12h', '30d' -> seconds."""
    text = text.strip()
    unit = _UNITS.get(text[-1:], None)
    try:
        return float(text[:-1]) * unit if unit else float(text)
    except ValueError:
        raise SystemExit(f"bad duration {text!r}: use e.g. 90s, 15m, 12h, 30d") from None


def parse_pairs(text: str, kind: Callable[[str], Any]) -> dict[str, Any]:
    """'production=90,canary=10' -> {'production': 90, 'canary': 10}."""
    pairs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise SystemExit(f"expected name=value, got {part!r}")
        try:
            pairs[name.strip()] = kind(value)
        except ValueError:
            raise SystemExit(f"bad value in {part!r}") from None
    return pairs


def _print(args: argparse.Namespace, data: Any, columns: Sequence[str] | None = None) -> None:
    if args.json:
        output.print_json(data)
    elif columns is None:
        output.print_fields(data)
    else:
        output.print_table(data, columns)


def _client(args: argparse.Namespace) -> Any:
    from aiaas.gateway_client import GatewayClient

    return GatewayClient(args.gateway, api_key=args.api_key, timeout=args.timeout)


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import grpc
        from tritonclient.utils import InferenceServerException

        try:
            return func(args)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
        except InferenceServerException as exc:
            status = str(exc.status() or "").replace("StatusCode.", "") or "ERROR"
            print(f"error: {status}: {exc.message()}", file=sys.stderr)
            return 1

    return run


# keys ------------------------------------------------------------------------------------------

def cmd_keys_create(args: argparse.Namespace) -> int:
    from aiaas.gateway_client import key_to_dict

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    expires = parse_duration(args.expires_in) if args.expires_in else None
    if args.registry:
        key, token = _create_in_registry(args, models, roles, expires)
    else:
        with _client(args) as client:
            key, token = client.create_key(args.name, models=models, roles=roles, rps=args.rps, burst=args.burst,
                                           expires_in_s=expires, tokens_per_minute=args.tokens_per_minute)
    data = {**key_to_dict(key), "token": token}
    _print(args, data)
    if not args.json:
        print("\nThe token is shown once; it cannot be recovered. Send it as `authorization: Bearer <token>`.",
              file=sys.stderr)
    return 0


def _create_in_registry(args: argparse.Namespace, models: list[str], roles: list[str],
                        expires: float | None) -> tuple[Any, str]:

    from aiaas.api_keys import ROLE_NAMES, QuotaSpec, key_to_pb, make_key, stored_key_record
    from aiaas.registry.v1 import registry_pb2, registry_pb2_grpc

    pepper = os.environ.get("AIAAS_GATEWAY_KEY_PEPPER") or os.environ.get("AIAAS_KEY_PEPPER")
    if not pepper:
        raise SystemExit("--registry needs the gateways' pepper in AIAAS_GATEWAY_KEY_PEPPER")
    unknown = [r for r in roles if r not in ROLE_NAMES]
    if unknown:
        raise SystemExit(f"unknown role(s) {unknown}: use {', '.join(ROLE_NAMES)}")
    entry, token = make_key(
        pepper.encode(), name=args.name, models=tuple(models) or ("*",),
        roles=frozenset(ROLE_NAMES[r] for r in roles), created_by="cli",
        expire_time=time.time() + expires if expires else None,
        quota=(QuotaSpec(args.rps, args.burst, args.tokens_per_minute)
               if args.rps or args.tokens_per_minute else None),
    )
    from aiaas.identity import ClientIdentity

    with ClientIdentity.from_env().channel(args.registry) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        stub.PutRecord(registry_pb2.PutRecordRequest(record=stored_key_record(entry), expected_revision=0,
                                                     actor="cli"), timeout=args.timeout)
    return key_to_pb(entry), token


def cmd_keys_list(args: argparse.Namespace) -> int:
    from aiaas.gateway_client import key_to_dict

    with _client(args) as client:
        keys = [key_to_dict(k) for k in client.list_keys(include_inactive=args.all)]
    _print(args, keys, ["key_id", "name", "models", "roles", "rps", "expires", "revoked"])
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from aiaas.gateway_client import key_to_dict

    with _client(args) as client:
        _print(args, key_to_dict(client.revoke_key(args.key_id, args.reason)))
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """A new key with the old one's name, models, roles, quota and expiry; then the old one revoked."""
    import grpc

    from aiaas.gateway_client import ROLE_NAMES, key_to_dict

    with _client(args) as client:
        old = next((k for k in client.list_keys(include_inactive=True) if k.key_id == args.key_id), None)
        if old is None:
            raise SystemExit(f"API key {args.key_id} not found among the keys yours may manage")
        if old.revoked:
            raise SystemExit(f"API key {args.key_id} is already revoked")
        expires = old.expire_time.ToNanoseconds() / 1e9 - time.time() if old.HasField("expire_time") else None
        if expires is not None and expires <= 0:
            raise SystemExit(f"API key {args.key_id} has expired; create a new key instead")
        new, token = client.create_key(
            old.name, models=list(old.models), roles=[ROLE_NAMES[r] for r in old.roles],
            rps=old.quota.requests_per_second, burst=old.quota.burst, expires_in_s=expires,
            tokens_per_minute=old.quota.tokens_per_minute,
        )
        data = {**key_to_dict(new), "token": token, "replaces": old.key_id}
        try:
            client.revoke_key(old.key_id, args.reason or f"rotated to {new.key_id}")
        except grpc.RpcError:
            print(f"error: the new key {new.key_id} exists (below) but {old.key_id} was not revoked:", file=sys.stderr)
            _print(args, data)
            raise
    _print(args, data)
    if not args.json:
        print(f"\n{old.key_id} is revoked. The new token is shown once; it cannot be recovered.", file=sys.stderr)
    return 0


def cmd_keys_expire(args: argparse.Namespace) -> int:
    from aiaas.gateway_client import key_to_dict

    at = time.time() + parse_duration(args.within) if args.within else None
    with _client(args) as client:
        _print(args, key_to_dict(client.expire_key(args.key_id, at)))
    return 0


# routes ----------------------------------------------------------------------------------------

def cmd_route_set(args: argparse.Namespace) -> int:
    from aiaas.gateway_client import route_to_dict

    with _client(args) as client:
        route, revision = client.set_route(
            args.model, parse_pairs(args.split or "", int), sticky=args.sticky,
            shadows=parse_pairs(args.shadow or "", float), rps=args.rps, burst=args.burst,
            tokens_per_minute=args.tokens_per_minute, expected_revision=args.expected_revision, reason=args.reason,
        )
    _print(args, {**route_to_dict(route), "revision": revision})
    return 0


def cmd_route_show(args: argparse.Namespace) -> int:
    from aiaas.gateway_client import route_to_dict

    with _client(args) as client:
        if args.model:
            reply = client.get_route(args.model)
            _print(args, {**route_to_dict(reply.route), "revision": reply.revision,
                          "resolves_to": dict(reply.resolved)})
        else:
            _print(args, [route_to_dict(r) for r in client.list_routes()],
                   ["model", "splits", "sticky", "shadows", "rps"])
    return 0


def cmd_route_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_route(args.model, args.reason)
    if not args.json:
        print(f"route of {args.model} deleted")
    return 0


# predict ---------------------------------------------------------------------------------------

def read_inputs(values: Sequence[str]) -> dict[str, Any]:
    """`name=JSON` (nested list, float32 unless integers) or `name=@file.npy`."""
    import numpy as np

    inputs: dict[str, Any] = {}
    for value in values:
        name, sep, data = value.partition("=")
        if not sep:
            raise SystemExit(f"--input expects name=JSON or name=@file.npy, got {value!r}")
        if data.startswith("@"):
            inputs[name] = np.load(data[1:], allow_pickle=False)
            continue
        array = np.array(json.loads(data))
        inputs[name] = array.astype(np.float32) if array.dtype.kind == "f" else array
    return inputs


def cmd_predict(args: argparse.Namespace) -> int:
    with _client(args) as client:
        prediction = client.predict(args.model, read_inputs(args.input), version=args.version or "",
                                    alias=args.alias or "", routing_key=args.routing_key or "",
                                    request_id=args.id or "")
    data = {"model": args.model, "version": prediction.model_version,
            "outputs": {k: v.tolist() for k, v in prediction.outputs.items()}}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(f"{args.model} version {prediction.model_version}")
        for name, value in prediction.outputs.items():
            print(f"  {name} {list(value.shape)} {value.dtype}: {value.tolist()}")
    return 0


def parse_label(text: str) -> int | float | str:
    """'3' -> class 3, '0.25' -> number 0.25, anything else -> text."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def cmd_feedback(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.feedback(args.model, args.request_id, [parse_label(v) for v in args.label or ()],
                                score=args.score)
    data = {"model": args.model, "request_id": args.request_id, "version": reply.version, "alias": reply.alias,
            "predicted": list(reply.predicted), "class_labels": reply.class_labels, "correct": reply.correct,
            "value_labels": reply.value_labels, "mean_abs_error": reply.mean_abs_error}
    _print(args, data)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this area's commands to the top-level parser."""

    def common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--gateway", default=os.environ.get("AIAAS_GATEWAY_URL", DEFAULT_GATEWAY),
                            help="gateway address (env AIAAS_GATEWAY_URL)")
        parser.add_argument("--api-key", default=os.environ.get("AIAAS_API_KEY"), help="env AIAAS_API_KEY")
        parser.add_argument("--timeout", type=float, default=30.0)
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        return parser

    keys = subparsers.add_parser("keys", help="gateway API keys").add_subparsers(dest="keys_command",
                                                                                 metavar="ACTION", required=True)
    create = common(keys.add_parser("create", help="make a key (its token is shown once)"))
    create.add_argument("--name", default="")
    create.add_argument("--models", default="",
                        help="comma-separated model patterns (fnmatch); default: those of the key creating it")
    create.add_argument("--roles", default="infer,read", help="comma-separated: infer, read, priority, admin")
    create.add_argument("--expires-in", help="e.g. 12h, 30d; default: when the key creating it expires")
    create.add_argument("--rps", type=float, default=0.0, help="requests per second (0: gateway default)")
    create.add_argument("--burst", type=int, default=0)
    create.add_argument("--tokens-per-minute", type=float, default=0.0,
                        help="prompt + completion tokens of generative requests per minute (0: gateway default)")
    create.add_argument("--registry", help="write to this registry directly (bootstrap); needs the pepper")
    create.set_defaults(func=_guard(cmd_keys_create))
    listing = common(keys.add_parser("list", help="list keys"))
    listing.add_argument("--all", action="store_true", help="include revoked and expired keys")
    listing.set_defaults(func=_guard(cmd_keys_list))
    revoke = common(keys.add_parser("revoke", help="revoke a key for good"))
    revoke.add_argument("key_id")
    revoke.add_argument("--reason", default="")
    revoke.set_defaults(func=_guard(cmd_keys_revoke))
    rotate = common(keys.add_parser("rotate", help="replace a key by a new one like it, and revoke it"))
    rotate.add_argument("key_id")
    rotate.add_argument("--reason", default="")
    rotate.set_defaults(func=_guard(cmd_keys_rotate))
    expire = common(keys.add_parser("expire", help="set a key's expiry (now by default)"))
    expire.add_argument("key_id")
    expire.add_argument("--in", dest="within", help="expire after this long, e.g. 1h")
    expire.set_defaults(func=_guard(cmd_keys_expire))

    route = subparsers.add_parser("route", help="gateway routes (splits, sticky, shadows)").add_subparsers(
        dest="route_command", metavar="ACTION", required=True)
    set_route = common(route.add_parser("set", help="create or replace a model's route"))
    set_route.add_argument("model")
    set_route.add_argument("--split", help="alias=weight,... (a number instead of an alias pins a version)")
    set_route.add_argument("--sticky", action="store_true", help="same routing key, same version")
    set_route.add_argument("--shadow", help="alias=sample_rate,... mirrored off the response path")
    set_route.add_argument("--rps", type=float, default=0.0, help="model quota, requests per second")
    set_route.add_argument("--burst", type=int, default=0)
    set_route.add_argument("--tokens-per-minute", type=float, default=0.0,
                           help="model quota, generated + prompt tokens per minute across keys")
    set_route.add_argument("--expected-revision", type=int, default=0, help="compare-and-set (0: no check)")
    set_route.add_argument("--reason", default="")
    set_route.set_defaults(func=_guard(cmd_route_set))
    show = common(route.add_parser("show", help="one route (with what its aliases resolve to) or all"))
    show.add_argument("model", nargs="?")
    show.set_defaults(func=_guard(cmd_route_show))
    delete = common(route.add_parser("delete", help="remove a model's route"))
    delete.add_argument("model")
    delete.add_argument("--reason", default="")
    delete.set_defaults(func=_guard(cmd_route_delete))

    predict = common(subparsers.add_parser("predict", help="one inference call through the gateway"))
    predict.add_argument("model")
    predict.add_argument("--input", action="append", required=True, help="name=JSON or name=@file.npy")
    predict.add_argument("--version")
    predict.add_argument("--alias")
    predict.add_argument("--routing-key")
    predict.add_argument("--id", help="request id, to send feedback for this prediction later")
    predict.set_defaults(func=_guard(cmd_predict))

    feedback = common(subparsers.add_parser("feedback", help="label (or score) an earlier request by its id"))
    feedback.add_argument("model")
    feedback.add_argument("request_id")
    feedback.add_argument("--label", action="append",
                          help="the truth for one row (repeat per row): an integer class id, a number, or a text")
    feedback.add_argument("--score", type=float, help="the prediction's score, 0 (bad) .. 1 (good)")
    feedback.set_defaults(func=_guard(cmd_feedback))
