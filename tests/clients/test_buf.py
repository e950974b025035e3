"""protos/buf.yaml with the real `buf` (npm's @bufbuild/buf, a dev dependency of clients/node):
our protos pass its lint, the lint catches each mistake tests/test_protos.py catches, and the
breaking-change check refuses a deleted field and a renamed message."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.support.procs import REPO_ROOT

BUF_YAML = REPO_ROOT / "protos" / "buf.yaml"

GOOD = '''syntax = "proto3";
package aiaas.demo.v1;
// DemoService answers.
service DemoService {
  // GetThing returns a thing.
  rpc GetThing(GetThingRequest) returns (GetThingResponse);
}
// GetThingRequest names a thing.
message GetThingRequest {
  // name of the thing.
  string name = 1;
  // color of the thing.
  Color color = 2;
}
// GetThingResponse is the thing.
message GetThingResponse {
  // name of the thing.
  string name = 1;
}
// Color of a thing.
enum Color {
  // COLOR_UNSPECIFIED is invalid.
  COLOR_UNSPECIFIED = 0;
  // COLOR_RED is red.
  COLOR_RED = 1;
}
'''

# Each mistake of tests/test_protos.py's own bad proto, plus the comments it requires.
BAD = '''syntax = "proto3";
package aiaas.other.v1;
service demo_service {
  rpc get_thing(Thing) returns (Thing);
}
message Thing {
  string BadField = 1;
}
// Color is badly valued.
enum Color {
  RED = 0;
}
'''


def buf(node_modules: Path, *args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    binary = node_modules / ".bin" / "buf"
    assert binary.exists(), f"{binary} missing: `npm ci` in clients/node installs @bufbuild/buf"
    return subprocess.run([str(binary), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


def module_with(root: Path, text: str) -> Path:
    """A buf module laid out like protos/, with our buf.yaml and one file."""
    (root / "aiaas" / "demo" / "v1").mkdir(parents=True)
    shutil.copy(BUF_YAML, root / "buf.yaml")
    (root / "aiaas" / "demo" / "v1" / "demo.proto").write_text(text)
    return root


def rules(done: subprocess.CompletedProcess[str]) -> set[str]:
    return {json.loads(line)["type"] for line in done.stdout.splitlines() if line.strip()}


def test_our_protos_pass_buf_lint(node_modules: Path) -> None:
    done = buf(node_modules, "lint", "protos")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


def test_a_proto_in_our_style_passes(node_modules: Path, tmp_path: Path) -> None:
    done = buf(node_modules, "lint", str(module_with(tmp_path / "good", GOOD)))
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_lint_catches_what_test_protos_catches(node_modules: Path, tmp_path: Path) -> None:
    done = buf(node_modules, "lint", str(module_with(tmp_path / "bad", BAD)), "--error-format", "json")
    assert done.returncode != 0
    assert rules(done) >= {
        "PACKAGE_DIRECTORY_MATCH",  # package/path
        "SERVICE_PASCAL_CASE", "RPC_PASCAL_CASE", "FIELD_LOWER_SNAKE_CASE",  # naming
        "ENUM_VALUE_PREFIX", "ENUM_ZERO_VALUE_SUFFIX",  # enum values
        "RPC_REQUEST_STANDARD_NAME", "RPC_RESPONSE_STANDARD_NAME",  # <Rpc>Request / <Rpc>Response
        "COMMENT_SERVICE", "COMMENT_RPC", "COMMENT_MESSAGE", "COMMENT_FIELD", "COMMENT_ENUM_VALUE",  # comments
    }, done.stdout


def test_breaking_check_refuses_a_deleted_field_and_a_renamed_message(node_modules: Path, tmp_path: Path) -> None:
    before = module_with(tmp_path / "before", GOOD)
    after = module_with(tmp_path / "after", GOOD.replace("  // color of the thing.\n  Color color = 2;\n", "")
                        .replace("GetThingResponse", "GetThingReply"))
    same = buf(node_modules, "breaking", str(before), "--against", str(before))
    assert same.returncode == 0, same.stdout + same.stderr
    done = buf(node_modules, "breaking", str(after), "--against", str(before), "--error-format", "json")
    assert done.returncode != 0
    assert rules(done) >= {"FIELD_NO_DELETE", "MESSAGE_NO_DELETE"}, done.stdout
