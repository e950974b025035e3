"""Build the client distribution (aiaas-client) wheel from the repository's aiaas/ package.

    python tools/build_client.py --out dist/

Copies exactly `CLIENT_MODULES` and the generated stub packages into a staging folder with
clients/python/pyproject.toml, then runs `pip wheel --no-deps` on it. The client package's
`aiaas/__init__.py` is the repository's: its lazy `aiaas.deploy` says to install the full
distribution when the pipeline is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT_MODULES = (
    "__init__.py", "identity.py", "errors.py", "formats.py", "serving.py", "records.py", "tensors.py", "api_keys.py",
    "_registry_convert.py", "registry_client.py", "gateway_client.py", "monitor_client.py", "manifest.py",
    "_files_download.py",
)
STUB_PACKAGES = ("registry", "gateway", "monitor")


def stage(target: Path) -> Path:
    """The client source tree under `target`: pyproject + aiaas/ with only the client modules."""
    shutil.copy(ROOT / "clients" / "python" / "pyproject.toml", target / "pyproject.toml")
    shutil.copy(ROOT / "clients" / "python" / "README.md", target / "README.md")
    package = target / "aiaas"
    package.mkdir()
    for name in CLIENT_MODULES:
        shutil.copy(ROOT / "aiaas" / name, package / name)
    for stub in STUB_PACKAGES:
        shutil.copytree(ROOT / "aiaas" / stub, package / stub, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "py.typed").write_text("")
    return target


def build(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aiaas-client-") as tmp:
        source = stage(Path(tmp))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(source)], check=True)
    wheels = sorted(out.glob("aiaas_client-*.whl"))
    if not wheels:
        raise SystemExit(f"no aiaas_client wheel in {out}")
    return wheels[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    print(build(parser.parse_args().out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
