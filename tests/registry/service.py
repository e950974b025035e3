"""A registry running as a real process (`python -m services.registry`) for integration tests."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.registry.conftest import make_database
from tests.support.procs import ServiceProcess


class RunningRegistry:
    def __init__(self, backend: str, postgres: object | None, *extra: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="aiaas-registry-test-"))
        self.artifact_dir = self.dir / "artifacts"
        self.database_url = make_database(backend, self.dir, postgres)  # type: ignore[arg-type]
        self.process = ServiceProcess("registry", args=[
            "--database-url", self.database_url, "--artifact-dir", str(self.artifact_dir), "--grace-period-s", "5",
            *extra])

    @property
    def address(self) -> str:
        return self.process.address

    def start(self) -> RunningRegistry:
        self.process.start()
        return self

    def close(self) -> None:
        self.process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def files(self) -> list[Path]:
        return sorted(p for p in self.artifact_dir.rglob("*") if p.is_file())


def running_registry(request: pytest.FixtureRequest, *extra: str) -> Iterator[RunningRegistry]:
    backend = request.param
    postgres = request.getfixturevalue("postgres_server") if backend == "postgres" else None
    registry = RunningRegistry(backend, postgres, *extra).start()
    yield registry
    registry.close()


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()
