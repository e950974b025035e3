"""The pipeline against a real registry process: deploy, optimize, convert, the gate's refusals,
and lineage and parity reports read back through the registry API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import aiaas
from aiaas import RegistryClient
from aiaas.cli.main import main as cli
from aiaas.cli.pipeline_cmds import EXIT_REFUSED
from aiaas.pipeline.artifacts import load_runner, load_torch_export
from aiaas.pipeline.parity import ParityRefused
from aiaas.pipeline.publish import Publisher
from tests.pipeline.models import SignBranch, factory, mlp
from tests.support.procs import ServiceProcess


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("registry")
    service = ServiceProcess("registry", ["--database-url", f"sqlite:///{home / 'registry.db'}",
                                          "--artifact-dir", str(home / "artifacts")],
                             env={"AIAAS_HOME": str(home)})
    service.start()
    yield service.address
    service.stop()


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert cli(list(argv)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_deploy_then_optimize_records_lineage_and_reports(registry: str, capsys: pytest.CaptureFixture[str]) -> None:
    deployment = aiaas.deploy(mlp(), torch.randn(4, 10), name="mlp", registry=registry)
    assert (deployment.version, deployment.alias, deployment.format) == (1, "production", "torch_export")
    assert deployment.parity["passed"] is True

    int8 = _cli_json(capsys, "optimize", "mlp", "production", "--quantize", "int8-dynamic",
                     "--registry", registry, "--json")
    fp16 = _cli_json(capsys, "optimize", "mlp", "1", "--dtype", "fp16", "--registry", registry, "--json",
                     "--alias", "canary")
    assert int8["lineage"] == {"parent_version": 1, "transformation": "quantize:int8-dynamic"}
    assert fp16["alias"] == "canary"

    with RegistryClient(registry) as client:
        v1 = client.get_version("mlp", 1)
        v2 = client.get_version("mlp", int8["version"])
        v3 = client.get_version("mlp", "canary")
    assert v1.lineage.transformation == "export:torch_export" and v1.lineage.parent_version == 0
    assert v2.lineage.parent_version == 1 and v2.lineage.transformation == "quantize:int8-dynamic"
    assert v3.version == fp16["version"] and v3.lineage.transformation == "cast:fp16"
    # Signature and serving config travel to the derived versions unchanged.
    assert v2.signature == v1.signature and v3.serving_config == v1.serving_config
    assert [t.datatype for t in v3.signature.inputs] == ["FP32"]
    parity = v2.reports["parity"]
    assert parity["passed"] is True and parity["forced"] is False
    assert parity["transformation"] == "quantize:int8-dynamic"
    # torchao int8 of a torch.export version is again torch.export, its Linear weights int8 (the
    # graph's JSON outweighs them in a model this small, so size is not compared here).
    assert int8["format"] == "torch_export" and parity["size_bytes"]["candidate"] > 0
    with Publisher(registry) as publisher:
        stored = publisher.download("mlp", int8["version"])
    matrices = [t for t in load_torch_export(stored.data).state_dict.values() if t.dim() == 2 and t.shape[1] > 1]
    assert matrices and all(t.dtype == torch.int8 for t in matrices)
    assert set(parity["latency_ms"].keys()) == {"1", "32"}
    assert 0.99 <= parity["cosine"] <= 1.0 + 1e-9 and parity["top1_agreement"] >= 0.9
    assert v2.metadata["source"] == "aiaas optimize"


def test_broken_conversion_is_refused_and_not_registered(registry: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A TorchScript trace freezes the branch its example took (torch.export refuses the model instead).
    sample = [-np.ones((8, 4), np.float32)]
    with pytest.raises(ParityRefused) as refused:
        aiaas.deploy(SignBranch().eval(), torch.ones(2, 4), name="branchy", registry=registry, sample=sample,
                     format="torchscript")
    assert refused.value.report["passed"] is False
    with RegistryClient(registry) as client:
        assert "branchy" not in [m.name for m in client.list_models()]
        forced = aiaas.deploy(SignBranch().eval(), torch.ones(2, 4), name="branchy", registry=registry,
                              sample=sample, force=True, alias=None, format="torchscript")
        stored = client.get_version("branchy", forced.version)
    assert stored.reports["parity"]["passed"] is False and stored.reports["parity"]["forced"] is True
    assert not stored.aliases

    # From the shell: a gate too tight for int8 refuses with exit code 3 and prints why.
    code = cli(["optimize", "branchy", str(forced.version), "--quantize", "int8-dynamic", "--atol", "1e-9",
                "--rtol", "0", "--registry", registry])
    out = capsys.readouterr()
    assert code == EXIT_REFUSED
    assert "FAILED" in out.out and "--force" in out.err


def test_convert_factory_with_safetensors_then_to_onnx(registry: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "weights.safetensors"
    save_file(mlp(seed=7).state_dict(), str(weights))
    created = _cli_json(capsys, "convert", "tests.pipeline.models:factory", "--weights", str(weights),
                        "--input-shape", "10", "--name", "conv", "--format", "torch_export",
                        "--registry", registry, "--json")
    assert created["format"] == "torch_export" and created["parity"]["passed"] is True
    onnx = _cli_json(capsys, "convert", "conv", str(created["version"]), "--to", "onnx",
                     "--registry", registry, "--json")
    assert onnx["format"] == "onnx" and onnx["lineage"]["transformation"] == "convert:onnx"
    optimized = _cli_json(capsys, "optimize", "conv", str(onnx["version"]), "--ort-optimize",
                          "--registry", registry, "--json")
    assert optimized["lineage"]["transformation"] == "ort-optimize:extended"
    with RegistryClient(registry) as client:
        version = client.get_version("conv", created["version"])
    assert version.metadata["factory"] == "tests.pipeline.models:factory"
    # The weights were loaded: the factory alone (seed 1) answers differently from seed 7's weights.
    with Publisher(registry) as publisher:
        stored = publisher.download("conv", created["version"])
    x = np.random.default_rng(0).normal(size=(3, 10)).astype(np.float32)
    with torch.no_grad():
        expected = mlp(seed=7)(torch.from_numpy(x)).numpy()
        unloaded = factory()(torch.from_numpy(x)).numpy()
    got = load_runner(stored.format, stored.data, stored.signature)([x])[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, unloaded, atol=1e-3)


def test_cli_errors_are_one_line(registry: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli(["optimize", "nope", "1", "--quantize", "int8-dynamic", "--registry", registry]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli(["convert", "no_such_pkg.mod:make", "--weights", str(tmp_path / "w.safetensors"),
                "--input-shape", "10", "--name", "x", "--registry", registry]) == 1
    assert "cannot import" in capsys.readouterr().err


def test_demo_registers_as_torch_export_and_torchscript_stays_selectable(registry: str) -> None:
    from aiaas.demo import DEMO_FORMAT
    from aiaas.up import ensure_demo

    assert DEMO_FORMAT == "torch_export"
    # This registry has no demo yet, so it is registered in the format asked; a second call reuses it.
    line = ensure_demo(registry, "torchscript")
    assert "registered version 1 (torchscript)" in line and "reusing version 1" in ensure_demo(registry)
    with Publisher(registry) as publisher:
        stored = publisher.download("demo", 1)
    assert stored.format.value == "torchscript"
    x = np.ones((2, 10), np.float32)
    assert load_runner(stored.format, stored.data, stored.signature)([x])[0].shape == (2, 10)
