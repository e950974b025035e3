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


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(("setting", "expected"), [(None, "uvloop"), ("auto", "uvloop"), ("uvloop", "uvloop"),
                                                   ("asyncio", "asyncio")])
def test_run_uses_the_loop_the_environment_names(monkeypatch: pytest.MonkeyPatch, setting: str | None,
                                                 expected: str) -> None:
    if setting is None:
        monkeypatch.delenv(eventloop.ENV, raising=False)
    else:
        monkeypatch.setenv(eventloop.ENV, setting)
    assert eventloop.loop_kind() == expected
    assert eventloop.run(_loop_module()).startswith(expected)


def test_an_explicit_choice_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "uvloop")
    assert eventloop.run(_loop_module(), "asyncio").startswith("asyncio")


def test_an_unknown_choice_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, uvloop, asyncio"):
        eventloop.run(_loop_module(), "tokio")


def test_uvloop_asked_for_but_missing_is_a_settings_error_that_says_how_to_install(tmp_path: Path) -> None:
    # A service started where importing uvloop fails, as on a machine without it: refused at start
    # (exit 2, the settings error), while auto falls back to asyncio's loop.
    code = ("import sys; sys.modules['uvloop'] = None\n"
            "from services.common import eventloop\n"
            "print(eventloop.loop_kind('auto'))\n"
            "from services.registry.__main__ import main\n"
            "sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", code, "--event-loop", "uvloop", "--database-url",
                           f"sqlite:///{tmp_path}/r.db"], check=False, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2, done.stderr
    assert done.stdout.splitlines() == ["asyncio"]
    assert "uvloop is not installed (pip install uvloop)" in done.stderr


def test_a_bad_setting_is_refused_at_start() -> None:
    done = subprocess.run([sys.executable, "-m", "services.registry", "--event-loop", "tokio"],
                          check=False, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2
    assert "event_loop must be one of auto, uvloop, asyncio, got 'tokio'" in done.stderr


def _maps_uvloop(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return any("uvloop" in line for line in maps)


@pytest.mark.parametrize("setting", ["uvloop", "asyncio"])
def test_a_service_and_its_frontend_processes_run_on_the_chosen_loop(tmp_path: Path, setting: str) -> None:
    # The setting as a flag: the inference core's frontend process (a child) follows it too.
    registry = ServiceProcess("registry", args=["--database-url", f"sqlite:///{tmp_path}/r.db",
                                                "--artifact-dir", str(tmp_path / "a")]).start()
    inference = ServiceProcess("inference", args=["--registry-url", registry.address, "--model-cache-dir",
                                                  str(tmp_path / "c"), "--frontends", "2", "--event-loop", setting])
    try:
        inference.start(timeout=120)
        assert inference.proc is not None
        import psutil

        frontends = [p for p in psutil.Process(inference.proc.pid).children()
                     if "services.inference.frontend" in " ".join(p.cmdline())]
        assert len(frontends) == 1
        for pid in (inference.proc.pid, frontends[0].pid):
            deadline = time.monotonic() + 5
            while setting == "uvloop" and not _maps_uvloop(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _maps_uvloop(pid) is (setting == "uvloop"), pid
    finally:
        inference.stop()
        registry.stop()
