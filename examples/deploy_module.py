"""From an `nn.Module` in this process to a served version with `aiaas.deploy`.

    aiaas up                          # in another terminal
    python examples/deploy_module.py

Deploys a small classifier as model `iris-like` (torch.export, alias production) and prints the
parity report stored with the version.
"""

from __future__ import annotations

import torch

import aiaas


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    torch.manual_seed(0)
    model = Classifier().eval()
    deployment = aiaas.deploy(model, torch.randn(8, 4), name="iris-like", alias="production")
    report = deployment.parity
    print(f"iris-like version {deployment.version} ({deployment.format}) -> production")
    print(f"parity: passed={report['passed']} max_abs_err={report['max_abs_err']:.2g} "
          f"cosine={report['cosine']:.6f}")
    print("next: aiaas optimize iris-like", deployment.version, "--quantize int8-dynamic")


if __name__ == "__main__":
    main()
