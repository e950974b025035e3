"""Small modules the pipeline tests export and transform."""

from __future__ import annotations

import torch


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10)).eval()


class SignBranch(torch.nn.Module):
    """Data-dependent control flow: a trace freezes the branch its example input took."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


class TwoInTwoOut(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 4)
        self.b = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x) + self.b(y)
        return h, h.sum(dim=1, keepdim=True)


def factory() -> torch.nn.Module:
    """`tests.pipeline.models:factory` for `aiaas convert`."""
    return mlp(seed=1)
