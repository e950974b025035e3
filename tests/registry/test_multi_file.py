"""Multi-file versions (checkpoint directories) in the registry core, on SQLite and a real PostgreSQL: each
file a content-addressed blob, one reference per distinct blob per version in the version's transaction,
blobs shared across versions and collected with the last one; every stream and header mistake refused
with nothing stored."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as safetensors_save

from aiaas import manifest
from aiaas.manifest import ManifestFile
from services.common.errors import FailedPrecondition, InvalidArgument
from services.registry.artifacts import ArtifactStore, PendingFiles
from services.registry.core import RegistryCore
from services.registry.entities import ArtifactFormat, FileStart, Signature, VersionSpec
from services.registry.sql_store import SqlRegistryStore
from tests.registry.conftest import SIGNATURE, blobs, spec_for
from tests.support.blobs import onnx_blob

WEIGHTS = safetensors_save({"w": np.arange(4096, dtype=np.float32)})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config(tag: str) -> bytes:
    return json.dumps({"model_type": "llama", "tag": tag}).encode()


def checkpoint_spec(model: str, contents: dict[str, bytes], **changes: object) -> tuple[VersionSpec, bytes]:
    """The upload header of a checkpoint, and its files' bytes one after the other in manifest order."""
    listed = tuple(sorted(ManifestFile(path, sha(data), len(data)) for path, data in contents.items()))
    fields: dict[str, object] = {
        "model": model, "format": ArtifactFormat.HF_CAUSAL_LM, "artifact_sha256": "", "artifact_size": 0,
        "signature": Signature(), "actor": "tester", "create_model": True, "files": listed,
    }
    fields.update(changes)
    return VersionSpec(**fields), b"".join(contents[f.path] for f in listed)  # type: ignore[arg-type]


def stored(artifacts: ArtifactStore) -> set[str]:
    return {p.parent.name + p.name for p in blobs(artifacts) if "sha256" in p.parts}


def test_a_checkpoint_holds_one_reference_per_distinct_blob_shared_across_versions(
        core: RegistryCore, store: SqlRegistryStore) -> None:
    first = {"config.json": config("a"), "model.safetensors": WEIGHTS, "README.md": b"# tiny"}
    second = {"config.json": config("b"), "model.safetensors": WEIGHTS, "README.md": b"# tiny"}
    v1, dedup1 = core.upload_bytes(*checkpoint_spec("ckpt", first))
    v2, dedup2 = core.upload_bytes(*checkpoint_spec("ckpt", second))
    v3, dedup3 = core.upload_bytes(*checkpoint_spec("ckpt", first))
    assert (dedup1, dedup2, dedup3) == (False, False, True)
    assert [f.path for f in v1.files] == ["README.md", "config.json", "model.safetensors"]
    assert (v1.artifact_sha256, v1.artifact_size) == manifest.digest(v1.files) and v1.artifact_sha256 == v3.artifact_sha256
    assert store.get_version("ckpt", 2).files == v2.files

    refs = {name: store.blob_refs(sha(data)) for name, data in
            {"weights": WEIGHTS, "readme": b"# tiny", "config a": config("a"), "config b": config("b")}.items()}
    assert refs == {"weights": 3, "readme": 3, "config a": 2, "config b": 1}
    assert (store.blob_refs(v1.artifact_sha256), store.blob_refs(v2.artifact_sha256)) == (2, 1)
    assert stored(core.artifacts) == {sha(WEIGHTS), sha(b"# tiny"), sha(config("a")), sha(config("b")),
                                      v1.artifact_sha256, v2.artifact_sha256}

    core.delete_version("ckpt", 1)
    assert store.blob_refs(sha(config("a"))) == 1 and len(stored(core.artifacts)) == 6
    core.delete_version("ckpt", 3)  # the last user of config a and of the first manifest
    assert store.blob_refs(sha(config("a"))) is None and store.blob_refs(sha(WEIGHTS)) == 1
    assert stored(core.artifacts) == {sha(WEIGHTS), sha(b"# tiny"), sha(config("b")), v2.artifact_sha256}
    core.delete_model("ckpt")
    assert stored(core.artifacts) == set() and store.unreferenced_blobs(10) == []


def test_files_read_back_in_manifest_order_from_any_file_and_offset(core: RegistryCore) -> None:
    files = {"README.md": b"", "config.json": config("r"), "model.safetensors": WEIGHTS, "tokenizer.json": b"{}"}
    version, _ = core.upload_bytes(*checkpoint_spec("reader", files))
    found, parts = core.read_files("reader", 1, chunk_size=1000)
    assert found == version
    pieces = list(parts)
    assert [p for p in pieces if isinstance(p, FileStart)] == [FileStart(p, 0) for p in sorted(files)]
    assert b"".join(p for p in pieces if isinstance(p, bytes)) == b"".join(files[p] for p in sorted(files))
    assert max(len(p) for p in pieces if isinstance(p, bytes)) == 1000
    _, parts = core.read_files("reader", 1, path="model.safetensors", offset=100)
    pieces = list(parts)
    assert pieces[0] == FileStart("model.safetensors", 100)
    assert b"".join(p for p in pieces if isinstance(p, bytes)) == WEIGHTS[100:] + b"{}"
    _, artifact = core.read_artifact("reader", 1)
    assert manifest.decode(b"".join(artifact)) == version.files
    core.upload_bytes(spec_for("single", onnx_blob("single")), onnx_blob("single"))
    with pytest.raises(FailedPrecondition, match="is a single-file onnx artifact"):
        core.read_files("single", 1)


