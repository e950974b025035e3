"""Build the wheels of the two distributions: aiaas-client (clients/python) and, with --server, aiaas.

    python tools/build_client.py --out dist/            # dist/aiaas_client-0.1.0-py3-none-any.whl
    python tools/build_client.py --out dist/ --server   # and dist/aiaas-0.1.0-py3-none-any.whl

clients/python is the client's project; its package is the repository's own aiaas/ folder, of whose
modules it ships those `[tool.aiaas-client] modules` names in its pyproject.toml. The server project
(the root pyproject.toml) requires aiaas-client and leaves those modules out. Both are built from a
copy in a temporary folder (the checkout gets no build/ or egg-info) by `pip wheel --no-deps
--no-build-isolation`, with this environment's setuptools. Wheels only: the client project reaches
outside its folder for its package, which an sdist cannot hold.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT_PROJECT = ROOT / "clients" / "python"
CLIENT_CONFIG = tomllib.loads((CLIENT_PROJECT / "pyproject.toml").read_text())
# Modules directly in aiaas/ that the client ships, and its packages (aiaas and the generated stubs).
CLIENT_MODULES: tuple[str, ...] = tuple(CLIENT_CONFIG["tool"]["aiaas-client"]["modules"])
CLIENT_PACKAGES: tuple[str, ...] = tuple(CLIENT_CONFIG["tool"]["setuptools"]["packages"])
_SKIP = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")


def stage_client(target: Path) -> Path:
    """clients/python and aiaas/ under `target`, laid out as in the repository; the project folder."""
    shutil.copytree(CLIENT_PROJECT, target / "clients" / "python", ignore=_SKIP)
    shutil.copytree(ROOT / "aiaas", target / "aiaas", ignore=_SKIP)
    return target / "clients" / "python"


def stage_server(target: Path) -> Path:
    """The server project under `target` (it reads the client's pyproject.toml to leave its modules out)."""
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, target / name)
    for folder in ("aiaas", "services"):
        shutil.copytree(ROOT / folder, target / folder, ignore=_SKIP)
    (target / "clients" / "python").mkdir(parents=True)
    shutil.copy(CLIENT_PROJECT / "pyproject.toml", target / "clients" / "python" / "pyproject.toml")
    return target


def _wheel(stage: Path, out: Path, pattern: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(stage)], check=True)
    wheels = sorted(out.glob(pattern))
    if not wheels:
        raise SystemExit(f"no {pattern} in {out}")
    return wheels[-1]


def build(out: Path) -> Path:
    """The aiaas-client wheel, written to `out`."""
    with tempfile.TemporaryDirectory(prefix="aiaas-client-") as tmp:
        return _wheel(stage_client(Path(tmp)), out, "aiaas_client-*.whl")


def build_server(out: Path) -> Path:
    """The aiaas (server) wheel, written to `out`."""
    with tempfile.TemporaryDirectory(prefix="aiaas-server-") as tmp:
        return _wheel(stage_server(Path(tmp)), out, "aiaas-*.whl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    parser.add_argument("--server", action="store_true", help="also build the server distribution's wheel")
    args = parser.parse_args()
    print(build(args.out))
    if args.server:
        print(build_server(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
