"""The Triton protos vendored for client apps (clients/node/protos) describe exactly the
`inference` package the servers use: tritonclient's compiled modules."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2

from tests.clients.conftest import NODE_CLIENT


def _without_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    """protoc fills json_name in; a compiled module's descriptor leaves it out."""
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _without_json_names(nested)


def _normalized(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    for message in file.message_type:
        _without_json_names(message)
    return file


@pytest.mark.parametrize("module", [service_pb2, model_config_pb2], ids=lambda m: m.DESCRIPTOR.name)
def test_vendored_proto_equals_tritonclients(module: object, tmp_path: Path) -> None:
    from grpc_tools import protoc

    name = module.DESCRIPTOR.name  # type: ignore[attr-defined]
    out = tmp_path / "set.pb"
    include = str(resources.files("grpc_tools") / "_proto")
    assert protoc.main(["protoc", f"-I{NODE_CLIENT / 'protos'}", f"-I{include}", f"--descriptor_set_out={out}",
                        name]) == 0
    vendored = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[-1]
    compiled = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(compiled)  # type: ignore[attr-defined]
    assert vendored.name == name
    assert _normalized(vendored) == _normalized(compiled), (
        f"clients/node/protos/{name} differs from tritonclient's: copy the version matching the "
        f"installed tritonclient from triton-inference-server/common protobuf/")
