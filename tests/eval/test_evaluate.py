"""`aiaas evaluate` end to end on real processes: through the inference service that serves the version
(counted by its statistics), in process for a version it does not serve, the same numbers both ways and
as numpy computes them; the table, the HTML report, progress; and `aiaas optimize --evaluate`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc

import aiaas
from aiaas.eval import registry_io
from aiaas.registry_client import RegistryClient
from tests.eval.conftest import SPEC, WEIGHT, WRONG_WEIGHT, Labeled, classifier, cli, cli_json, write_parquet
from tests.registry.service import RunningRegistry
from tests.support.procs import ServiceProcess


@dataclasses.dataclass(frozen=True)
class Stack:
    registry: str
    inference: str
    spec: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data: Labeled) -> Iterator[Stack]:
    """clf version 1 (right) served as production; version 2 (classes shuffled) registered, not served."""
    tmp = tmp_path_factory.mktemp("evaluate")
    registry = RunningRegistry("sqlite", None).start()
    inference = None
    try:
        for weight, alias in ((WEIGHT, "production"), (WRONG_WEIGHT, None)):
            aiaas.deploy(classifier(weight), torch.randn(4, 4), name="clf", registry=registry.address, alias=alias,
                         input_names=["x"], output_names=["logits"], max_batch_size=64)
        with RegistryClient(registry.address) as client:
            registry_io.upload_dataset(client, "clf-test", write_parquet(tmp / "test.parquet", data),
                                       labels=["label"], model="clf")
        inference = ServiceProcess("inference", args=[
            "--registry-url", registry.address, "--model-cache-dir", str(tmp / "cache"), "--follow-aliases",
            "production", "--torch-threads", "1", "--worker-mode", "thread", "--grace-period-s", "2",
            "--startup-timeout-s", "90"]).start(timeout=120)
        inference.wait_ready("clf/1", timeout=90)
        spec = tmp / "spec.yaml"
        spec.write_text(SPEC)
        yield Stack(registry.address, inference.address, spec)
    finally:
        if inference is not None:
            inference.stop()
        registry.close()


def served_rows(stack: Stack, version: str = "1") -> int:
    with tc.InferenceServerClient(stack.inference) as client:
        stats = client.get_inference_statistics("clf", version, as_json=True)
    return int(stats["model_stats"][0].get("inference_count", 0))


def by_slice(result: dict) -> dict[str, dict]:
    return {s["slice"]: s for s in result["slices"]}


def test_the_serving_path_evaluates_what_serves(capsys: pytest.CaptureFixture[str], stack: Stack,
                                                data: Labeled) -> None:
    before = served_rows(stack)
    code, out, err = cli(capsys, stack.registry, "evaluate", "clf", "production", "--dataset", "clf-test",
                         "--spec", str(stack.spec), "--inference", stack.inference, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["path"] == "serving" and result["version"] == "1" and result["passed"] is True
    assert served_rows(stack) - before == 600  # every example went through the inference service
    assert "clf version 1: 600/600 rows" in err and "rows/s" in err  # progress, one line at the end off a terminal
    slices = by_slice(result)
    assert slices["overall"]["metrics"]["accuracy"] == pytest.approx(data.accuracy(WEIGHT))
    for country in ("fr", "de", "us"):
        expected = data.accuracy(WEIGHT, data.country == country)
        assert slices[f"country={country}"]["metrics"]["accuracy"] == pytest.approx(expected)
        assert slices[f"country={country}"]["example_count"] == str(int(np.sum(data.country == country)))
    assert slices["age<40"]["example_count"] == str(int(np.sum(data.age < 40)))
    assert data.accuracy(WEIGHT, data.country == "us") < data.accuracy(WEIGHT, data.country == "fr")
    assert {"latency_ms_p50", "latency_ms_p95", "latency_ms_p99"} <= set(slices["overall"]["metrics"])
    assert result["baseline_version"] == "1" and "the baseline is the evaluated version itself" in result["notes"]

    # In process, through the serving loader: the same numbers.
    local = cli_json(capsys, stack.registry, "evaluate", "clf", "1", "--dataset", "clf-test", "--spec",
                     str(stack.spec), "--path", "in-process", "--no-store", "--quiet")
    assert local["path"] == "in-process"
    for name in ("accuracy", "f1_macro", "log_loss", "roc_auc", "ece"):
        assert by_slice(local)["overall"]["metrics"][name] == pytest.approx(slices["overall"]["metrics"][name],
                                                                           rel=1e-5)
    with RegistryClient(stack.registry) as client:
        stored = registry_io.get_evaluation(client, "clf", 1, "holdout")
    assert stored.path == "serving" and stored.dataset == "clf-test" and stored.actor


def test_an_unserved_version_runs_in_process_with_a_report(capsys: pytest.CaptureFixture[str], stack: Stack,
                                                           data: Labeled, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    code, out, err = cli(capsys, stack.registry, "evaluate", "clf", "2", "--dataset", "clf-test", "--spec",
                         str(stack.spec), "--inference", stack.inference, "--html", str(report), "--quiet")
    assert code == 3, err  # thresholds failed; the result is stored all the same
    lines = out.splitlines()
    assert lines[0].startswith("evaluation 'holdout' of clf version 2 on data set 'clf-test': 600 examples, "
                               "in-process") and lines[0].endswith("FAILED")
    assert lines[1] == "baseline: version 1 (production); changes in parentheses"
    header = next(line for line in lines if line.startswith("SLICE"))
    assert header.split() == ["SLICE", "EXAMPLES", "ACCURACY", "ECE", "F1_MACRO", "LOG_LOSS", "ROC_AUC"]
    overall = next(line for line in lines if line.startswith("overall"))
    drop = data.accuracy(WRONG_WEIGHT) - data.accuracy(WEIGHT)
    assert f"{data.accuracy(WRONG_WEIGHT):.4f} ({drop:+.4f}) !" in overall
    assert any(line.startswith("  FAILED accuracy drop <= 0.02 vs baseline failed") for line in lines)
    page = report.read_text()
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == 6  # 5 metrics + matrix
    assert "confusion matrix" in page and "FAILED" in page

    code, _, err = cli(capsys, stack.registry, "evaluate", "clf", "2", "--dataset", "clf-test", "--spec",
                       str(stack.spec), "--inference", stack.inference, "--path", "serving", "--quiet")
    assert code == 1 and "clf version 2 is not loaded by the inference service" in err


def test_a_version_the_data_set_does_not_fit(capsys: pytest.CaptureFixture[str], stack: Stack) -> None:
    aiaas.deploy(torch.nn.Linear(5, 3).eval(), torch.randn(4, 5), name="wide", registry=stack.registry, alias=None,
                 input_names=["x"], output_names=["logits"])
    code, _, err = cli(capsys, stack.registry, "evaluate", "wide", "1", "--dataset", "clf-test", "--spec",
                       str(stack.spec), "--quiet")
    assert code == 1
    assert ("INVALID_ARGUMENT: the data set does not fit wide version 1: column 'x' does not fit input 'x': "
            "expected FP32 with per-row shape [5], got FP32 [4]") in err


def test_optimize_evaluates_the_candidate_beside_parity(capsys: pytest.CaptureFixture[str], stack: Stack) -> None:
    assert cli(capsys, stack.registry, "eval-gate", "set", "clf", "--dataset", "clf-test", "--spec",
               str(stack.spec))[0] == 0
    made = cli_json(capsys, stack.registry, "optimize", "clf", "1", "--quantize", "int8-dynamic", "--evaluate")
    evaluation = made["evaluations"][0]
    assert made["parity"]["passed"] is True
    assert evaluation["passed"] is True and evaluation["baseline_version"] == "1" and evaluation["path"] == "in-process"
    with RegistryClient(stack.registry) as client:
        stored = registry_io.get_evaluation(client, "clf", made["version"], "holdout")
        assert stored.passed and stored.version == made["version"]
        # The gate finds the stored result: production may move to the quantized version.
        client.set_alias("clf", "production", made["version"])
        latest = client.get_model("clf").latest_version

    # The wrong version fails the model's evaluation: nothing is registered.
    code, out, err = cli(capsys, stack.registry, "optimize", "clf", "2", "--dtype", "fp16", "--evaluate")
    assert code == 3 and "refused: the candidate failed an evaluation; nothing was registered" in err
    assert "evaluation 'holdout' of the clf candidate" in out
    with RegistryClient(stack.registry) as client:
        assert client.get_model("clf").latest_version == latest
