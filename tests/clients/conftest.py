"""Client apps in other languages: collected only where `node` is installed (as `make test` says);
their npm packages (clients/node/package-lock.json) are installed with `npm ci` when missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import REPO_ROOT

NODE_CLIENT = REPO_ROOT / "clients" / "node"

# Python-only machines run everything else; the vendored-proto check needs no node.
collect_ignore = [] if shutil.which("node") else ["test_node_client.py", "test_buf.py"]


def _installed(modules: Path) -> bool:
    """npm writes node_modules/.package-lock.json on every install; older than the lock means stale."""
    hidden = modules / ".package-lock.json"
    return hidden.exists() and hidden.stat().st_mtime >= (NODE_CLIENT / "package-lock.json").stat().st_mtime


@pytest.fixture(scope="session")
def node_modules() -> Path:
    modules = NODE_CLIENT / "node_modules"
    if not _installed(modules):
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("node is on PATH but npm is not: install npm (Debian: apt-get install -y npm)")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, capture_output=True,
                              text=True, timeout=300, check=False)
        if done.returncode != 0:
            pytest.fail(f"`npm ci` in {NODE_CLIENT} failed:\n{done.stdout}\n{done.stderr}")
    return modules
