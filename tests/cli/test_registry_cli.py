"""The `aiaas` registry commands against a real registry process."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiaas.cli import output
from aiaas.cli.main import main
from tests.registry.service import RunningRegistry, running_registry
from tests.support.blobs import onnx_blob


@pytest.fixture(scope="module", params=["sqlite"])
def registry(request: pytest.FixtureRequest) -> Iterator[RunningRegistry]:
    yield from running_registry(request)


def run(capsys: pytest.CaptureFixture[str], registry: RunningRegistry, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--registry", registry.address, "--actor", "cli-test"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], registry: RunningRegistry, *argv: str) -> Any:
    code, out, err = run(capsys, registry, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_register_list_show_alias_rollback_audit(capsys: pytest.CaptureFixture[str], registry: RunningRegistry,
                                                 tmp_path: Path) -> None:
    artifact = tmp_path / "m.onnx"
    for content in (onnx_blob("first"), onnx_blob("second")):
        artifact.write_bytes(content)
        code, out, err = run(capsys, registry, "register", "cli-model", str(artifact), "--format", "onnx",
                             "--input", "x:FP32:-1,10", "--output", "y:FP32:-1,2", "--max-batch-size", "8",
                             "--metadata", "accuracy=0.93", "--metadata", "owner=vision")
        assert code == 0, err
        assert out.startswith("registered cli-model version")
    version = run_json(capsys, registry, "versions", "cli-model")[1]
    assert version["version"] == "2" and version["created_by"] == "admin/cli-test"
    assert version["signature"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert version["metadata"] == {"accuracy": 0.93, "owner": "vision"}
    assert version["artifact_sha256"] == hashlib.sha256(onnx_blob("second")).hexdigest()

    code, out, _ = run(capsys, registry, "models", "list")
    assert code == 0 and out.splitlines()[0].split() == ["NAME", "LATEST", "ALIASES", "DESCRIPTION", "UPDATED"]
    assert "cli-model" in out

    assert run(capsys, registry, "alias", "set", "cli-model", "production", "1", "--expect", "0")[0] == 0
    code, out, _ = run(capsys, registry, "alias", "set", "cli-model", "production", "2", "--reason", "better")
    assert (code, out.strip()) == (0, "cli-model:production -> version 2 (was 1)")
    code, _, err = run(capsys, registry, "alias", "set", "cli-model", "production", "1", "--expect", "1")
    assert code == 1 and "ABORTED: alias 'production' of model 'cli-model' points at version 2" in err
    code, out, _ = run(capsys, registry, "rollback", "cli-model", "production", "--reason", "regression")
    assert (code, out.strip()) == (0, "cli-model:production -> version 1 (was 2)")
    moves = run_json(capsys, registry, "alias", "history", "cli-model", "production")
    assert [(m.get("from_version", "0"), m["to_version"]) for m in moves] == [("2", "1"), ("1", "2"), ("0", "1")]
    assert moves[0]["reason"] == "regression" and moves[0]["actor"] == "admin/cli-test"
    code, out, _ = run(capsys, registry, "models", "show", "cli-model")
    assert code == 0 and "production=1" in out

    events = run_json(capsys, registry, "audit", "--model", "cli-model", "--since", "1h")
    assert [e["action"] for e in events][:3] == ["alias.rollback", "alias.set", "alias.set"]

    code, out, _ = run(capsys, registry, "download", "cli-model", "production", "-o", str(tmp_path / "back.pt"))
    assert code == 0 and (tmp_path / "back.pt").read_bytes() == onnx_blob("first")


def test_errors_are_one_line_with_an_exit_code(capsys: pytest.CaptureFixture[str], registry: RunningRegistry,
                                               tmp_path: Path) -> None:
    artifact = tmp_path / "m.onnx"
    artifact.write_bytes(b"x")
    code, _, err = run(capsys, registry, "register", "cli-bad", str(artifact), "--format", "onnx",
                       "--input", "x:FP32", "--output", "y:FP32:1")
    assert code == 2 and "write NAME:DATATYPE:SHAPE" in err
    code, _, err = run(capsys, registry, "register", "cli-bad", str(artifact), "--format", "onnx")
    assert code == 2 and "a signature is required" in err
    code, _, err = run(capsys, registry, "register", "cli-bad", str(artifact), "--format", "onnx",
                       "--input", "x:FLOAT32:-1", "--output", "y:FP32:-1")
    assert code == 1 and "INVALID_ARGUMENT: signature input 'x': datatype 'FLOAT32' is not a KServe datatype" in err
    code, _, err = run(capsys, registry, "models", "show", "missing")
    assert code == 1 and err.strip() == "error: NOT_FOUND: model 'missing' not found"


def test_table_json_and_progress_helpers() -> None:
    out = io.StringIO()
    output.print_table([{"a": 1, "b": ["x", "y"]}, {"a": 22, "b": {"k": "v"}}], ["a", "b"], file=out)
    assert out.getvalue().splitlines() == ["A   B", "1   x,y", "22  k=v"]
    out = io.StringIO()
    output.print_table([], ["a"], file=out)
    assert out.getvalue() == "(none)\n"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    with output.ProgressBar("up", file=screen, width=10, min_interval_s=0) as bar:
        bar(512, 1024)
        bar(1024, 1024)
    assert "[#####.....]  50%" in screen.getvalue() and screen.getvalue().endswith("100% 1.0 KiB/1.0 KiB\n")
    quiet = io.StringIO()
    output.ProgressBar("up", file=quiet)(1, 2)
    assert quiet.getvalue() == ""
