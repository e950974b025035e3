"""The event loop every service process runs on: uvloop where it is installed, asyncio's own otherwise.

`AIAAS_EVENT_LOOP` chooses: `auto` (default: uvloop when importable), `uvloop` (fail if it is not
installed), `asyncio` (the standard library's loop).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")


def loop_kind() -> str:
    """The loop `run` will use: 'uvloop' or 'asyncio'."""
    wanted = os.environ.get("AIAAS_EVENT_LOOP", "auto").strip().lower() or "auto"
    if wanted not in CHOICES:
        raise ValueError(f"AIAAS_EVENT_LOOP={wanted!r}: use one of {', '.join(CHOICES)}")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if wanted == "uvloop":
            raise RuntimeError("AIAAS_EVENT_LOOP=uvloop but uvloop is not installed (pip install uvloop)") from None
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop `loop_kind()` names."""
    try:
        kind = loop_kind()
    except BaseException:
        main.close()  # never started: no "was never awaited" warning on top of the error
        raise
    if kind == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