GOOD = {"config.json": config("x"), "model.safetensors": WEIGHTS}


@pytest.mark.parametrize(("files", "changes", "message"), [
    (GOOD, {"format": ArtifactFormat.ONNX, "signature": SIGNATURE}, "a onnx artifact is a single file"),
    (GOOD, {"files": ()}, "a hf_causal_lm version is a directory of files: list them"),
    (GOOD, {"files": (ManifestFile("model.safetensors", sha(WEIGHTS), len(WEIGHTS)),
                      ManifestFile("config.json", sha(config("x")), len(config("x"))))}, "sorted by path"),
    (GOOD, {"artifact_sha256": "0" * 64}, "the sha256 of its manifest (aiaas.manifest.digest): the files listed give"),
    (GOOD, {"artifact_size": 7}, "artifact_size of a multi-file version is the size of its manifest"),
    ({**GOOD, "big.safetensors": b"\0" * (1024 * 1024)}, {}, "the files add up to"),
    ({**GOOD, "modeling_llama.py": b"import os"}, {}, ("artifact refused: modeling_llama.py: a checkpoint may not "
                                                      "carry code")),
    ({**GOOD, "optimizer.pt": b"x"}, {}, "artifact refused: optimizer.pt: pickled (or non-safetensors) weights"),
    ({"model.safetensors": WEIGHTS}, {}, "artifact refused: the checkpoint has no config.json"),
    (GOOD, {"files": (ManifestFile("../config.json", "0" * 64, 1),)}, "file path '../config.json' is invalid"),
    (GOOD, {"signature": Signature(inputs=SIGNATURE.inputs)}, "signature needs at least one input and one output"),
])
def test_a_bad_checkpoint_header_is_refused_before_anything_is_written(
        core: RegistryCore, files: dict[str, bytes], changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        core.begin_upload(checkpoint_spec("refused", files, **changes)[0])
    assert blobs(core.artifacts) == []


def test_a_checkpoint_with_a_signature_keeps_it(core: RegistryCore) -> None:
    version, _ = core.upload_bytes(*checkpoint_spec("signed", GOOD, signature=SIGNATURE))
    assert version.signature == SIGNATURE


@pytest.mark.parametrize(("mangle", "message"), [
    (lambda data: data[:-5], (f"the stream ended after {len(WEIGHTS) - 5} bytes of file 'model.safetensors', whose "
                             f"listed size is {len(WEIGHTS)}; nothing was stored")),
    (lambda data: b"[" + data[1:], "file 'config.json' sha256 mismatch: declared"),
    (lambda data: data + b"!", (f"received more bytes than the listed files hold "
                               f"({len(WEIGHTS) + len(config('x'))} in all)")),
])
def test_a_bad_checkpoint_stream_stores_nothing(core: RegistryCore, mangle: object, message: str) -> None:
    spec, data = checkpoint_spec("broken", GOOD)
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        core.upload_bytes(spec, mangle(data))  # type: ignore[operator]
    assert blobs(core.artifacts) == []


def test_a_checkpoint_whose_config_names_remote_code_stores_nothing(core: RegistryCore) -> None:
    files = {**GOOD, "config.json": json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}).encode()}
    with pytest.raises(InvalidArgument, match="artifact refused: config.json has an auto_map"):
        core.upload_bytes(*checkpoint_spec("remote", files))
    assert blobs(core.artifacts) == []


def test_an_upload_touches_its_finished_files_so_other_replicas_sweepers_spare_them(tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path)
    spec, data = checkpoint_spec("m", GOOD)
    manifest_sha, _ = manifest.digest(spec.files)
    pending = PendingFiles(artifacts, manifest_sha, manifest.encode(spec.files), spec.files, touch_every_s=0)
    first = len(GOOD["config.json"])
    pending.write(data[:first])  # config.json complete
    parts = sorted(artifacts.tmp_dir.iterdir())
    long_ago = time.time() - 3600
    for part in parts:
        os.utime(part, (long_ago, long_ago))
    pending.write(data[first:first + 10])  # the weights are arriving
    # Another replica sees every file of this upload as recent (it cannot see this process's live uploads).
    assert artifacts.clean_stale_uploads(older_than_s=60, spare=()) == 0
    pending.write(data[first + 10:])
    pending.seal()
    pending.place()
    pending.discard()
    assert sorted(pending.placed_blobs()) == sorted([manifest_sha, sha(GOOD["config.json"]), sha(WEIGHTS)])
    assert list(artifacts.tmp_dir.iterdir()) == []
