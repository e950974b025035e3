"""The client distribution installs alone: a clean virtual environment with only aiaas-client
imports every client module, talks to a real registry, and cannot import torch or the servers. The
server distribution requires it and ships none of its files: between them, every file of aiaas/."""

from __future__ import annotations

import email.parser
import json
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import aiaas
from tests.registry.service import RunningRegistry
from tests.support.blobs import onnx_blob
from tools.build_client import CLIENT_MODULES, build, build_server

ROOT = Path(__file__).resolve().parents[2]

CLIENT_SCRIPT = textwrap.dedent("""
    import importlib, importlib.util, json, sys
    address, artifact = sys.argv[1], sys.argv[2]
    modules = [m for m in sys.argv[3].split(",")]
    for name in modules:
        importlib.import_module(name)
    import aiaas
    from aiaas import RegistryClient
    from aiaas.errors import NotFound
    try:
        aiaas.deploy
        deploy = "importable"
    except ImportError as exc:
        deploy = str(exc)
    with RegistryClient(address, actor="client-app") as client:
        version = client.register("from-client", open(artifact, "rb").read(), format="onnx",
                                  signature={"inputs": ["x:FP32:-1,4"], "outputs": ["y:FP32:-1,4"]})
        try:
            client.get_model("missing")
            missing = "found"
        except Exception as exc:
            missing = type(exc).__name__ + ":" + str(getattr(exc, "code", lambda: "")())
    print(json.dumps({
        "torch": importlib.util.find_spec("torch") is not None,
        "services": importlib.util.find_spec("services") is not None,
        "file": aiaas.__file__, "version": version.version, "deploy": deploy, "missing": missing,
        "loaded_heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "services")),
    }))
""")


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("client-dist"))


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory, client_wheel: Path) -> Path:
    base = tmp_path_factory.mktemp("client-venv")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # Outside the repository: nothing of the checkout may leak onto the client's path.
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(client_wheel)], check=True, cwd=base,
                   timeout=600)
    return venv


@pytest.fixture(scope="module")
def registry() -> Iterator[RunningRegistry]:
    running = RunningRegistry("sqlite", None).start()
    yield running
    running.close()


def test_the_client_wheel_works_alone_against_a_real_registry(client_venv: Path, registry: RunningRegistry,
                                                              tmp_path: Path) -> None:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(onnx_blob("client"))
    modules = ["aiaas"] + [f"aiaas.{m}" for m in CLIENT_MODULES if m != "__init__"]
    modules += [f"aiaas.{s}.v1.{s}_pb2_grpc" for s in ("registry", "gateway", "monitor")]
    done = subprocess.run([str(client_venv / "bin" / "python"), "-c", CLIENT_SCRIPT, registry.address,
                           str(artifact), ",".join(modules)],
                          check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          # An empty home: a `~/.aiaas` left by `aiaas up` on this machine holds an
                          # admin token for another stack, which the client would present.
                          env={"PATH": "/usr/bin:/bin", "AIAAS_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch"] is False and report["services"] is False and report["loaded_heavy"] == []
    assert str(client_venv) in report["file"] and str(ROOT) not in report["file"]
    assert report["version"] == 1
    assert "needs the full aiaas distribution" in report["deploy"]
    assert report["missing"].startswith("RegistryError") and "NOT_FOUND" in report["missing"]


def wheel_contents(wheel: Path) -> tuple[email.message.Message, set[str]]:
    """The wheel's METADATA and the files it installs (its .dist-info left out)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(info).decode())
    return metadata, {n for n in names if ".dist-info/" not in n}


def test_the_server_distribution_requires_the_client_and_ships_none_of_its_files(
        client_wheel: Path, tmp_path: Path) -> None:
    client, client_files = wheel_contents(client_wheel)
    server, server_files = wheel_contents(build_server(tmp_path))
    assert (client["Name"], server["Name"]) == ("aiaas-client", "aiaas")
    assert client["Version"] == server["Version"] == aiaas.__version__
    assert f"aiaas-client=={aiaas.__version__}" in server.get_all("Requires-Dist", [])
    assert not any(r.startswith(("torch", "services")) for r in client.get_all("Requires-Dist", []))
    assert client_files & server_files == set()
    package = {str(p.relative_to(ROOT)) for p in (ROOT / "aiaas").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert package <= client_files | server_files, sorted(package - client_files - server_files)
    assert {"aiaas/__init__.py", "aiaas/errors.py", "aiaas/py.typed",
            "aiaas/registry/v1/registry_pb2.py"} <= client_files
    assert {"aiaas/cli/main.py", "aiaas/pki.py", "services/gateway/server.py"} <= server_files
    assert not any(f.startswith(("services/", "aiaas/cli/")) for f in client_files)
