"""Untrusted artifacts: every attack of issue 10 rebuilt as a real file, refused before anything runs.

Each payload would write a marker file if it ran; the tests assert the refusal, its message, and
that the marker never appears. Two tests load the same files with torch's own loader in a child
process to show the attacks are real (the marker does appear there).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from aiaas import artifact_gate
from aiaas.pipeline import artifacts as pipeline_artifacts
from aiaas.registry_client import RegistryClient, RegistryError
from aiaas.runtime import load_model
from services.common.errors import InvalidArgument
from tests.registry.service import RunningRegistry
from tests.security import attacks
from tests.support.blobs import onnx_blob

ROOT = Path(__file__).resolve().parents[2]
X = ("x", "FP32", (-1, 4))
Y = ("y", "FP32", (-1, 3))


class Spec:
    def __init__(self, name: str, datatype: str, shape: tuple[int, ...]) -> None:
        self.name, self.datatype, self.shape = name, datatype, shape


PT2_ATTACKS: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "pickled constant": (attacks.pt2_pickled_constant, "as a pickle"),
    "opaque constant": (attacks.pt2_opaque_constant, "opaque constant"),
    "pickled sample inputs": (attacks.pt2_pickled_sample_inputs, "sample inputs"),
    "sympy expression": (attacks.pt2_sympy_code, "symbolic expression"),
    "aotinductor shared object": (lambda marker: attacks.pt2_aotinductor(), "AOTInductor"),
    "node calls torch.load": (lambda marker: attacks.pt2_node_target("torch.load"), "not an allowed operator"),
    "node calls aten.from_file": (lambda marker: attacks.pt2_node_target("torch.ops.aten.from_file.default"),
                                  "from_file"),
    "node calls a c10d op": (lambda marker: attacks.pt2_node_target("torch.ops.c10d.broadcast_.default"),
                             "namespace is not allowed"),
}


@pytest.mark.parametrize("attack", sorted(PT2_ATTACKS))
def test_crafted_pt2_archives_are_refused_before_anything_runs(attack: str, tmp_path: Path) -> None:
    build, reason = PT2_ATTACKS[attack]
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt2"
    path.write_bytes(build(marker))
    with pytest.raises(artifact_gate.UnsafeArtifact, match=re.escape(reason)):
        artifact_gate.check_artifact(path, "torch_export")
    # The serving loader (what the inference worker runs) and the pipeline loader refuse it too.
    with pytest.raises(InvalidArgument, match="refused"):
        load_model(str(path), "torch_export", [Spec(*X)], [Spec(*Y)])
    with pytest.raises(InvalidArgument, match="refused"):
        pipeline_artifacts.load_torch_export(path.read_bytes())
    assert not marker.exists()


@pytest.mark.parametrize("attack", ["pickled constant", "sympy expression"])
def test_the_crafted_archives_are_real_attacks_on_torch_export_load(attack: str, tmp_path: Path) -> None:
    """torch.export.load, in a child process, runs the payload: the gate is what stops it."""
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt2"
    path.write_bytes(PT2_ATTACKS[attack][0](marker))
    subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(path)!r})"],
                   capture_output=True, timeout=120, check=False)
    assert marker.exists()


def test_a_real_export_loads_without_pickle_and_matches_torch(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    path.write_bytes(attacks.real_pt2())
    report = artifact_gate.check_artifact(path, "torch_export")
    assert {"aten::linear", "aten::relu"} <= report.operators
    x = torch.randn(5, 4)
    expected = torch.export.load(str(path)).module()(x).detach()
    assert torch.allclose(artifact_gate.load_torch_export(path).module()(x), expected)
    served = load_model(str(path), "torch_export", [Spec(*X)], [Spec(*Y)])
    outputs, *_ = served.run({"x": x.numpy()})
    np.testing.assert_allclose(outputs["y"], expected.numpy(), rtol=1e-6)


def test_torchscript_reading_files_is_refused_at_scan_and_at_graph_level(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(attacks.torchscript_from_file())
    with pytest.raises(artifact_gate.UnsafeArtifact, match="from_file"):
        artifact_gate.check_artifact(path, "torchscript")
    with pytest.raises(InvalidArgument, match="from_file"):
        load_model(str(path), "torchscript", [Spec(*X)], [Spec("y", "FP32", (-1, 4))])
    # The second layer: the inlined graph of a loaded module is checked node by node.
    with pytest.raises(artifact_gate.UnsafeArtifact, match="aten::from_file"):
        artifact_gate.check_torchscript_module(torch.jit.script(attacks.ReadsFiles()))
    # Operators can turn the format off altogether.
    with pytest.raises(artifact_gate.UnsafeArtifact, match="turned off"):
        artifact_gate.check_artifact(attacks.real_torchscript(), "torchscript", allow_torchscript=False)


def test_scripted_traced_and_quantized_torchscript_pass(tmp_path: Path) -> None:
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        for name, module in (("scripted", torch.jit.script(model)),
                             ("traced", torch.jit.trace(model, torch.randn(2, 4))),
                             ("quantized", torch.jit.trace(quantized, torch.randn(2, 4)))):
            path = tmp_path / f"{name}.pt"
            torch.jit.save(module, str(path))
            loaded = artifact_gate.load_torchscript(path)
            x = torch.randn(3, 4)
            assert torch.allclose(loaded(x), module(x)), name


def test_onnx_external_data_naming_another_artifact_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "cache" / ("ab" * 32) / "artifact"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"another tenant's weights")
    path = tmp_path / "leak.onnx"
    path.write_bytes(attacks.onnx_external_data(other))
    with pytest.raises(artifact_gate.UnsafeArtifact, match="external data"):
        artifact_gate.check_artifact(path, "onnx")
    with pytest.raises(InvalidArgument, match="external data"):
        load_model(str(path), "onnx", [], [Spec("y", "UINT8", (16,))])


def test_onnx_custom_op_domains_are_refused(tmp_path: Path) -> None:
    with pytest.raises(artifact_gate.UnsafeArtifact, match="'evil.ops'"):
        artifact_gate.check_artifact(attacks.onnx_custom_domain(), "onnx")
    artifact_gate.check_artifact(onnx_blob("fine"), "onnx")


def test_zip_tricks_and_broken_safetensors_are_refused() -> None:
    data = attacks.rewrite_zip(attacks.real_pt2(), {}, add={"../../escape": b"x"})
    with pytest.raises(artifact_gate.UnsafeArtifact, match="unsafe path"):
        artifact_gate.check_artifact(data, "torch_export")
    with pytest.raises(artifact_gate.UnsafeArtifact, match="not a zip"):
        artifact_gate.check_artifact(b"\x80\x04not a zip", "torchscript")
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,4096]}}'
    with pytest.raises(artifact_gate.UnsafeArtifact, match="outside the file"):
        artifact_gate.check_artifact(len(header).to_bytes(8, "little") + header + b"\0" * 16, "safetensors")


@pytest.fixture(scope="module")
def registry() -> Iterator[RunningRegistry]:
    running = RunningRegistry("sqlite", None, "--allowed-formats", "torch_export,onnx").start()
    yield running
    running.close()


def test_the_registry_refuses_attacks_at_upload_and_stores_nothing(registry: RunningRegistry,
                                                                   tmp_path: Path) -> None:
    signature = {"inputs": ["x:FP32:-1,4"], "outputs": ["y:FP32:-1,3"]}
    marker = tmp_path / "ran"
    cases = [
        (attacks.pt2_pickled_constant(marker), "torch_export", "as a pickle"),
        (attacks.pt2_sympy_code(marker), "torch_export", "symbolic expression"),
        (attacks.onnx_external_data(Path("/etc/passwd")), "onnx", "external data"),
        (attacks.real_torchscript(), "torchscript", "does not accept torchscript"),
    ]
    with RegistryClient(registry.address, actor="attacker") as client:
        for data, fmt, reason in cases:
            with pytest.raises(RegistryError) as caught:
                client.register("attacked", data, format=fmt, signature=signature)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
            assert reason in caught.value.details()
        with pytest.raises(RegistryError) as missing:
            client.get_model("attacked")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert [p for p in registry.files() if "sha256" in p.parts] == []
        good = client.register("fine", attacks.real_pt2(), format="torch_export", signature=signature)
        assert good.version == 1
    assert not marker.exists()


# Calls that deserialize with code execution; allowed only where the artifact gate has checked the bytes.
# `.recv()` with no argument is multiprocessing's Connection.recv, which unpickles (the pipes between
# the service and its workers carry JSON both ways: `recv_bytes` and json).
_DANGEROUS = re.compile(r"pickle\.loads?\(|torch\.load\(|weights_only\s*=\s*False|torch\.export\.load\(|"
                        r"torch\.jit\.load\(|_pickle_load_obj|dill\.|joblib\.load|\.recv\(\)")
_GATED = {
    # torch.jit.load runs after check_artifact has scanned the archive's code (see load_torchscript).
    ("aiaas/artifact_gate.py", "torch.jit.load("),
    # The peer servers of `make bench-peers` (Triton, MLServer) load the TorchScript files the benchmark
    # built itself, in their own throwaway venvs where aiaas is not installed; no uploaded bytes.
    ("bench/peers/mlserver_runtime.py", "torch.jit.load("),
    ("bench/peers/pytriton_server.py", "torch.jit.load("),
}


def test_no_deserializer_runs_on_uploaded_bytes_outside_the_gate() -> None:
    found = []
    for folder in ("aiaas", "services", "bench", "tools", "deploy"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                for match in _DANGEROUS.finditer(code):
                    if (relative, match.group(0)) not in _GATED:
                        found.append(f"{relative}:{number}: {line.strip()}")
    assert found == []
