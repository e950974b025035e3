"""Sibling processes of one service, kept running beside it (the inference service's frontends, the
gateway's processes): started once the port is bound, each announcing with one line on stdout that
it accepts; one that dies is started again with backoff; on shutdown all are drained (SIGTERM, the
grace period, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("aiaas.processes")

READY_TIMEOUT_S = 60.0
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0

Spawn = Callable[[int], Awaitable[asyncio.subprocess.Process]]


class ProcessKeeper:
    """`count` processes made by `spawn(index)` (stdout a pipe), each printing `ready_line` once it
    accepts calls (optionally followed by a space and what it announces, see `announced`) and
    nothing else on stdout; kept running until `close`."""

    def __init__(self, name: str, count: int, spawn: Spawn, *, ready_line: str, grace_period_s: float,
                 ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.name = name
        self.count = count
        self._spawn = spawn
        self._ready_line = ready_line.encode()
        self._grace_period_s = grace_period_s
        self._ready_timeout_s = ready_timeout_s
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.restarts = 0
        # What each running, ready process printed after its ready line, by index.
        self.announced: dict[int, str] = {}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes.values() if p.returncode is None]

    async def start(self) -> int:
        """Start them all and wait (up to the ready timeout) until they accept; returns how many do.
        One not ready in time keeps being waited for (and restarted) in the background."""
        if self.count <= 0:
            return 0
        loop = asyncio.get_running_loop()
        ready = [loop.create_future() for _ in range(self.count)]
        self._tasks = [loop.create_task(self._keep(i, ready[i]), name=f"{self.name}-{i}") for i in range(self.count)]
        done, _ = await asyncio.wait(ready, timeout=self._ready_timeout_s)
        return len(done)

    async def _keep(self, index: int, ready: asyncio.Future[None]) -> None:
        delay = RESTART_MIN_S
        while not self._stopping:
            started = time.monotonic()
            try:
                process = await self._spawn(index)
            except OSError as exc:
                log.error("could not start %s %d: %s", self.name, index, exc)
            else:
                self._processes[index] = process
                assert process.stdout is not None
                line = await process.stdout.readline()
                word, _, rest = line.strip().partition(b" ")
                if word == self._ready_line:
                    self.announced[index] = rest.decode(errors="replace")
                    if not ready.done():
                        ready.set_result(None)
                    log.info("%s %d (pid %d) accepting", self.name, index, process.pid)
                await process.stdout.read()  # to EOF: it prints nothing else
                self.announced.pop(index, None)
                code = await process.wait()
                if self._stopping:
                    return
                log.warning("%s %d (pid %d) exited with %s; restarting", self.name, index, process.pid, code)
                self.restarts += 1
            if time.monotonic() - started > RESTART_MAX_S:
                delay = RESTART_MIN_S
            await asyncio.sleep(delay)
            delay = min(RESTART_MAX_S, delay * 2)

    def begin_drain(self) -> None:
        """SIGTERM every process: each stops accepting and drains its calls."""
        self._stopping = True
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)

    async def close(self) -> None:
        """Drain and end them (SIGKILL past the grace period)."""
        self.begin_drain()
        waiting = [asyncio.create_task(p.wait()) for p in self._processes.values() if p.returncode is None]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=self._grace_period_s + 5.0)
            if late:
                for process in self._processes.values():
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.kill()
                await asyncio.wait(late, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def child_environment() -> dict[str, str]:
    """This environment, with the project's root on PYTHONPATH (`python -m services...` from anywhere)."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env
