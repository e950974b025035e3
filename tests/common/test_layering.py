"""The import graph: the client package stands alone, and services reach each other only over gRPC.

- `aiaas/` (SDK, CLI, pipeline) imports nothing from `services/`: a client app can install it
  without the servers.
- `services/<a>/` imports only `services/common/`, `aiaas/` and itself, never `services/<b>/`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("registry", "inference", "gateway", "monitor")

# Imports across the layers still to be removed, each with the reason it exists (none left). Never grow it.
KNOWN: dict[tuple[str, str], str] = {}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _violations() -> list[tuple[str, str]]:
    bad = []
    for path in sorted(ROOT.glob("aiaas/**/*.py")):
        relative = path.relative_to(ROOT).as_posix()
        bad += [(relative, name) for name in _imports(path) if name.split(".")[0] == "services"]
    for service in SERVICES:
        for path in sorted((ROOT / "services" / service).glob("**/*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] == "services" and len(parts) > 1 and parts[1] in SERVICES and parts[1] != service:
                    bad.append((relative, name))
    return bad


def test_no_client_to_server_or_cross_service_imports() -> None:
    unexpected = [v for v in _violations() if v not in KNOWN]
    assert unexpected == [], "imports across the layers:\n" + "\n".join(f"{f}: {m}" for f, m in unexpected)


def test_the_known_list_only_holds_imports_that_still_exist() -> None:
    assert set(KNOWN) <= set(_violations()), "remove fixed entries from KNOWN"
