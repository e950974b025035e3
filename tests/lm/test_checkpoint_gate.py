"""The artifact gate for checkpoint directories and the manifest codec, on directories made here."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from aiaas import artifact_gate, manifest, runtime
from aiaas.errors import InvalidArgument
from aiaas.lm import load_causal_lm
from aiaas.manifest import ManifestFile


def make_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (directory / "chat_template.jinja").write_text("{{ messages }}")
    save_file({"w": np.ones((4, 4), dtype=np.float32)}, directory / "model.safetensors")
    return directory


def check(directory: Path) -> str:
    with pytest.raises(artifact_gate.UnsafeArtifact) as caught:
        artifact_gate.check_artifact(directory, "hf_causal_lm")
    return str(caught.value)


def test_a_plain_checkpoint_passes(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path / "ok")
    (directory / "README.md").write_text("# a model")
    (directory / ".gitattributes").write_text("*.safetensors filter=lfs")  # hidden: not part of the checkpoint
    (directory / "additional_chat_templates").mkdir()
    (directory / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    assert artifact_gate.check_artifact(directory, "hf_causal_lm").format == "hf_causal_lm"


def write_sharded(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    for number in (1, 2):
        save_file({f"w{number}": np.ones(3, dtype=np.float32)}, directory / f"model-0000{number}-of-00002.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "w1": "model-00001-of-00002.safetensors", "w2": "model-00002-of-00002.safetensors"}}))


def test_a_sharded_checkpoint_passes_and_its_index_must_name_shards_it_holds(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path / "sharded")
    write_sharded(directory)
    artifact_gate.check_artifact(directory, "hf_causal_lm")
    (directory / "model-00002-of-00002.safetensors").unlink()
    assert check(directory) == ("model.safetensors.index.json names shard 'model-00002-of-00002.safetensors', "
                                "which the checkpoint does not hold")


def edit(name: str, **changes: object) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / name
        document = json.loads(path.read_text()) if path.exists() else {}
        document.update(changes)
        path.write_text(json.dumps(document))
    return apply


def add(name: str, data: bytes = b"x") -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return apply


def remove(name: str) -> Callable[[Path], None]:
    return lambda directory: (directory / name).unlink()


@pytest.mark.parametrize(("change", "message"), [
    (add("pytorch_model.bin"), "pytorch_model.bin: pickled (or non-safetensors) weights are refused"),
    (add("consolidated.00.pth"), "consolidated.00.pth: pickled (or non-safetensors) weights are refused"),
    (add("training_args.pkl"), "training_args.pkl: pickled"),
    (add("model.ckpt"), "model.ckpt: pickled"),
    (add("modeling_llama.py", b"import os"), "modeling_llama.py: a checkpoint may not carry code"),
    (add("kernels/fast.so"), "kernels/fast.so: a checkpoint may not carry code"),
    (add("weights.onnx"), "weights.onnx: not a file a checkpoint may hold"),
    (edit("config.json", auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"}), "config.json has an auto_map"),
    (edit("config.json", text_config={"auto_map": {"AutoConfig": "x.Y"}}), "config.json has an auto_map"),
    (edit("tokenizer_config.json", auto_map={"AutoTokenizer": ["tok.Evil", None]}),
     "tokenizer_config.json has an auto_map"),
    (edit("config.json", model_type="bert"), "config.json: model_type 'bert' is not a decoder-only architecture"),
    (edit("config.json", model_type="t5"), "config.json: model_type 't5' is not a decoder-only architecture"),
    (add("config.json", b"[1, 2"), "config.json is not JSON"),
    (remove("config.json"), "the checkpoint has no config.json"),
    (remove("model.safetensors"), "the checkpoint has no *.safetensors weights"),
    (add("model.safetensors", struct.pack("<Q", 10**6) + b"{}"), ("model.safetensors: the safetensors file has no "
                                                                  "valid header length")),
    (add("extra.safetensors", struct.pack("<Q", 2) + b"[]"), ("extra.safetensors: the safetensors header is not a "
                                                            "JSON object")),
    (add("config.json", b"[" * 100 + b"]" * 100), "config.json nests deeper than"),
])
def test_what_a_checkpoint_may_not_hold_is_refused_naming_the_file(
        tmp_path: Path, change: Callable[[Path], None], message: str) -> None:
    directory = make_checkpoint(tmp_path / "bad")
    change(directory)
    assert check(directory).startswith(message)


def test_the_allowed_architectures_are_decoder_only_models_transformers_ships() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert {"llama", "qwen2", "mistral", "phi", "phi3", "gpt2"} <= artifact_gate.CAUSAL_LM_MODEL_TYPES
    for model_type in artifact_gate.CAUSAL_LM_MODEL_TYPES:
        assert model_type in CONFIG_MAPPING_NAMES and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, model_type


def test_a_checkpoint_is_a_directory_and_a_single_file_format_takes_no_file_list(tmp_path: Path) -> None:
    with pytest.raises(artifact_gate.UnsafeArtifact, match="is a directory of files, not bytes"):
        artifact_gate.check_artifact(b"{}", "hf_causal_lm")
    with pytest.raises(artifact_gate.UnsafeArtifact, match=f"{tmp_path / 'missing'} is not a directory"):
        artifact_gate.check_artifact(tmp_path / "missing", "hf_causal_lm")
    with pytest.raises(artifact_gate.UnsafeArtifact, match="a onnx artifact is a single file"):
        artifact_gate.check_artifact({"model.onnx": tmp_path}, "onnx")
    with pytest.raises(artifact_gate.UnsafeArtifact, match="a onnx artifact is a single file"):
        artifact_gate.check_file_names(["model.onnx"], "onnx")


def test_loading_goes_through_the_gate_first(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path / "unsafe")
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidArgument, match=re.escape(f"cannot load hf_causal_lm checkpoint {directory}: refused: "
                                                        "pytorch_model.bin: pickled")):
        load_causal_lm(directory)
    with pytest.raises(InvalidArgument, match="load them with aiaas.lm.load_causal_lm"):
        runtime.load_model(directory, "hf_causal_lm", [], [])


# Manifest -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["config.json", "additional_chat_templates/a.jinja", "a/b/c/d", "_x-1.2"])
def test_valid_paths(path: str) -> None:
    assert manifest.check_path(path) == path


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../b", "./a", ".hidden", "a//b", "a/", "a\\b",
                                  "a b", "a/b/c/d/e", "x" * 256, "caf\u00e9"])
def test_invalid_paths_are_refused(path: str) -> None:
    with pytest.raises(InvalidArgument, match="is invalid: use '/'-separated names"):
        manifest.check_path(path)


def test_the_manifest_is_canonical_whatever_the_order_given() -> None:
    files = [ManifestFile("b.json", "b" * 64, 2), ManifestFile("a.json", "a" * 64, 1)]
    data = manifest.encode(files)
    assert data == manifest.encode(reversed(files))
    assert data == (b'{"files":[{"path":"a.json","sha256":"' + b"a" * 64 + b'","size":1},'
                    b'{"path":"b.json","sha256":"' + b"b" * 64 + b'","size":2}]}')
    assert manifest.decode(data) == tuple(sorted(files))
    assert manifest.digest(files)[1] == len(data)


@pytest.mark.parametrize(("files", "message"), [
    ([], "needs at least one file"),
    ([ManifestFile("a", "a" * 64, 1), ManifestFile("a", "b" * 64, 1)], "file 'a' is listed twice"),
    ([ManifestFile("a", "A" * 64, 1)], "file 'a': sha256 must be 64 lowercase hex"),
    ([ManifestFile("a", "a" * 64, -1)], "file 'a': size must be >= 0"),
    ([ManifestFile("a", "a" * 64, 1), ManifestFile("a/b", "a" * 64, 1)], "'a' is listed as a file and used as a folder"),
])
def test_bad_file_lists_are_refused(files: list[ManifestFile], message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        manifest.check_files(files)


def test_a_manifest_that_does_not_parse_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="not a manifest of files"):
        manifest.decode(b'{"files": [{"path": "a"}]}')


def test_a_directory_scan_follows_file_links_skips_hidden_names_and_refuses_linked_folders(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "weights").write_bytes(b"w" * 10)
    root = tmp_path / "ckpt"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_bytes(b"{}")
    (root / "sub" / "x.jinja").write_bytes(b"t")
    (root / "model.safetensors").symlink_to(outside / "weights")  # as in a Hugging Face cache snapshot
    (root / ".cache").mkdir()
    (root / ".cache" / "junk").write_bytes(b"j")
    (root / ".model.safetensors.part").write_bytes(b"partial")
    files, located = manifest.scan(root)
    assert [(f.path, f.size) for f in files] == [("config.json", 2), ("model.safetensors", 10), ("sub/x.jinja", 1)]
    assert located["model.safetensors"] == root / "model.safetensors"
    (root / "linked").symlink_to(outside)
    with pytest.raises(InvalidArgument, match="is a symbolic link to a folder"):
        manifest.files_in(root)
    (root / "linked").unlink()
    os.mkfifo(root / "pipe")
    with pytest.raises(InvalidArgument, match="is not a regular file"):
        manifest.files_in(root)
