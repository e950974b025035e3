"""Entry point of the `aiaas` command: one sub-command group per area, each in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module defines `register(subparsers) -> None`, adding its commands; a command's
# parser sets `func=callable(args) -> int`. Imports are lazy so `aiaas --help` stays fast.
_COMMAND_MODULES = (
    "aiaas.cli.registry_cmds",
    "aiaas.cli.inference_cmds",
    "aiaas.cli.gateway_cmds",
    "aiaas.cli.monitor_cmds",
    "aiaas.cli.pipeline_cmds",
    "aiaas.cli.eval_cmds",
    "aiaas.cli.k8s_cmds",
    "aiaas.cli.identity_cmds",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiaas",
        description="aiaas: serve trained PyTorch models as a production gRPC service.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        module = importlib.import_module(module_name)
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
