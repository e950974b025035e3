"""What `aiaas convert`, `aiaas optimize` and `aiaas promote` do, given their parsed flags."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aiaas.errors import InvalidArgument
from aiaas.pipeline import evaluation
from aiaas.pipeline.artifacts import ArtifactFormat
from aiaas.pipeline.parity import Tolerances, default_tolerances
from aiaas.pipeline.publish import Publisher, from_struct
from aiaas.pipeline.report_text import format_report
from aiaas.pipeline.routes import RouteEditor
from aiaas.pipeline.signature import ServingConfig, Signature, torch_dtype
from aiaas.pipeline.steps import Candidate, export_candidate, transform_candidate

EXAMPLE_BATCH = 4


def load_factory(spec: str) -> torch.nn.Module:
    """`package.module:factory` -> factory(), importable from the current directory too."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgument(f"expected package.module:factory, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgument(f"cannot import {spec}: {exc}") from exc
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise InvalidArgument(f"{spec}() returned {type(module).__name__}, not a torch.nn.Module")
    return module


def load_weights(module: torch.nn.Module, path: str) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    # safetensors raises its own error types; keep the reason.
    except Exception as exc:
        raise InvalidArgument(f"cannot read safetensors weights {path}: {exc}") from exc
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InvalidArgument(f"weights do not fit the module: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")


