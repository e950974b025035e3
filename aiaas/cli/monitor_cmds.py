"""`aiaas` commands for the monitor area."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this area's commands to the top-level parser."""
