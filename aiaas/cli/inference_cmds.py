"""`aiaas inference ...`: talk to an inference service (KServe v2 gRPC) with tritonclient.

    aiaas inference status                      server live/ready and the models it serves
    aiaas inference models                      repository index (loaded and registry models)
    aiaas inference load MODEL [--version N | --alias A]
    aiaas inference unload MODEL [--version N]
    aiaas inference stats [MODEL] [--version N]
    aiaas inference infer MODEL --inputs '{"input": [[...]]}' [--version N]

Tables for people, `--json` for scripts. The service address comes from `--url`, else
`AIAAS_INFERENCE_URL`, else localhost:50052.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiaas.cli import output

DEFAULT_URL = "localhost:50052"


def _client(args: argparse.Namespace) -> Any:
    import tritonclient.grpc as tc

    return tc.InferenceServerClient(args.url)


def _print(args: argparse.Namespace, data: Any, columns: Sequence[str] | None = None) -> None:
    if args.json:
        output.print_json(data)
    elif columns is None:
        output.print_fields(data)
    else:
        output.print_table(data, columns)


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from tritonclient.utils import InferenceServerException

        try:
            return func(args)
        except InferenceServerException as exc:
            status = str(exc.status() or "").replace("StatusCode.", "") or "ERROR"
            print(f"error: {status}: {exc.message()}", file=sys.stderr)
            return 1

    return run


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        index = client.get_model_repository_index().models
        _print(args, {
            "url": args.url,
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "models": sorted(f"{m.name}/{m.version}" for m in index if m.state == "READY"),
        })
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = [{"model": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                  for m in client.get_model_repository_index().models]
    _print(args, models, ["model", "version", "state", "reason"])
    return 0


def _repository_stub(args: argparse.Namespace) -> tuple[Any, Any]:
    from tritonclient.grpc import service_pb2_grpc

    from aiaas.identity import ClientIdentity

    channel = ClientIdentity.from_env().channel(args.url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _call(method: Any, request: Any, timeout: float) -> None:
    import grpc

    try:
        method(request, timeout=timeout)
    except grpc.RpcError as exc:
        from tritonclient.utils import InferenceServerException

        raise InferenceServerException(msg=exc.details(), status=str(exc.code())) from None


def cmd_load(args: argparse.Namespace) -> int:
    from tritonclient.grpc import service_pb2

    request = service_pb2.RepositoryModelLoadRequest(model_name=args.model)
    if args.version:
        request.parameters["version"].int64_param = args.version
    if args.alias:
        request.parameters["alias"].string_param = args.alias
    channel, stub = _repository_stub(args)
    with channel:
        _call(stub.RepositoryModelLoad, request, args.timeout)
    print(f"loaded {args.model}", file=sys.stderr)
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    from tritonclient.grpc import service_pb2

    request = service_pb2.RepositoryModelUnloadRequest(model_name=args.model)
    if args.version:
        request.parameters["version"].int64_param = args.version
    channel, stub = _repository_stub(args)
    with channel:
        _call(stub.RepositoryModelUnload, request, args.timeout)
    print(f"unloaded {args.model}", file=sys.stderr)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.get_inference_statistics(args.model or "", str(args.version or "")).model_stats
    rows = []
    for s in stats:
        infer = s.inference_stats
        success = infer.success.count or 1
        rows.append({
            "model": s.name, "version": s.version, "success": infer.success.count, "fail": infer.fail.count,
            "inferences": s.inference_count, "executions": s.execution_count,
            "mean_batch": round(s.inference_count / s.execution_count, 2) if s.execution_count else 0,
            "mean_ms": round(infer.success.ns / success / 1e6, 3),
            "queue_ms": round(infer.queue.ns / success / 1e6, 3),
            "compute_ms": round(infer.compute_infer.ns / success / 1e6, 3),
        })
    _print(args, rows, ["model", "version", "success", "fail", "inferences", "executions", "mean_batch",
                        "mean_ms", "queue_ms", "compute_ms"])
    return 0


def _read_inputs(text: str) -> dict[str, Any]:
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit("--inputs must be a JSON object of input name to nested list")
    return data


def cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import triton_to_np_dtype

    values = _read_inputs(args.inputs)
    with _client(args) as client:
        meta = client.get_model_metadata(args.model, str(args.version or ""))
        by_name = {t.name: t.datatype for t in meta.inputs}
        inputs = []
        for name, value in values.items():
            datatype = by_name.get(name, "FP32")
            if datatype == "BYTES":
                array = np.array([str(v).encode() for v in np.ravel(value)], dtype=object).reshape(np.shape(value))
            else:
                array = np.asarray(value, dtype=triton_to_np_dtype(datatype))
            tensor = tc.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer(args.model, inputs, model_version=str(args.version or ""))
    response = result.get_response()
    outputs = {}
    for tensor in response.outputs:
        array = result.as_numpy(tensor.name)
        data = [v.decode(errors="replace") for v in array.ravel()] if array.dtype == object else array.ravel().tolist()
        outputs[tensor.name] = {"datatype": tensor.datatype, "shape": list(tensor.shape), "data": data}
    payload = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(f"{response.model_name} version {response.model_version}")
        for name, out in outputs.items():
            print(f"  {name} {out['datatype']} {out['shape']}: {out['data'][:16]}{' ...' if len(out['data']) > 16 else ''}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this area's commands to the top-level parser."""
    parser = subparsers.add_parser("inference", help="inspect and control an inference service")
    commands = parser.add_subparsers(dest="inference_command", metavar="COMMAND")
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--url", default=os.environ.get("AIAAS_INFERENCE_URL", DEFAULT_URL),
                         help=f"inference service address (env AIAAS_INFERENCE_URL, default {DEFAULT_URL})")
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.set_defaults(func=_guard(func))
        return sub

    add("status", cmd_status, "server live/ready and the versions it serves")
    add("models", cmd_models, "repository index: loaded versions and registry models")
    load = add("load", cmd_load, "load a model version (the default alias's, else the latest)")
    load.add_argument("model")
    load.add_argument("--version", type=int, default=0)
    load.add_argument("--alias", default="")
    load.add_argument("--timeout", type=float, default=300.0)
    unload = add("unload", cmd_unload, "unload a model (or one version), draining in-flight requests")
    unload.add_argument("model")
    unload.add_argument("--version", type=int, default=0)
    unload.add_argument("--timeout", type=float, default=300.0)
    stats = add("stats", cmd_stats, "Triton-style statistics per version")
    stats.add_argument("model", nargs="?", default="")
    stats.add_argument("--version", type=int, default=0)
    infer = add("infer", cmd_infer, "run one request from JSON inputs")
    infer.add_argument("model")
    infer.add_argument("--version", type=int, default=0)
    infer.add_argument("--inputs", required=True, help="JSON object name -> nested list, or @file.json")