def load_sample(path: str, names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Arrays from .npz or .safetensors: by input name when every name is there, else in file order."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        arrays = dict(load_file(path))
    else:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    if not arrays:
        raise InvalidArgument(f"sample {path} holds no arrays")
    if names and all(n in arrays for n in names):
        return [arrays[n] for n in names]
    return list(arrays.values())


def _tolerances(args: argparse.Namespace, transformation: str) -> Tolerances | None:
    overrides = {"atol": args.atol, "rtol": args.rtol, "min_cosine": args.min_cosine, "min_top1": args.min_top1}
    if all(v is None for v in overrides.values()):
        return None
    return default_tolerances(transformation).with_overrides(**overrides)


def _example_inputs(args: argparse.Namespace, sample: list[np.ndarray] | None) -> tuple[torch.Tensor, ...]:
    if not args.input_shape:
        if sample is None:
            raise InvalidArgument("give --input-shape (once per input) or a --sample to derive the signature from")
        return tuple(torch.from_numpy(np.ascontiguousarray(a[:EXAMPLE_BATCH])) for a in sample)
    dtypes = args.input_dtype or []
    if len(dtypes) > len(args.input_shape):
        raise InvalidArgument("more --input-dtype than --input-shape")
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for i, shape_text in enumerate(args.input_shape):
        try:
            shape = [int(d) for d in shape_text.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise InvalidArgument(f"--input-shape {shape_text!r}: expected dimensions like 3,224,224") from None
        dtype = torch_dtype(dtypes[i].upper()) if i < len(dtypes) else torch.float32
        if dtype.is_floating_point:
            tensors.append(torch.randn(EXAMPLE_BATCH, *shape, generator=generator).to(dtype))
        else:
            tensors.append(torch.randint(0, 10, (EXAMPLE_BATCH, *shape), generator=generator).to(dtype))
    return tuple(tensors)


def _print_result(args: argparse.Namespace, model: str, version: Any, candidate: Candidate,
                  moved_alias: str | None, evaluations: Sequence[Any] = ()) -> None:
    report = from_struct(version.reports["parity"]) if "parity" in version.reports else candidate.report
    if args.json:
        from aiaas.eval.workflow import as_dict

        print(json.dumps({
            "model": model, "version": version.version, "format": candidate.format.value,
            "lineage": {"parent_version": candidate.parent_version, "transformation": candidate.transformation},
            "alias": moved_alias, "parity": report, "evaluations": [as_dict(r) for r in evaluations],
        }, indent=2, default=str))
        return
    parent = f" from version {candidate.parent_version}" if candidate.parent_version else ""
    print(f"registered {model} version {version.version} ({candidate.format.value}, "
          f"{candidate.transformation}{parent})")
    print("\n".join(format_report(report)))
    if evaluations:
        from aiaas.eval.report_text import format_result

        for result in evaluations:
            print("\n".join(format_result(result)))
    if moved_alias:
        print(f"{model}:{moved_alias} -> version {version.version}")


def _publish(args: argparse.Namespace, model: str, candidate: Candidate, metadata: dict[str, Any],
             baseline: str | None = None) -> int:
    with Publisher(args.registry) as publisher:
        # Beside the parity gate: the model's required evaluations, before anything is registered.
        results = evaluation.evaluate_candidate(args, publisher.client, model, candidate, baseline)
        version = publisher.upload(model, candidate, metadata)
        evaluation.store_results(publisher.client, version.version, results)
        if args.alias:
            publisher.set_alias(model, args.alias, version.version, reason=candidate.transformation)
    _print_result(args, model, version, candidate, args.alias, results)
    return 0


def _parse_version(text: str) -> tuple[int, str]:
    return (int(text), "") if text.isdigit() else (0, text)


def convert(args: argparse.Namespace) -> int:
    if args.version is not None:
        return _convert_version(args)
    if not args.weights or not args.name:
        raise InvalidArgument("converting a module needs --weights FILE.safetensors and --name MODEL")
    fmt = ArtifactFormat.parse(args.format or "torch_export")
    module = load_factory(args.source)
    load_weights(module, args.weights)
    sample = load_sample(args.sample, args.input_name) if args.sample else None
    serving = ServingConfig(
        max_batch_size=args.max_batch_size, preferred_batch_sizes=tuple(args.preferred_batch_size),
        max_queue_delay_us=args.max_queue_delay_us, instance_count=args.instance_count, device=args.device,
    )
    candidate = export_candidate(
        module, _example_inputs(args, sample), fmt, serving=serving, input_names=args.input_name,
        output_names=args.output_name, sample=sample, tolerances=_tolerances(args, f"export:{fmt.value}"),
        force=args.force,
    )
    metadata = {"source": "aiaas convert", "factory": args.source, "weights": Path(args.weights).name}
    return _publish(args, args.name, candidate, metadata)


def _convert_version(args: argparse.Namespace) -> int:
    target = ArtifactFormat.parse(args.format or "onnx")
    if target is not ArtifactFormat.ONNX:
        raise InvalidArgument("a registered version converts to onnx only; export the module again for other formats")
    return _transform(args, args.source, args.version, "to-onnx")


def optimize(args: argparse.Namespace) -> int:
    if args.quantize:
        transformation, level = args.quantize, "extended"
    elif args.dtype:
        transformation, level = args.dtype, "extended"
    else:
        transformation, level = "ort-optimize", args.ort_optimize
    return _transform(args, args.model, args.version, transformation, ort_level=level)


def _transform(args: argparse.Namespace, model: str, version_text: str, transformation: str,
               ort_level: str = "extended") -> int:
    number, alias = _parse_version(version_text)
    with Publisher(args.registry) as publisher:
        parent = publisher.download(model, number, alias)
    sample = load_sample(args.sample, [s.name for s in parent.signature.inputs]) if args.sample else None
    lineage = {"int8-dynamic": "quantize:int8-dynamic", "fp16": "cast:fp16", "bf16": "cast:bf16",
               "to-onnx": "convert:onnx"}.get(transformation, f"ort-optimize:{ort_level}")
    candidate = transform_candidate(
        parent.format, parent.data, parent.signature, parent.serving, transformation,
        parent_version=parent.version.version, ort_level=ort_level, sample=sample,
        tolerances=_tolerances(args, lineage), force=args.force,
    )
    metadata = {"source": f"aiaas {'convert' if transformation == 'to-onnx' else 'optimize'}",
                "parent_format": parent.format.value}
    return _publish(args, model, candidate, metadata, baseline=str(parent.version.version))


def promote(args: argparse.Namespace) -> int:
    if args.weight is not None and not 0 <= args.weight <= 100:
        raise InvalidArgument("--weight is a percentage, 0..100")
    if args.weight is not None and args.alias == "production":
        raise InvalidArgument("production takes the traffic the other splits leave; give --weight to canary aliases")
    if args.force and not args.reason:
        raise InvalidArgument("--force needs --reason: it is recorded in the audit log")
    with Publisher(args.registry) as publisher:
        move = publisher.set_alias(args.model, args.alias, args.version,
                                   reason=args.reason or f"aiaas promote --alias {args.alias}", force=args.force)
    result: dict[str, Any] = {"model": args.model, "alias": args.alias, "version": args.version,
                              "previous_version": move.from_version}
    editor = RouteEditor(args.gateway, args.api_key)
    try:
        if args.weight is not None:
            result["route"] = editor.set_weight(args.model, args.alias, args.weight, reason=args.reason)
        elif args.alias == "production":
            result["route"] = editor.finish_rollout(args.model, reason=args.reason)
    finally:
        editor.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    was = f" (was {move.from_version})" if move.from_version else ""
    print(f"{args.model}:{args.alias} -> version {args.version}{was}")
    route = result.get("route")
    if route:
        print("traffic: " + ", ".join(f"{s['target']} {s['percent']:.0f}%" for s in route))
    if route is None and "route" in result:
        print("traffic: all to production")
    print(f"undo: aiaas rollback {args.model} {args.alias}")
    return 0


def describe_signature(signature: Signature) -> str:
    def part(specs: Any) -> str:
        return ", ".join(f"{s.name} {s.datatype}{list(s.shape)}" for s in specs)

    return f"{part(signature.inputs)} -> {part(signature.outputs)}"
