"""Data sets and the promotion gate against a real registry process: register, deduplicate, refuse what
does not fit (nothing stored), download; production refuses an unevaluated or failing version, and a
forced move records its reason and what it bypassed in the audit log."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

import aiaas
from aiaas.eval import registry_io
from aiaas.registry.v1 import evaluation_pb2 as epb
from aiaas.registry_client import RegistryClient, RegistryError
from tests.eval.conftest import SPEC, WEIGHT, WRONG_WEIGHT, Labeled, classifier, cli, cli_json, write_parquet
from tests.registry.service import RunningRegistry
from tests.support.servers import free_port


@pytest.fixture(scope="module")
def registry() -> Iterator[RunningRegistry]:
    running = RunningRegistry("sqlite", None).start()
    yield running
    running.close()


@pytest.fixture(scope="module")
def models(registry: RunningRegistry) -> RunningRegistry:
    """clf version 1 (right), version 2 (classes shuffled); no alias yet."""
    for weight in (WEIGHT, WRONG_WEIGHT):
        aiaas.deploy(classifier(weight), torch.randn(4, 4), name="clf", registry=registry.address, alias=None,
                     input_names=["x"], output_names=["logits"])
    return registry


def test_register_deduplicate_download_and_delete(capsys: pytest.CaptureFixture[str], models: RunningRegistry,
                                                  data: Labeled, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "test.parquet", data)
    before = models.files()
    found = cli_json(capsys, models.address, "dataset", "register", "clf-dl", str(path), "--model", "clf",
                     "--label", "label")
    dataset = found["dataset"]
    assert found["deduplicated"] is False
    assert (dataset["num_rows"], dataset["model"], dataset["model_version"]) == ("600", "clf", "2")
    assert {c["name"]: c["role"] for c in dataset["columns"]} == {
        "x": "COLUMN_ROLE_INPUT", "label": "COLUMN_ROLE_LABEL", "country": "COLUMN_ROLE_FEATURE",
        "age": "COLUMN_ROLE_FEATURE"}
    assert dataset["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(models.files()) == len(before) + 1
    again = cli_json(capsys, models.address, "dataset", "register", "clf-dl", str(path), "--model", "clf",
                     "--version", "1", "--label", "label")
    assert again["deduplicated"] is True and len(models.files()) == len(before) + 1
    other = write_parquet(tmp_path / "other.parquet", Labeled(data.x[:10], data.label[:10], data.country[:10],
                                                              data.age[:10]))
    code, _, err = cli(capsys, models.address, "dataset", "register", "clf-dl", str(other), "--model", "clf",
                       "--label", "label")
    assert code == 1 and "ALREADY_EXISTS" in err and "immutable" in err

    with RegistryClient(models.address) as client:
        fetched = registry_io.download_dataset(client, "clf-dl", tmp_path / "back.parquet")
        assert (tmp_path / "back.parquet").read_bytes() == path.read_bytes() and fetched.name == "clf-dl"
        assert [d.name for d in registry_io.list_datasets(client)] == ["clf-dl"]
        registry_io.delete_dataset(client, "clf-dl")
        with pytest.raises(RegistryError) as missing:
            registry_io.get_dataset(client, "clf-dl")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert models.files() == before  # the blob went with its last reference


def test_a_data_set_that_does_not_fit_is_refused_and_nothing_is_stored(
        capsys: pytest.CaptureFixture[str], models: RunningRegistry, data: Labeled, tmp_path: Path) -> None:
    narrow = write_parquet(tmp_path / "narrow.parquet", data, width=3)
    before = models.files()
    code, _, err = cli(capsys, models.address, "dataset", "register", "clf-narrow", str(narrow), "--model", "clf",
                       "--label", "label")
    assert code == 1
    assert ("INVALID_ARGUMENT: data set refused: the data set does not fit model 'clf' version 2: column 'x' does "
            "not fit input 'x': expected FP32 with per-row shape [4], got FP32 [3]; nothing was stored") in err
    code, _, err = cli(capsys, models.address, "dataset", "register", "clf-nolabel", str(narrow), "--model", "clf",
                       "--label", "y")
    assert code == 1 and "no label column 'y'; the data set has x, label, country, age" in err
    assert models.files() == before
    with RegistryClient(models.address) as client:
        assert [d.name for d in registry_io.list_datasets(client)] == []
        assert not [e for e in client.audit_events() if e.action == "dataset.create"
                    and e.details["dataset"] in ("clf-narrow", "clf-nolabel")]


def _promote(capsys: pytest.CaptureFixture[str], registry: str, version: int, *extra: str) -> tuple[int, str, str]:
    return cli(capsys, registry, "promote", "clf", str(version), "--gateway", f"127.0.0.1:{free_port()}", *extra)


def test_production_needs_the_gates_evaluations(capsys: pytest.CaptureFixture[str], models: RunningRegistry,
                                               data: Labeled, tmp_path: Path) -> None:
    address = models.address
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    write_parquet(tmp_path / "test.parquet", data)
    assert cli(capsys, address, "dataset", "register", "clf-test", str(tmp_path / "test.parquet"), "--model", "clf",
               "--label", "label")[0] == 0
    # Without a gate, production moves as before.
    assert _promote(capsys, address, 2)[0] == 0
    assert cli(capsys, address, "eval-gate", "set", "clf", "--dataset", "clf-test", "--spec", str(spec))[0] == 0

    code, _, err = _promote(capsys, address, 1)
    assert code == 1
    assert ("FAILED_PRECONDITION: alias 'production' of model 'clf' cannot point at version 1: it has no evaluation "
            "'holdout', which the model's evaluation gate requires") in err

    # Version 1 evaluated against production (version 2, the wrong one): it passes.
    result = cli_json(capsys, address, "evaluate", "clf", "1", "--dataset", "clf-test", "--spec", str(spec),
                      "--quiet")
    assert result["passed"] is True and result["baseline_version"] == "2" and result["path"] == "in-process"
    assert _promote(capsys, address, 1)[0] == 0

    # Version 2 fails its evaluation: the gate says which threshold failed on which slice.
    failed = cli_json(capsys, address, "evaluate", "clf", "2", "--dataset", "clf-test", "--spec", str(spec),
                      "--quiet", code=3)
    assert failed["passed"] is False
    code, _, err = _promote(capsys, address, 2)
    assert code == 1 and "its evaluation 'holdout' failed: accuracy >= 0.8 failed: accuracy 0." in err
    assert "< 0.8 on slice overall (600 examples)" in err

    # Forcing needs a reason; with one the move happens and the audit log says what was bypassed.
    code, _, err = _promote(capsys, address, 2, "--force")
    assert code == 1 and "--force needs --reason" in err
    with RegistryClient(address) as client:
        with pytest.raises(RegistryError) as no_reason:
            client.set_alias("clf", "production", 2, force=True)
        assert no_reason.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    code, out, _ = _promote(capsys, address, 2, "--force", "--reason", "incident 42: v1 leaks memory")
    assert code == 0 and "clf:production -> version 2 (was 1)" in out
    with RegistryClient(address) as client:
        moved = next(e for e in client.audit_events(model="clf") if e.action == "alias.set")
        assert moved.details["reason"] == "incident 42: v1 leaks memory" and moved.details["forced"] is True
        assert "its evaluation 'holdout' failed" in moved.details["bypassed"][0]
        stored = next(e for e in client.audit_events(model="clf") if e.action == "evaluation.put")
        assert stored.version == 2 and stored.details["passed"] is False and stored.details["failed"]
        # Other aliases are not gated.
        client.set_alias("clf", "canary", 2)


def test_a_result_must_match_the_gates_spec_and_goes_with_its_version(
        capsys: pytest.CaptureFixture[str], models: RunningRegistry, data: Labeled, tmp_path: Path) -> None:
    address = models.address
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    write_parquet(tmp_path / "test.parquet", data)
    cli(capsys, address, "dataset", "register", "clf-test", str(tmp_path / "test.parquet"), "--model", "clf",
        "--label", "label")
    aiaas.deploy(classifier(WEIGHT), torch.randn(4, 4), name="clf", registry=address, alias=None,
                 input_names=["x"], output_names=["logits"])
    assert cli(capsys, address, "eval-gate", "set", "clf", "--dataset", "clf-test", "--spec", str(spec))[0] == 0
    looser = tmp_path / "looser.yaml"
    looser.write_text(SPEC.replace("min: 0.8", "min: 0.1"))
    assert cli(capsys, address, "evaluate", "clf", "3", "--dataset", "clf-test", "--spec", str(looser),
               "--quiet")[0] == 0
    with RegistryClient(address) as client:
        with pytest.raises(RegistryError) as refused:
            client.set_alias("clf", "production", 3)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ran with another spec than the gate requires" in refused.value.details()
        # The gate's data set cannot be deleted while the gate needs it.
        with pytest.raises(RegistryError) as needed:
            registry_io.delete_dataset(client, "clf-test")
        assert needed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "required by the evaluation gate of clf" in needed.value.details()
        assert [r.name for r in registry_io.list_evaluations(client, "clf", 3)] == ["holdout"]
        client.delete_version("clf", 3)
        assert [r.version for r in registry_io.list_evaluations(client, "clf")] == [1, 2]
        # A result that says it passed while a threshold failed is refused.
        result = registry_io.get_evaluation(client, "clf", 2, "holdout")
        result.passed = True
        with pytest.raises(RegistryError, match="passed is True but"):
            registry_io.put_evaluation(client, result)
        assert registry_io.get_gate(client, "clf").required[0].dataset == "clf-test"
        registry_io.put_gate(client, "clf", epb.EvaluationGate())
        assert not registry_io.get_gate(client, "clf").required
