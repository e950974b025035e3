"""Shared pieces of the evaluation tests: a linear classifier whose answers numpy reproduces, a labeled
data set with slicing features, specs, and the CLI run against a real registry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from aiaas.cli.main import main

# Class c scores feature c twice (and feature 3 nudges classes 0 and 1 apart).
WEIGHT = np.array([[2.0, 0.0, 0.0, 1.0], [0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 2.0, 0.0]], np.float32)
# The same model with its classes shuffled: right about a third of the time.
WRONG_WEIGHT = WEIGHT[[1, 2, 0]]

SPEC = """
name: holdout
task: classification
label: label
metrics: [accuracy, f1_macro, log_loss, roc_auc, ece, confusion_matrix, example_count, latency]
slices:
  - overall
  - feature: country
  - {feature: age, buckets: [40]}
thresholds:
  - {metric: accuracy, min: 0.8, min_examples: 50}
  - {metric: accuracy, max_decrease: 0.02, slices: [overall]}
baseline: production
"""


def classifier(weight: np.ndarray) -> torch.nn.Module:
    module = torch.nn.Linear(4, 3)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        module.bias.zero_()
    return module.eval()


@dataclasses.dataclass(frozen=True)
class Labeled:
    x: np.ndarray
    label: np.ndarray
    country: np.ndarray
    age: np.ndarray

    def predicted(self, weight: np.ndarray) -> np.ndarray:
        return (self.x @ weight.T).argmax(axis=1)

    def accuracy(self, weight: np.ndarray, rows: np.ndarray | None = None) -> float:
        keep = np.ones(len(self.label), bool) if rows is None else rows
        return float(np.mean(self.predicted(weight)[keep] == self.label[keep]))


def labeled(n: int = 600, seed: int = 0) -> Labeled:
    """Labels from the true weights, with 10% of the "us" labels wrong: accuracy is about 0.97, lower on us."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    label = (x @ WEIGHT.T).argmax(axis=1)
    country = np.array(["fr", "de", "us"], dtype=object)[rng.integers(0, 3, n)]
    flip = (country == "us") & (rng.random(n) < 0.1)
    label = np.where(flip, (label + 1) % 3, label)
    age = rng.integers(18, 70, n)
    return Labeled(x, label, country, age)


def write_parquet(path: Path, data: Labeled, width: int = 4) -> Path:
    x = data.x[:, :width]
    pq.write_table(pa.table({
        "x": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).reshape(-1)), width),
        "label": data.label, "country": data.country, "age": data.age}), path)
    return path


@pytest.fixture(scope="module")
def data() -> Labeled:
    return labeled()


def cli(capsys: pytest.CaptureFixture[str], registry: str, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--registry", registry])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_json(capsys: pytest.CaptureFixture[str], registry: str, *argv: str, code: int = 0) -> Any:
    found, out, err = cli(capsys, registry, *argv, "--json")
    assert found == code, err
    return json.loads(out)
