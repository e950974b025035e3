"""`aiaas convert`, `aiaas optimize`, `aiaas promote` and `aiaas up`.

Exit codes: 0 done, 1 error, 3 the parity gate or an evaluation (`--evaluate`) refused the candidate
(its report is printed; `--force` registers it anyway, marked as forced).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_REFUSED = 3


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `convert`, `optimize`, `promote` and `up`."""
    convert = subparsers.add_parser(
        "convert", help="export a module (package.module:factory + safetensors) or a version to a new version",
        description="Export `package.module:factory` with its safetensors weights and register it "
                    "(aiaas convert pkg.mod:make --weights w.safetensors --input-shape 10 --name NAME), "
                    "or convert a registered version to ONNX (aiaas convert MODEL VERSION --to onnx).",
    )
    convert.add_argument("source", metavar="FACTORY|MODEL", help="package.module:factory, or a registered model")
    convert.add_argument("version", metavar="VERSION", nargs="?", help="version or alias (with MODEL)")
    convert.add_argument("--weights", help="safetensors state dict to load into the factory's module")
    convert.add_argument("--name", help="model to register the version under")
    convert.add_argument("--format", "--to", dest="format", default=None,
                         help="torch_export (default), torchscript or onnx; a version converts to onnx")
    convert.add_argument("--input-shape", action="append", default=[], metavar="D1,D2,...",
                         help="shape of one input without its batch dimension; once per input")
    convert.add_argument("--input-dtype", action="append", default=[], metavar="DTYPE",
                         help="FP32 (default), INT64, ...; once per input, in order")
    convert.add_argument("--input-name", action="append", default=None, help="input names (INPUT0, ...)")
    convert.add_argument("--output-name", action="append", default=None, help="output names (OUTPUT0, ...)")
    convert.add_argument("--max-batch-size", type=int, default=32)
    convert.add_argument("--preferred-batch-size", type=int, action="append", default=[])
    convert.add_argument("--max-queue-delay-us", type=int, default=1000)
    convert.add_argument("--instance-count", type=int, default=1)
    convert.add_argument("--device", default="cpu")
    _gate_flags(convert)
    convert.set_defaults(func=cmd_convert)

    optimize = subparsers.add_parser(
        "optimize", help="make a quantized, lower-precision or graph-optimized version of a version",
        description="Transform a version into a new one whose lineage names its parent, gated by parity.",
    )
    optimize.add_argument("model", metavar="MODEL")
    optimize.add_argument("version", metavar="VERSION", help="version number or alias")
    what = optimize.add_mutually_exclusive_group(required=True)
    what.add_argument("--quantize", choices=["int8-dynamic"], help="dynamic int8 quantization of Linear layers")
    what.add_argument("--dtype", choices=["fp16", "bf16"], help="run in fp16/bf16; inputs and outputs stay FP32")
    what.add_argument("--ort-optimize", nargs="?", const="extended", choices=["basic", "extended", "all"],
                      help="ONNX Runtime graph optimization of an ONNX version (level: extended)")
    _gate_flags(optimize)
    optimize.set_defaults(func=cmd_optimize)

    promote = subparsers.add_parser(
        "promote", help="point an alias at a version (a rollout step); canary takes a traffic weight",
        description="aiaas promote MODEL VERSION --alias canary --weight 10, then --alias production. "
                    "`aiaas rollback MODEL ALIAS` undoes a step.",
    )
    promote.add_argument("model", metavar="MODEL")
    promote.add_argument("version", metavar="VERSION", type=int)
    promote.add_argument("--alias", default="production", help="alias to move (production)")
    promote.add_argument("--weight", type=int, default=None,
                         help="percent of the model's traffic the alias gets through the gateway (canary)")
    promote.add_argument("--reason", default="", help="recorded in the audit log")
    promote.add_argument("--force", action="store_true",
                         help="move production past the model's evaluation gate (needs --reason, audited)")
    promote.add_argument("--registry", default=None, help="registry address ($AIAAS_REGISTRY_URL, localhost:50051)")
    promote.add_argument("--gateway", default=None, help="gateway address ($AIAAS_GATEWAY_URL, localhost:8001)")
    promote.add_argument("--api-key", default=None, help="admin API key for the gateway ($AIAAS_API_KEY)")
    promote.add_argument("--json", action="store_true")
    promote.set_defaults(func=cmd_promote)

    up = subparsers.add_parser(
        "up", help="start registry, inference, monitor and gateway on this machine with a demo model",
        description="Start the whole stack as local processes (state in $AIAAS_HOME, default ~/.aiaas), "
                    "register the demo model once, and run until Ctrl-C.",
    )
    up.add_argument("--home", default=None, help="state directory ($AIAAS_HOME, ~/.aiaas)")
    up.add_argument("--base-port", type=int, default=None,
                    help="gateway on BASE+1, registry BASE+51, inference BASE+52, monitor BASE+53, "
                         "Prometheus BASE+64 (default: 8001, 50051, 50052, 50053, 9464)")
    up.add_argument("--host", default="127.0.0.1",
                    help="address the gateway listens on (127.0.0.1); registry, inference and monitor always "
                         "listen on loopback. Off loopback the gateway asks for API keys")
    up.add_argument("--no-auth", action="store_true", help="gateway without API keys (loopback only, "
                    "unless --insecure)")
    up.add_argument("--insecure", action="store_true",
                    help="allow --no-auth with a --host beyond loopback (a network that is yours alone)")
    up.add_argument("--no-demo", action="store_true", help="do not register the demo models")
    up.add_argument("--no-demo-lm", action="store_true",
                    help="do not register the generative demo `demo-lm` (a tiny Llama trained here the first time)")
    up.add_argument("--demo-lm-steps", type=int, default=None, metavar="N",
                    help="training steps of demo-lm the first time (default 400, about a minute on 2 busy "
                         "cores; each step count is cached apart)")
    up.add_argument("--demo-format", choices=["torch_export", "torchscript", "onnx"], default=None,
                    help="artifact format the demo is registered in the first time (torch_export)")
    up.add_argument("--startup-timeout", type=float, default=120.0, help="seconds each service has to be healthy")
    up.set_defaults(func=cmd_up)


