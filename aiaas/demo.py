"""The demo model `aiaas up` serves: the classic tutorial MLP (10 -> 50 -> 10), trained for a
moment on a seeded synthetic task (the class is the largest of ten fixed linear projections of
the input), so its answers mean something and repeat from one machine to the next.

It is registered as a `torch.export` program (`DEMO_FORMAT`), which the artifact gate rebuilds
without any pickle; `aiaas up --demo-format torchscript` still registers TorchScript.

Its held-out test set (`demo_test_set`: 2,000 fresh examples of the same task, never seen in
training, with a `difficulty` feature: how close the two best classes are) and an evaluation
spec (`DEMO_EVAL_SPEC`) are written by `write_demo_eval` as NPZ and YAML, so `aiaas up` can
register the data set `demo-test` and `aiaas evaluate demo 1 --dataset demo-test --spec ...`
works with nothing downloaded.
"""

from __future__ import annotations

import dataclasses
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from aiaas.pipeline.signature import ServingConfig

DEMO_MODEL = "demo"
DEMO_INPUT = "INPUT0"
DEMO_OUTPUT = "OUTPUT0"
DEMO_FEATURES = 10
DEMO_CLASSES = 10
DEMO_FORMAT = "torch_export"
DEMO_SERVING = ServingConfig(max_batch_size=32, preferred_batch_sizes=(8, 16, 32), max_queue_delay_us=500)
DEMO_DATASET = "demo-test"
DEMO_LABEL = "label"
DEMO_TEST_ROWS = 2000
# The test examples come from their own generator: none of them is a training example.
_TEST_SEED_OFFSET = 10_007
# `difficulty` of an example: the gap between its two best classes' projections.
DIFFICULTY_BOUNDS = ((0.75, "hard"), (2.0, "medium"))
DEMO_EVAL_SPEC = """\
# The demo's held-out evaluation (aiaas up wrote it; docs/evaluation.md explains every key).
name: holdout
task: classification
label: label
output: OUTPUT0
scores: logits
metrics: [accuracy, top_3_accuracy, f1_macro, log_loss, ece, confusion_matrix, example_count, latency]
slices:
  - overall
  - feature: difficulty          # hard / medium / easy: how close the two best classes are
thresholds:
  - {metric: accuracy, min: 0.9, slices: [overall]}
  - {metric: accuracy, min: 0.75, min_examples: 100}            # every slice with >= 100 examples
  - {metric: accuracy, max_decrease: 0.02, slices: [overall]}   # vs the baseline (production)
baseline: production
batch_size: 32
"""


@dataclasses.dataclass(frozen=True)
class DemoModel:
    module: torch.nn.Module
    accuracy: float
    train_seconds: float
    steps: int


class TutorialMLP(torch.nn.Module):
    """Linear(10, 50) -> ReLU -> Linear(50, 10): the shape of PyTorch's classic tutorial net."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(DEMO_FEATURES, 50)
        self.relu = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(50, DEMO_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def synthetic_batch(generator: torch.Generator, projection: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(size, DEMO_FEATURES, generator=generator)
    return x, (x @ projection).argmax(dim=1)


def demo_projection(seed: int = 0) -> torch.Tensor:
    """The task's ten projections (the first draw `train_demo` makes from its generator)."""
    return torch.randn(DEMO_FEATURES, DEMO_CLASSES, generator=torch.Generator().manual_seed(seed))


def train_demo(seed: int = 0, max_steps: int = 300, max_seconds: float = 20.0) -> DemoModel:
    """Adam for `max_steps` on fresh batches (a couple of seconds on a laptop); `max_seconds` only
    guards a very slow machine, so the same seed gives the same model everywhere else."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    projection = torch.randn(DEMO_FEATURES, DEMO_CLASSES, generator=generator)
    module = TutorialMLP()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    started = time.monotonic()
    steps = 0
    while steps < max_steps and time.monotonic() - started < max_seconds:
        x, y = synthetic_batch(generator, projection, 128)
        optimizer.zero_grad()
        loss_fn(module(x), y).backward()
        optimizer.step()
        steps += 1
    module.eval()
    x, y = synthetic_batch(generator, projection, 2000)
    with torch.no_grad():
        accuracy = float((module(x).argmax(dim=1) == y).float().mean())
    return DemoModel(module, accuracy, time.monotonic() - started, steps)


def example_input(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, DEMO_FEATURES, generator=torch.Generator().manual_seed(seed))


def demo_test_set(rows: int = DEMO_TEST_ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    """Held-out labeled examples of the task `train_demo(seed)` learns: `INPUT0` [rows, 10] FP32,
    `label` (the class), `difficulty` (hard / medium / easy by the gap between the two best
    classes' projections) and that `margin` itself."""
    projection = demo_projection(seed)
    x = torch.randn(rows, DEMO_FEATURES, generator=torch.Generator().manual_seed(seed + _TEST_SEED_OFFSET))
    scores = x @ projection
    best = scores.topk(2, dim=1).values
    margin = (best[:, 0] - best[:, 1]).numpy()
    difficulty = np.full(rows, "easy", dtype="<U6")
    for bound, name in reversed(DIFFICULTY_BOUNDS):
        difficulty[margin < bound] = name
    return {"INPUT0": x.numpy().astype(np.float32), DEMO_LABEL: scores.argmax(dim=1).numpy().astype(np.int64),
            "difficulty": difficulty, "margin": margin.astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class DemoEvalFiles:
    dataset: Path
    spec: Path


def write_demo_eval(directory: Path, seed: int = 0) -> DemoEvalFiles:
    """`demo-test.npz` (the held-out set) and `eval-spec.yaml` in `directory`. The data set is
    rewritten each time, byte for byte the same (so the registry's copy keeps matching it); the
    spec only when missing, so edits to it stay."""
    directory.mkdir(parents=True, exist_ok=True)
    files = DemoEvalFiles(directory / f"{DEMO_DATASET}.npz", directory / "eval-spec.yaml")
    temporary = directory / f".{DEMO_DATASET}.tmp.npz"
    # np.savez stamps each member with the current time; a fixed stamp makes the file reproducible.
    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
        for name, values in demo_test_set(seed=seed).items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(values), allow_pickle=False)
    temporary.replace(files.dataset)
    if not files.spec.exists():
        files.spec.write_text(DEMO_EVAL_SPEC)
    return files
