"""Our protos: the committed stubs equal what protos/ generates, and every proto follows the style.

The lint reads protoc's descriptor set with source info (comments), so it sees exactly what
protoc sees: package and path, naming, Request/Response per RPC, zero UNSPECIFIED enum values,
and a leading comment on every message, field, enum, enum value, service and rpc.
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gen_protos

PASCAL = re.compile(r"[A-Z][A-Za-z0-9]*")
SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
UPPER_SNAKE = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")

# Field numbers in descriptor.proto, as used by SourceCodeInfo.Location.path.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE, SERVICE_METHOD = 2, 2


def descriptor_set(proto_root: Path, files: list[str], out: Path) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{proto_root}", f"-I{include}", "--include_source_info", f"--descriptor_set_out={out}", *files]
    if protoc.main(args) != 0:
        raise AssertionError(f"protoc failed on {files}")
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def upper_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).upper()


def lint(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    problems: list[str] = []
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}

    def need_comment(path: tuple[int, ...], what: str) -> None:
        if not comments.get(path):
            problems.append(f"{what}: no leading comment")

    parts = file.name.split("/")
    expected_package = ".".join(parts[:-1])
    if not re.fullmatch(r"aiaas\.[a-z][a-z0-9_]*\.v[0-9]+", file.package):
        problems.append(f"package {file.package!r} is not aiaas.<service>.v<N>")
    if file.package != expected_package:
        problems.append(f"package {file.package!r} does not match its path {file.name!r}")

    def check_enum(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], scope: str) -> None:
        where = f"enum {scope}{enum.name}"
        need_comment(path, where)
        if not PASCAL.fullmatch(enum.name):
            problems.append(f"{where}: not PascalCase")
        prefix = upper_snake(enum.name) + "_"
        for j, value in enumerate(enum.value):
            need_comment((*path, ENUM_VALUE, j), f"{where}.{value.name}")
            if not UPPER_SNAKE.fullmatch(value.name) or not value.name.startswith(prefix):
                problems.append(f"{where}.{value.name}: not UPPER_SNAKE_CASE prefixed with {prefix}")
            if value.number == 0 and value.name != prefix + "UNSPECIFIED":
                problems.append(f"{where}: value 0 must be {prefix}UNSPECIFIED")
        if not any(v.number == 0 for v in enum.value):
            problems.append(f"{where}: no zero value")

    def check_message(message: descriptor_pb2.DescriptorProto, path: tuple[int, ...], scope: str) -> None:
        if message.options.map_entry:
            return
        where = f"message {scope}{message.name}"
        need_comment(path, where)
        if not PASCAL.fullmatch(message.name):
            problems.append(f"{where}: not PascalCase")
        for j, field in enumerate(message.field):
            need_comment((*path, MESSAGE_FIELD, j), f"{where}.{field.name}")
            if not SNAKE.fullmatch(field.name):
                problems.append(f"{where}.{field.name}: not lower_snake_case")
        synthetic = {f.oneof_index for f in message.field if f.proto3_optional}  # `optional` fields
        for j, oneof in enumerate(message.oneof_decl):
            if j not in synthetic and not SNAKE.fullmatch(oneof.name):
                problems.append(f"{where} oneof {oneof.name}: not lower_snake_case")
        for j, nested in enumerate(message.nested_type):
            check_message(nested, (*path, MESSAGE_NESTED, j), f"{scope}{message.name}.")
        for j, enum in enumerate(message.enum_type):
            check_enum(enum, (*path, MESSAGE_ENUM, j), f"{scope}{message.name}.")

    for i, message in enumerate(file.message_type):
        check_message(message, (FILE_MESSAGE, i), "")
    for i, enum in enumerate(file.enum_type):
        check_enum(enum, (FILE_ENUM, i), "")
    for i, service in enumerate(file.service):
        need_comment((FILE_SERVICE, i), f"service {service.name}")
        if not PASCAL.fullmatch(service.name):
            problems.append(f"service {service.name}: not PascalCase")
        for j, method in enumerate(service.method):
            where = f"rpc {service.name}.{method.name}"
            need_comment((FILE_SERVICE, i, SERVICE_METHOD, j), where)
            if not PASCAL.fullmatch(method.name):
                problems.append(f"{where}: not PascalCase")
            for kind, type_name in (("Request", method.input_type), ("Response", method.output_type)):
                wanted = f".{file.package}.{method.name}{kind}"
                if type_name != wanted:
                    problems.append(f"{where}: {kind.lower()} type is {type_name}, expected {wanted}")
    return problems


def our_files(tmp_path: Path) -> list[descriptor_pb2.FileDescriptorProto]:
    files = [str(p.relative_to(gen_protos.PROTO_ROOT)) for p in gen_protos.proto_files()]
    found = descriptor_set(gen_protos.PROTO_ROOT, files, tmp_path / "set.pb")
    return [f for f in found.file if f.name in files]


def test_committed_stubs_match_protos() -> None:
    assert gen_protos.stale_files() == [], "stubs are stale: run `python tools/gen_protos.py` and commit"


def test_every_proto_follows_the_style(tmp_path: Path) -> None:
    files = our_files(tmp_path)
    assert files, "no protos found under protos/"
    problems = [f"{f.name}: {p}" for f in files for p in lint(f)]
    assert problems == [], "\n".join(problems)


def test_the_lint_catches_each_kind_of_mistake(tmp_path: Path) -> None:
    root = tmp_path / "protos"
    (root / "aiaas" / "demo" / "v1").mkdir(parents=True)
    (root / "aiaas" / "demo" / "v1" / "bad.proto").write_text('''
syntax = "proto3";
package aiaas.other.v1;
service demo_service {
  rpc get_thing(Thing) returns (Thing);
}
// Thing has an undocumented field.
message Thing {
  string BadField = 1;
}
// Color is badly valued.
enum Color {
  // RED is not prefixed.
  RED = 0;
}
''')
    found = descriptor_set(root, ["aiaas/demo/v1/bad.proto"], tmp_path / "bad.pb")
    text = "\n".join(lint(found.file[0]))
    for expected in ("does not match its path", "service demo_service: no leading comment",
                     "service demo_service: not PascalCase", "rpc demo_service.get_thing: not PascalCase",
                     "request type is .aiaas.other.v1.Thing", "Thing.BadField: no leading comment",
                     "Thing.BadField: not lower_snake_case", "Color.RED: not UPPER_SNAKE_CASE prefixed with COLOR_",
                     "value 0 must be COLOR_UNSPECIFIED"):
        assert expected in text


@pytest.mark.parametrize("name, expected", [("ArtifactFormat", "ARTIFACT_FORMAT"), ("ChangeEventType",
                                                                                  "CHANGE_EVENT_TYPE")])
def test_enum_prefix(name: str, expected: str) -> None:
    assert upper_snake(name) == expected
