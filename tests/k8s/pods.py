"""Run what a rendered pod would run, here: its TLS settings with the paths of its Secret
volumes mapped onto folders laid out as `aiaas k8s dev-certs` writes them (OUTDIR/<secret>/<key>)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aiaas.k8s.checks import workloads
from aiaas.k8s.manifest import Manifest
from aiaas.k8s.tls import env_values, secret_file
from tests.k8s.specs import spec_of
from tests.support.procs import REPO_ROOT


def container_of(objects: list[Manifest], name: str) -> tuple[dict, dict]:
    """(pod spec, container) of the workload and container called `name`."""
    spec = spec_of(next(w for w in workloads(objects) if w["metadata"]["name"] == name))
    return spec, next(c for c in spec["containers"] if c["name"] == name)


def tls_env(objects: list[Manifest], name: str, secrets_dir: Path) -> dict[str, str]:
    """The container's TLS settings (AIAAS_TLS_*, AIAAS_CLIENT_TLS_*), each file path replaced by
    the file its Secret volume would hold."""
    spec, container = container_of(objects, name)
    env = {}
    for key, value in env_values(container).items():
        if key.startswith(("AIAAS_TLS_", "AIAAS_CLIENT_TLS_")):
            found = secret_file(spec, container, value)
            if found is None:
                raise AssertionError(f"{name}: {key}={value} is not in a mounted Secret")
            env[key] = str(secrets_dir / found[0] / found[1])
    return env


def probe_command(objects: list[Manifest], name: str, port: int, probe: str = "readinessProbe") -> list[str]:
    """The container's exec probe, with this interpreter and the port the test's process listens on."""
    _, container = container_of(objects, name)
    command = list(container[probe]["exec"]["command"])
    if command[:1] != ["python"] or "--port" not in command:
        raise AssertionError(f"{name} {probe} is not a python --port probe: {command}")
    command[0] = sys.executable
    command[command.index("--port") + 1] = str(port)
    return command


def run_probe(command: list[str], env: dict[str, str], timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """The probe as the kubelet runs it: a process in the container's environment, judged by its exit."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout_s, check=False)


def probe_until_ready(command: list[str], env: dict[str, str], deadline_s: float = 90.0,
                      alive: Callable[[], bool] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the probe until it passes (as a startup probe would), or fail with its last answer."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = run_probe(command, env)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        if alive is not None and not alive():
            return result
        time.sleep(0.2)
