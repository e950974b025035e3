"""Hugging Face causal language models: load a checkpoint without running its code, and `aiaas.deploy_lm`.

`load_causal_lm(directory)` passes the directory through the artifact gate (known files only,
safetensors weights only, no `*.py` and no `auto_map`, a decoder-only `model_type` that
transformers ships), then loads it with `AutoModelForCausalLM.from_pretrained(trust_remote_code=False,
use_safetensors=True, local_files_only=True)` in the checkpoint's own dtype, and `AutoTokenizer`
from the same directory. On CPU, safetensors memory-maps each shard and transformers keeps those
tensors as the parameters, so the weights are pages of the files in the node's artifact cache:
every process that loads the same version shares them instead of holding a copy
(tests/lm/test_lm_registry.py checks the mappings of two processes).

`deploy_lm(path_or_model, tokenizer, name=...)` registers a checkpoint directory, or a transformers
model and its tokenizer saved into a temporary one, as an `hf_causal_lm` version and points an alias
at it.

Needs the `llm` extra (transformers, tokenizers) and torch; imported only when used.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from aiaas import artifact_gate, runtime
from aiaas.errors import InvalidArgument
from aiaas.formats import ArtifactFormat
from aiaas.registry.v1 import registry_pb2 as pb

FORMAT = ArtifactFormat.HF_CAUSAL_LM


@dataclasses.dataclass(frozen=True)
class CausalLM:
    """A loaded checkpoint: the transformers model (in eval mode) and its tokenizer."""

    model: Any
    tokenizer: Any
    directory: Path


def load_causal_lm(directory: str | os.PathLike[str], *, device: str = "cpu") -> CausalLM:
    """The checkpoint in `directory`, checked by the artifact gate, then loaded by transformers (no remote code)."""
    path = Path(directory)
    try:
        artifact_gate.check_artifact(path, FORMAT.value)
    except artifact_gate.UnsafeArtifact as exc:
        raise InvalidArgument(f"cannot load {FORMAT.value} checkpoint {path}: refused: {exc}") from None
    device = runtime.parse_device(device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # dtype "auto" keeps the checkpoint's dtype: a conversion would copy the weights out of the mapped files.
        model: Any = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, use_safetensors=True,
                                                          local_files_only=True, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"cannot load {FORMAT.value} checkpoint {path}: {runtime._first_line(exc)}") from exc
    if device != "cpu":
        model = model.to(device)
    model.eval()
    return CausalLM(model, tokenizer, path)


def deploy_lm(path_or_model: str | os.PathLike[str] | Any, tokenizer: Any = None, *, name: str,
              alias: str | None = "production", registry: str | grpc.Channel | None = None,
              serving_config: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None,
              actor: str | None = None) -> pb.ModelVersion:
    """Register a causal LM as the next `hf_causal_lm` version of `name` and point `alias` at it (unless None).

    `path_or_model` is a checkpoint directory (its tokenizer files travel with it) or a transformers
    model, saved with `tokenizer` into a temporary directory first (transformers 5 writes safetensors
    only). `registry` is an address (default `$AIAAS_REGISTRY_URL`, else localhost:50051) or a channel.
    Returns the version, as the registry recorded it.
    """
    if isinstance(path_or_model, (str, os.PathLike)):
        if tokenizer is not None:
            raise InvalidArgument("a checkpoint directory carries its own tokenizer files: pass no tokenizer")
        source = {"source": "aiaas.deploy_lm"}
        return _register(Path(path_or_model), name, alias, registry, serving_config,
                         {**source, **(metadata or {})}, actor)
    if tokenizer is None:
        raise InvalidArgument("deploy_lm needs the model's tokenizer to register it: pass tokenizer=...")
    model_class = type(path_or_model)
    source = {"source": "aiaas.deploy_lm", "model_class": f"{model_class.__module__}.{model_class.__qualname__}"}
    with tempfile.TemporaryDirectory(prefix="aiaas-lm-") as tmp:
        path_or_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return _register(Path(tmp), name, alias, registry, serving_config, {**source, **(metadata or {})}, actor)


def _register(directory: Path, name: str, alias: str | None, registry: str | grpc.Channel | None,
              serving_config: Mapping[str, Any] | None, metadata: Mapping[str, Any], actor: str | None) -> Any:
    from aiaas.pipeline.publish import Publisher

    try:
        artifact_gate.check_artifact(directory, FORMAT.value)  # refused here, before gigabytes travel
    except artifact_gate.UnsafeArtifact as exc:
        raise InvalidArgument(f"cannot register {directory} as {FORMAT.value}: refused: {exc}") from None
    with Publisher(registry, actor=actor) as publisher:
        version = publisher.client.register(name, directory, format=FORMAT.value, serving_config=serving_config,
                                            metadata=metadata)
        if alias:
            publisher.set_alias(name, alias, version.version, reason="aiaas.deploy_lm")
            version = publisher.client.get_version(name, version.version)
    return version
