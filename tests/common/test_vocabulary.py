"""The shared vocabulary (aiaas.errors, aiaas.formats, aiaas.serving, aiaas.records) is said once,
matches the protos, and every error survives a real gRPC call with its type and message."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from aiaas import artifact_gate, errors, records, runtime, serving
from aiaas.formats import FORMATS, SERVABLE_FORMATS, ArtifactFormat, platform_of
from aiaas.gateway.v1 import gateway_pb2
from aiaas.monitor.v1 import monitor_pb2
from aiaas.registry.v1 import evaluation_pb2
from aiaas.registry.v1 import registry_pb2 as pb
from services.common.interceptors import STATUS_BY_CODE
from services.common.server import ServiceApp
from services.common.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
SERVICE = "test.v1.Vocabulary"


def source_files() -> Iterator[tuple[Path, ast.Module]]:
    """Every hand-written module of the client package and the services (generated stubs left out)."""
    for root in ("aiaas", "services"):
        for path in sorted((REPO / root).rglob("*.py")):
            if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                yield path, ast.parse(path.read_text(), str(path))


def where_defined(name: str) -> list[str]:
    return [str(path.relative_to(REPO)) for path, tree in source_files()
            for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == name]


@pytest.mark.parametrize(("name", "home"), [
    ("ArtifactFormat", "aiaas/formats.py"), ("ServingConfig", "aiaas/serving.py"), ("ErrorCode", "aiaas/errors.py"),
    ("AiaasError", "aiaas/errors.py"), ("NotFound", "aiaas/errors.py"), ("RecordKind", "aiaas/records.py"),
    ("TensorSpec", "aiaas/tensors.py"),
])
def test_each_shared_type_is_defined_once(name: str, home: str) -> None:
    assert where_defined(name) == [home]


def files_with_literal(text: str) -> set[str]:
    return {str(path.relative_to(REPO)) for path, tree in source_files() for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value == text}


def test_record_kinds_are_spelled_out_once() -> None:
    for kind in records.KINDS:
        assert "aiaas/records.py" in files_with_literal(kind)
    assert files_with_literal("api_key") == {"aiaas/records.py"}
    # monitor_cmds: a subcommand; the evaluation spec and its CLI: the baseline version relative thresholds use.
    assert files_with_literal("baseline") <= {"aiaas/records.py", "aiaas/cli/monitor_cmds.py", "aiaas/eval/spec.py",
                                              "aiaas/cli/eval_cmds.py"}


def status_keyed_tables() -> list[str]:
    """Dict displays keyed by gRPC statuses (grpc.StatusCode.X or "StatusCode.X"): status maps."""
    def is_status(key: ast.expr | None) -> bool:
        return (isinstance(key, ast.Attribute) and isinstance(key.value, ast.Attribute)
                and key.value.attr == "StatusCode") or (
            isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.startswith("StatusCode."))

    return [f"{path.relative_to(REPO)}:{node.lineno}" for path, tree in source_files() for node in ast.walk(tree)
            if isinstance(node, ast.Dict) and node.keys and all(is_status(k) for k in node.keys)]


def test_no_second_status_table() -> None:
    assert status_keyed_tables() == []


def names_used(attribute_prefix: str) -> list[str]:
    return [f"{path.relative_to(REPO)}:{node.lineno}" for path, tree in source_files() for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith(attribute_prefix)]


def test_only_the_vocabulary_maps_formats_to_the_proto_enum() -> None:
    assert names_used("ARTIFACT_FORMAT_") == []


# Formats -------------------------------------------------------------------------------------

def test_every_proto_format_has_exactly_one_member() -> None:
    proto = {name.removeprefix("ARTIFACT_FORMAT_"): value for name, value in pb.ArtifactFormat.items()
             if name != "ARTIFACT_FORMAT_UNSPECIFIED"}
    assert {f.name: f.pb for f in ArtifactFormat} == proto
    assert all(ArtifactFormat.from_pb(f.pb) is f for f in ArtifactFormat)


def test_format_lists_derive_from_the_enum() -> None:
    assert FORMATS == artifact_gate.FORMATS == ("torchscript", "torch_export", "onnx", "safetensors", "hf_causal_lm")
    assert SERVABLE_FORMATS == runtime.FORMATS == ("torchscript", "torch_export", "onnx")
    assert platform_of("onnx") == "onnxruntime_onnx" and platform_of("triton") == "triton"


def test_format_parsing_and_refusals() -> None:
    assert ArtifactFormat.parse("PT2") is ArtifactFormat.TORCH_EXPORT
    assert ArtifactFormat.parse("torch-export") is ArtifactFormat.TORCH_EXPORT
    assert ArtifactFormat.parse("jit") is ArtifactFormat.TORCHSCRIPT
    with pytest.raises(errors.InvalidArgument, match="unknown format 'pickle'; choose one of torchscript, "
                                                     "torch_export, onnx$"):
        ArtifactFormat.parse("pickle")
    with pytest.raises(errors.InvalidArgument, match="format is required"):
        ArtifactFormat.from_pb(0)
    with pytest.raises(errors.InvalidArgument, match="unknown artifact format 99"):
        ArtifactFormat.from_pb(99)


# Serving config ------------------------------------------------------------------------------

def test_serving_config_fields_match_the_proto_message() -> None:
    assert [f.name for f in dataclasses.fields(serving.ServingConfig)] == [
        f.name for f in pb.ServingConfig.DESCRIPTOR.fields]


def test_serving_config_round_trips_and_unset_fields_take_the_defaults() -> None:
    config = serving.ServingConfig(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_us=500,
                                   instance_count=2, device="cuda:1", max_queue_size=7, default_timeout_us=9,
                                   kv_cache_tokens=4096, max_num_seqs=8, max_num_batched_tokens=256, engine="vllm")
    assert serving.from_pb(serving.to_pb(config)) == config
    assert serving.from_pb(pb.ServingConfig()) == serving.ServingConfig()
    assert serving.ServingConfig().device == "cpu" and serving.ServingConfig().instance_count == 1


def test_serving_config_rules() -> None:
    normalized = serving.ServingConfig(max_batch_size=8, preferred_batch_sizes=(8, 4, 4), instance_count=0,
                                       device="").normalized()
    assert (normalized.preferred_batch_sizes, normalized.instance_count, normalized.device) == ((4, 8), 1, "cpu")
    with pytest.raises(errors.InvalidArgument, match="'tpu' is invalid"):
        serving.ServingConfig(device="tpu").validate()
    with pytest.raises(errors.InvalidArgument, match="4 is not between 1 and max_batch_size"):
        serving.ServingConfig(preferred_batch_sizes=(4,)).validate()
    with pytest.raises(errors.InvalidArgument, match="kv_cache_tokens must be 0"):
        serving.ServingConfig(kv_cache_tokens=-1).validate()
    with pytest.raises(errors.InvalidArgument, match="max_num_seqs must be 0"):
        serving.ServingConfig(max_num_seqs=serving.MAX_NUM_SEQS + 1).validate()


# Record kinds --------------------------------------------------------------------------------

def test_record_kinds_round_trip_their_messages() -> None:
    samples = {
        "api_key": gateway_pb2.StoredApiKey(key=gateway_pb2.ApiKey(key_id="k1"), salt=b"s"),
        "route": gateway_pb2.Route(model="m", splits=[gateway_pb2.RouteSplit(alias="production", weight=100)]),
        "slo": monitor_pb2.SLO(model="m", p99_latency_ms=50),
        "baseline": monitor_pb2.Baseline(model="m", version=3),
        "evaluation_gate": evaluation_pb2.EvaluationGate(required=[evaluation_pb2.RequiredEvaluation(
            name="holdout", dataset="d", spec_yaml="name: holdout", spec_sha256="0" * 64)]),
    }
    assert set(records.KINDS) == set(samples)
    for kind, message in samples.items():
        record = records.KINDS[kind].record("name", message)
        assert (record.kind, record.name) == (kind, "name")
        assert records.KINDS[kind].decode(record.data) == message
    assert records.baseline_name("m", 3) == "m/3"


def test_record_codecs_refuse_the_wrong_message_and_unparsable_data() -> None:
    with pytest.raises(TypeError, match="a route record holds aiaas.gateway.v1.Route"):
        records.ROUTE.encode(monitor_pb2.SLO(model="m"))  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument, match="slo record 'm' does not parse as aiaas.monitor.v1.SLO"):
        records.SLO.decode(b"\xff\xff\xff", "m")


# Errors: one table, both directions, over a real call -----------------------------------------

def test_the_status_table_covers_every_code_and_every_error_class() -> None:
    assert set(STATUS_BY_CODE) == set(errors.ErrorCode) == set(errors.ERROR_BY_CODE)
    for code, cls in errors.ERROR_BY_CODE.items():
        assert cls.code is code
        assert errors.error_for_status(STATUS_BY_CODE[code]) is cls
    assert errors.error_for_status(grpc.StatusCode.UNKNOWN) is errors.Internal


async def fail(request: bytes, context: Any) -> bytes:
    code = errors.ErrorCode[request.decode()]
    raise errors.ERROR_BY_CODE[code](f"failed with {code.name}")


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    app = ServiceApp("vocabulary", ServerSettings(host="127.0.0.1", port=0, require_identity=False, grace_period_s=1.0),
                     configure_process=False)

    def add(_servicer: object, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {"Fail": grpc.unary_unary_rpc_method_handler(fail)}),))

    app.add_service(SERVICE, add, None)
    port = await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    await app.server.stop(None)


@pytest.mark.parametrize("code", list(errors.ErrorCode), ids=lambda c: c.name)
async def test_an_error_raised_by_a_service_is_the_same_error_for_its_caller(channel: grpc.aio.Channel,
                                                                           code: errors.ErrorCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/Fail")(code.name.encode(), timeout=5)
    error = errors.error_from_rpc(caught.value, "calling the probe")
    assert type(error) is errors.ERROR_BY_CODE[code]
    assert error.message == f"calling the probe: failed with {code.name}"


def test_tritonclient_errors_map_through_the_same_table() -> None:
    error = errors.error_from_rpc(InferenceServerException("no such model", status="StatusCode.NOT_FOUND"), "triton")
    assert type(error) is errors.NotFound and error.message == "triton: no such model"
    assert type(errors.error_from_rpc(InferenceServerException("odd", status=None))) is errors.Internal
    assert type(errors.error_from_rpc(RuntimeError("boom"))) is errors.Internal
