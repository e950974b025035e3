"""Pure pieces of the registry: validation, page tokens, the artifact store, conversions, settings."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from aiaas import _registry_convert as sdk_convert
from services.common.errors import DataLoss, InvalidArgument
from services.common.settings import load_settings
from services.registry import convert, validation
from services.registry.artifacts import ArtifactStore
from services.registry.entities import Lineage, ServingConfig, Signature, TensorSpec
from services.registry.settings import RegistrySettings
from tests.registry.conftest import SIGNATURE, spec_for


@pytest.mark.parametrize("name", ["a", "resnet-50", "bert.base_v2", "0day", "x" * 63])
def test_valid_names(name: str) -> None:
    assert validation.name(name) == name


@pytest.mark.parametrize("name", ["", "Resnet", "-lead", ".lead", "has space", "x" * 64, "ünï", "a/b"])
def test_invalid_names_say_what_is_allowed(name: str) -> None:
    with pytest.raises(InvalidArgument, match="use 1 to 63 characters from a-z, 0-9"):
        validation.name(name)


@pytest.mark.parametrize("spec, message", [
    (TensorSpec("x", "FLOAT", (1,)), "not a KServe datatype"),
    (TensorSpec("x", "FP32", (0,)), "has dimension 0"),
    (TensorSpec("x", "FP32", (-2,)), "has dimension -2"),
    (TensorSpec("x", "FP32", (1,) * 17), "the limit is 16"),
    (TensorSpec("bad name", "FP32", (1,)), "name 'bad name' is invalid"),
])
def test_malformed_tensors_are_refused(spec: TensorSpec, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validation.signature(Signature((spec,), SIGNATURE.outputs), ServingConfig())


def test_signature_rules() -> None:
    with pytest.raises(InvalidArgument, match="at least one input and one output"):
        validation.signature(Signature(SIGNATURE.inputs, ()), ServingConfig())
    with pytest.raises(InvalidArgument, match="declared twice"):
        validation.signature(Signature(SIGNATURE.inputs * 2, SIGNATURE.outputs), ServingConfig())
    unbatched = Signature((TensorSpec("x", "FP32", (3, 4)),), SIGNATURE.outputs)
    validation.signature(unbatched, ServingConfig())
    with pytest.raises(InvalidArgument, match="first dimension is the batch and must be -1"):
        validation.signature(unbatched, ServingConfig(max_batch_size=4))


@pytest.mark.parametrize("config, message", [
    (ServingConfig(max_batch_size=-1), "max_batch_size must be"),
    (ServingConfig(max_batch_size=4, preferred_batch_sizes=(8,)), "8 is not between 1 and max_batch_size"),
    (ServingConfig(max_queue_delay_us=10**9), "max_queue_delay_us"),
    (ServingConfig(instance_count=1000), "instance_count"),
    (ServingConfig(device="tpu"), "'tpu' is invalid"),
    (ServingConfig(engine="tgi"), "engine must be one of '', 'builtin', 'vllm', got 'tgi'"),
])
def test_serving_config_rules(config: ServingConfig, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validation.serving_config(config)


def test_serving_config_defaults_are_filled() -> None:
    cfg = validation.serving_config(ServingConfig(max_batch_size=8, preferred_batch_sizes=(8, 4, 4), instance_count=0,
                                                  device=""))
    assert (cfg.preferred_batch_sizes, cfg.instance_count, cfg.device) == ((4, 8), 1, "cpu")


def test_version_spec_rules() -> None:
    with pytest.raises(InvalidArgument, match="64 lowercase hex"):
        validation.version_spec(spec_for("m", b"x", artifact_sha256="ABC"), 100)
    with pytest.raises(InvalidArgument, match="artifact_size must be positive"):
        validation.version_spec(spec_for("m", b"", ), 100)
    with pytest.raises(InvalidArgument, match="metadata is not a JSON document"):
        validation.version_spec(spec_for("m", b"x", metadata={"x": object()}), 100)
    with pytest.raises(InvalidArgument, match="lineage.parent_model needs lineage.parent_version"):
        validation.version_spec(spec_for("m", b"x", lineage=Lineage(0, "", "other")), 100)
    assert validation.version_spec(spec_for("m", b"x", actor="  "), 100).actor == "anonymous"


def test_page_tokens_round_trip_and_refuse_other_listings() -> None:
    token = validation.encode_token("models", "resnet")
    assert validation.decode_token(token, "models") == "resnet"
    assert validation.decode_token("", "models") is None
    with pytest.raises(InvalidArgument, match="belongs to another listing"):
        validation.decode_token(token, "audit")


def test_artifacts_are_content_addressed_and_verified(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    data = b"weights" * 1000
    sha = hashlib.sha256(data).hexdigest()
    pending = store.begin(sha, len(data))
    pending.write(data)
    assert pending.commit() is False
    assert store.path_for(sha) == tmp_path / "sha256" / sha[:2] / sha[2:]
    again = store.begin(sha, len(data))
    again.write(data)
    assert again.commit() is True
    assert b"".join(store.read(sha, len(data), 4096)) == data
    assert list(store.tmp_dir.iterdir()) == []
    store.path_for(sha).write_bytes(b"tampered" + data[8:])
    with pytest.raises(DataLoss, match="is corrupt"):
        b"".join(store.read(sha, len(data), 4096))
    store.remove(sha)
    with pytest.raises(DataLoss, match="is missing"):
        next(store.read(sha, len(data), 4096))


def test_stale_temporary_uploads_are_cleaned(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    old = store.begin("0" * 64, 10)
    fresh = store.begin("1" * 64, 10)
    past = time.time() - 7200
    os.utime(old.path, (past, past))
    assert store.clean_stale_uploads(older_than_s=3600) == 1
    assert not old.path.exists() and fresh.path.exists()
    fresh.discard()


def test_proto_round_trip_of_an_upload_header() -> None:
    header = sdk_convert.signature({"inputs": ["x:fp32:-1,4", {"name": "ids", "datatype": "INT64", "shape": [-1]}],
                                    "outputs": ["y:FP32:-1,2"]})
    assert [(t.name, t.datatype, list(t.shape)) for t in header.inputs] == [("x", "FP32", [-1, 4]), ("ids", "INT64", [-1])]
    signature = convert.from_signature(header)
    assert convert.from_signature(convert.signature(signature)) == signature
    with pytest.raises(ValueError, match="write NAME:DATATYPE:SHAPE"):
        sdk_convert.parse_tensor("x:FP32")
    with pytest.raises(ValueError, match="unknown keys"):
        sdk_convert.serving_config({"batch": 4})
    with pytest.raises(ValueError, match="unknown artifact format"):
        sdk_convert.artifact_format("pickle")


def test_registry_settings_defaults_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIAAS_HOME", str(tmp_path))
    defaults = load_settings(RegistrySettings, [], service="registry", environ={})
    assert defaults.port == 50051 and defaults.max_artifact_bytes == 4 * 1024**3
    assert defaults.resolved_database_url() == f"sqlite:///{tmp_path / 'registry.db'}"
    assert defaults.resolved_artifact_dir() == tmp_path / "artifacts"
    custom = load_settings(RegistrySettings, ["--feed-retention", "5"], service="registry",
                           environ={"AIAAS_REGISTRY_DATABASE_URL": "postgresql+psycopg://db/x"})
    assert (custom.feed_retention, custom.resolved_database_url()) == (5, "postgresql+psycopg://db/x")
    with pytest.raises(InvalidArgument, match="feed_retention must be at least 1"):
        load_settings(RegistrySettings, ["--feed-retention", "0"], service="registry", environ={})
