"""The event loop every service process runs on: uvloop where it is installed, asyncio's own otherwise.

The `event_loop` setting (`--event-loop`, `AIAAS_EVENT_LOOP`) chooses: `auto` (default: uvloop when
importable), `uvloop` (fail if it is not installed), `asyncio` (the standard library's loop). A
service's own child processes (gateway processes, inference frontends) read `AIAAS_EVENT_LOOP`, which
`services.common.main` sets from the parent's setting before it starts them.

grpc.aio polls its completion queue on a thread of its own and wakes the loop through a file
descriptor, so the loop carries only part of each call's work: measured (bench/bench_event_loop.py,
docs/inference.md "Event loop"), uvloop moved the gateway's throughput a few percent and the
inference service's not beyond noise.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")
ENV = "AIAAS_EVENT_LOOP"


def loop_kind(wanted: str | None = None) -> str:
    """The loop `run` will use for `wanted` (default: $AIAAS_EVENT_LOOP, else auto): 'uvloop' or 'asyncio'."""
    if wanted is None:
        wanted = os.environ.get(ENV, "auto")
    wanted = wanted.strip().lower() or "auto"
    if wanted not in CHOICES:
        raise ValueError(f"event loop {wanted!r}: use one of {', '.join(CHOICES)}")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if wanted == "uvloop":
            raise RuntimeError("event loop uvloop asked for, but uvloop is not installed (pip install uvloop)") from None
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], wanted: str | None = None) -> T:
    """`asyncio.run(main)` on the loop `loop_kind(wanted)` names."""
    try:
        kind = loop_kind(wanted)
    except BaseException:
        main.close()  # never started: no "was never awaited" warning on top of the error
        raise
    if kind == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
