"""The services' event loop: uvloop by default where installed, asyncio's own on request."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common import eventloop
from tests.support.procs import ServiceProcess


async def _loop_class() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(("setting", "expected"), [(None, "uvloop"), ("auto", "uvloop"), ("uvloop", "uvloop"),
                                                   ("asyncio", "asyncio")])
def test_run_uses_the_loop_the_setting_names(monkeypatch: pytest.MonkeyPatch, setting: str | None,
                                            expected: str) -> None:
    if setting is None:
        monkeypatch.delenv("AIAAS_EVENT_LOOP", raising=False)
    else:
        monkeypatch.setenv("AIAAS_EVENT_LOOP", setting)
    assert eventloop.loop_kind() == expected
    assert eventloop.run(_loop_class()).startswith(expected)


def test_an_unknown_setting_is_refused_with_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIAAS_EVENT_LOOP", "tokio")
    with pytest.raises(ValueError, match="auto, uvloop, asyncio"):
        eventloop.run(_loop_class())


def test_uvloop_asked_for_but_missing_fails_with_how_to_install() -> None:
    # A child interpreter where importing uvloop fails, as on a machine without it.
    code = ("import sys; sys.modules['uvloop'] = None\n"
            "from services.common import eventloop\n"
            "try:\n    eventloop.loop_kind()\nexcept RuntimeError as exc:\n    print(exc)\n"
            "import os; os.environ['AIAAS_EVENT_LOOP'] = 'auto'; print(eventloop.loop_kind())")
    out = subprocess.run([sys.executable, "-c", code], env={"AIAAS_EVENT_LOOP": "uvloop", "PATH": "/usr/bin"},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["AIAAS_EVENT_LOOP=uvloop but uvloop is not installed (pip install uvloop)", "asyncio"]


def _maps_uvloop(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return any("uvloop" in line for line in maps)


@pytest.mark.parametrize("setting", ["uvloop", "asyncio"])
def test_a_service_process_runs_on_the_chosen_loop(tmp_path: Path, setting: str) -> None:
    registry = ServiceProcess("registry", args=["--database-url", f"sqlite:///{tmp_path}/r.db",
                                                "--artifact-dir", str(tmp_path / "a")],
                              env={"AIAAS_EVENT_LOOP": setting}).start()
    try:
        assert registry.proc is not None
        deadline = time.monotonic() + 5
        while not _maps_uvloop(registry.proc.pid) and setting == "uvloop" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _maps_uvloop(registry.proc.pid) is (setting == "uvloop")
    finally:
        registry.stop()
