"""The demo model `aiaas up` serves: the classic tutorial MLP (10 -> 50 -> 10), trained for a
moment on a seeded synthetic task (the class is the largest of ten fixed linear projections of
the input), so its answers mean something and repeat from one machine to the next.

It is registered as a `torch.export` program (`DEMO_FORMAT`), which the artifact gate rebuilds
without any pickle; `aiaas up --demo-format torchscript` still registers TorchScript.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from aiaas.pipeline.signature import ServingConfig

DEMO_MODEL = "demo"
DEMO_INPUT = "INPUT0"
DEMO_OUTPUT = "OUTPUT0"
DEMO_FEATURES = 10
DEMO_CLASSES = 10
DEMO_FORMAT = "torch_export"
DEMO_SERVING = ServingConfig(max_batch_size=32, preferred_batch_sizes=(8, 16, 32), max_queue_delay_us=500)


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