def _gate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample", help="parity sample: .npz or .safetensors, one array per input (by name or order)")
    parser.add_argument("--force", action="store_true",
                        help="register even when the parity gate (or an evaluation) refuses")
    parser.add_argument("--evaluate", action="store_true",
                        help="also run the evaluations the model's gate requires (aiaas eval-gate), vs the parent")
    parser.add_argument("--eval-spec", default=None, help="evaluate with this spec (implies --evaluate)")
    parser.add_argument("--eval-dataset", default=None, help="on this registered data set (with --eval-spec)")
    parser.add_argument("--eval-baseline", default=None,
                        help="baseline of relative thresholds (default: the parent version)")
    parser.add_argument("--atol", type=float, default=None, help="element-wise absolute tolerance")
    parser.add_argument("--rtol", type=float, default=None, help="element-wise relative tolerance")
    parser.add_argument("--min-cosine", type=float, default=None)
    parser.add_argument("--min-top1", type=float, default=None, help="minimum top-1 agreement, 0..1")
    parser.add_argument("--alias", default=None, help="point this alias at the new version")
    parser.add_argument("--registry", default=None, help="registry address ($AIAAS_REGISTRY_URL, localhost:50051)")
    parser.add_argument("--json", action="store_true", help="print the new version and report as JSON")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _run(step: Any, args: argparse.Namespace) -> int:
    """Run a step, mapping the errors people hit to one line each (and refusals to their report)."""
    import grpc

    from aiaas.errors import AiaasError
    from aiaas.eval.workflow import EvaluationRefused
    from aiaas.pipeline.parity import ParityRefused
    from aiaas.pipeline.report_text import format_report

    try:
        return int(step(args))
    except EvaluationRefused as refused:
        from aiaas.eval.report_text import format_result
        from aiaas.eval.workflow import as_dict

        if getattr(args, "json", False):
            print(json.dumps({"refused": True, "evaluations": [as_dict(r) for r in refused.results]}, indent=2))
        else:
            for result in refused.results:
                print("\n".join(format_result(result)))
            print("refused: the candidate failed an evaluation; nothing was registered (--force registers it "
                  "anyway, with its failed result)", file=sys.stderr)
        return EXIT_REFUSED
    except ParityRefused as refused:
        if getattr(args, "json", False):
            print(json.dumps({"refused": True, "parity": refused.report}, indent=2, default=str))
        else:
            print("\n".join(format_report(refused.report)))
            print("refused: the candidate is outside its tolerances; nothing was registered "
                  "(--force registers it anyway)", file=sys.stderr)
        return EXIT_REFUSED
    except AiaasError as exc:
        return _fail(exc.message)
    except grpc.RpcError as exc:
        return _fail(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
    except (OSError, ValueError) as exc:
        return _fail(str(exc))


def cmd_convert(args: argparse.Namespace) -> int:
    from aiaas.pipeline.commands import convert

    return _run(convert, args)


def cmd_optimize(args: argparse.Namespace) -> int:
    from aiaas.pipeline.commands import optimize

    return _run(optimize, args)


def cmd_promote(args: argparse.Namespace) -> int:
    from aiaas.pipeline.commands import promote

    return _run(promote, args)


def cmd_up(args: argparse.Namespace) -> int:
    from aiaas.up import run_up

    return run_up(home=args.home, base_port=args.base_port, host=args.host, demo=not args.no_demo,
                  startup_timeout_s=args.startup_timeout, demo_format=args.demo_format,
                  gateway_auth_on=False if args.no_auth else None, insecure=args.insecure,
                  demo_lm=not args.no_demo_lm, demo_lm_steps=args.demo_lm_steps)
