"""The registry as a real process over gRPC, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiaas.registry.v1 import registry_pb2 as pb
from aiaas.registry.v1 import registry_pb2_grpc
from aiaas.registry_client import RegistryClient, RegistryError
from tests.registry.service import RunningRegistry, eventually, running_registry
from tests.support.blobs import onnx_blob

SIGNATURE = {"inputs": ["x:FP32:-1,4"], "outputs": ["y:FP32:-1,2"]}
MiB = 1024 * 1024


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def registry(request: pytest.FixtureRequest) -> Iterator[RunningRegistry]:
    yield from running_registry(request, "--max-artifact-bytes", str(6 * MiB), "--feed-retention", "20",
                                "--heartbeat-s", "1")


@pytest.fixture
def client(registry: RunningRegistry) -> Iterator[RegistryClient]:
    with RegistryClient(registry.address, actor="tester", timeout=10) as sdk:
        yield sdk


@pytest.fixture
def stub(registry: RunningRegistry) -> Iterator[registry_pb2_grpc.ModelRegistryStub]:
    with grpc.insecure_channel(registry.address, options=[("grpc.max_send_message_length", 64 * MiB)]) as channel:
        yield registry_pb2_grpc.ModelRegistryStub(channel)


def header(model: str, data: bytes, **changes: object) -> pb.UploadVersionHeader:
    fields: dict[str, object] = {
        "model": model, "format": pb.ARTIFACT_FORMAT_ONNX, "artifact_sha256": hashlib.sha256(data).hexdigest(),
        "artifact_size": len(data), "create_model": True,
        "signature": pb.Signature(inputs=[pb.TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
                               outputs=[pb.TensorSpec(name="y", datatype="FP32", shape=[-1, 2])]),
    }
    fields.update(changes)
    return pb.UploadVersionHeader(**fields)  # type: ignore[arg-type]


def upload_error(stub: registry_pb2_grpc.ModelRegistryStub, messages: list[pb.UploadVersionRequest]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.UploadVersion(iter(messages), timeout=10)
    return caught.value


def test_health_reports_the_registry_serving(registry: RunningRegistry) -> None:
    with grpc.insecure_channel(registry.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="aiaas.registry.v1.ModelRegistry"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_register_list_get_and_download_verified(client: RegistryClient, tmp_path: Path) -> None:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(onnx_blob("rt", min_size=2 * MiB + 14))  # three chunks
    seen: list[tuple[int, int]] = []
    version = client.register("rt-model", artifact, format="onnx", signature=SIGNATURE,
                              serving_config={"max_batch_size": 8, "preferred_batch_sizes": [4, 8]},
                              metadata={"accuracy": 0.91}, progress=lambda sent, total: seen.append((sent, total)))
    assert version.version == 1 and version.created_by == "admin/tester"
    assert seen[-1] == (artifact.stat().st_size, artifact.stat().st_size)
    again = client.get_version("rt-model", 1)
    assert again.artifact_sha256 == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert list(again.serving_config.preferred_batch_sizes) == [4, 8]
    assert dict(again.metadata) == {"accuracy": 0.91}
    assert "rt-model" in [m.name for m in client.list_models(page_size=1)]
    client.download_artifact("rt-model", 1, tmp_path / "back.onnx")
    assert (tmp_path / "back.onnx").read_bytes() == artifact.read_bytes()


def test_errors_carry_codes_and_actionable_messages(client: RegistryClient) -> None:
    cases = [
        (lambda: client.create_model("Bad Name"), grpc.StatusCode.INVALID_ARGUMENT, "model name 'Bad Name' is invalid"),
        (lambda: client.get_model("nope"), grpc.StatusCode.NOT_FOUND, "model 'nope' not found"),
        (lambda: client.get_version("nope", alias="production"), grpc.StatusCode.NOT_FOUND, "model 'nope' not found"),
        (lambda: next(client.list_models(page_size=5000)), grpc.StatusCode.INVALID_ARGUMENT, "page_size must be"),
    ]
    client.create_model("err-model")
    cases.append((lambda: client.create_model("err-model"), grpc.StatusCode.ALREADY_EXISTS, "already exists"))
    client.register("err-model", onnx_blob("w"), format="onnx", signature=SIGNATURE)
    client.set_alias("err-model", "production", 1)
    cases += [
        (lambda: client.delete_version("err-model", 1), grpc.StatusCode.FAILED_PRECONDITION, "aliased by production"),
        (lambda: client.delete_model("err-model"), grpc.StatusCode.FAILED_PRECONDITION, "still has aliases"),
        (lambda: client.set_alias("err-model", "production", 1, expected_version=0), grpc.StatusCode.ABORTED,
         "points at version 1, not the expected no version"),
        (lambda: client.get_version("err-model", alias="staging"), grpc.StatusCode.NOT_FOUND, "has no alias 'staging'"),
    ]
    for call, code, message in cases:
        with pytest.raises(RegistryError) as caught:
            call()
        assert caught.value.code() == code, caught.value
        assert message in caught.value.details()


def test_bad_uploads_leave_no_version_and_no_blob(stub: registry_pb2_grpc.ModelRegistryStub,
                                                  registry: RunningRegistry) -> None:
    data = onnx_blob("payload" * 100)
    before = registry.files()
    chunk = pb.UploadVersionRequest(chunk=data)
    bad = [
        ([pb.UploadVersionRequest(header=header("bad", data, artifact_sha256="0" * 64)), chunk],
         "sha256 mismatch: declared 0000"),
        ([pb.UploadVersionRequest(header=header("bad", data, artifact_size=7 * MiB))], "exceeds this registry's limit"),
        ([pb.UploadVersionRequest(header=header("bad", data, artifact_size=len(data) - 1)), chunk],
         "more than the declared artifact_size"),
        ([pb.UploadVersionRequest(header=header("bad", data, signature=pb.Signature(
            inputs=[pb.TensorSpec(name="x", datatype="FLOAT", shape=[-1])],
            outputs=[pb.TensorSpec(name="y", datatype="FP32", shape=[-1])]))), chunk], "not a KServe datatype"),
        ([pb.UploadVersionRequest(header=header("bad", data, signature=pb.Signature(
            inputs=[pb.TensorSpec(name="x", datatype="FP32", shape=[-1, -7])],
            outputs=[pb.TensorSpec(name="y", datatype="FP32", shape=[-1])]))), chunk], "has dimension -7"),
        ([pb.UploadVersionRequest(header=header("bad", data, format=0)), chunk], "format is required"),
        ([chunk], "must start with a header"),
        ([], "must start with a header"),
        ([pb.UploadVersionRequest(header=header("bad", data)), pb.UploadVersionRequest(header=header("bad", data))],
         "header twice"),
        ([pb.UploadVersionRequest(header=header("bad", b"x" * (5 * MiB))),
          pb.UploadVersionRequest(chunk=b"x" * (4 * MiB + 1))], "send at most 4194304"),
    ]
    for messages, expected in bad:
        error = upload_error(stub, messages)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert expected in error.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModel(pb.GetModelRequest(name="bad"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert eventually(lambda: registry.files() == before)


def test_upload_killed_mid_stream_leaves_nothing(stub: registry_pb2_grpc.ModelRegistryStub,
                                                 registry: RunningRegistry) -> None:
    data = onnx_blob("z", min_size=3 * MiB)
    before = registry.files()
    sent_some = threading.Event()
    never = threading.Event()

    def messages() -> Iterator[pb.UploadVersionRequest]:
        yield pb.UploadVersionRequest(header=header("killed", data))
        yield pb.UploadVersionRequest(chunk=data[:MiB])
        sent_some.set()
        never.wait(30)

    future = stub.UploadVersion.future(messages(), timeout=30)
    assert sent_some.wait(5)
    assert eventually(lambda: any(p.parent.name == "tmp" for p in registry.files()))  # it was writing
    future.cancel()
    never.set()
    assert eventually(lambda: registry.files() == before), (before, registry.files())
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModel(pb.GetModelRequest(name="killed"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_identical_content_is_deduplicated(stub: registry_pb2_grpc.ModelRegistryStub,
                                           registry: RunningRegistry) -> None:
    data = onnx_blob("dedup me")
    replies = [stub.UploadVersion(iter([pb.UploadVersionRequest(header=header(name, data)),
                                        pb.UploadVersionRequest(chunk=data)]), timeout=10)
               for name in ("dedup-a", "dedup-b")]
    assert [r.deduplicated for r in replies] == [False, True]
    sha = replies[0].version.artifact_sha256
    assert [p for p in registry.files() if p.name == sha[2:]] == [registry.artifact_dir / "sha256" / sha[:2] / sha[2:]]


def test_racing_alias_moves_with_compare_and_set(client: RegistryClient) -> None:
    for data in (onnx_blob("1"), onnx_blob("2"), onnx_blob("3")):
        client.register("race", data, format="onnx", signature=SIGNATURE)
    client.set_alias("race", "production", 1)
    barrier = threading.Barrier(2)
    results: dict[int, str] = {}

    def move(version: int) -> None:
        barrier.wait()
        try:
            client.set_alias("race", "production", version, expected_version=1, reason=f"to {version}")
            results[version] = "OK"
        except RegistryError as exc:
            results[version] = exc.code().name

    threads = [threading.Thread(target=move, args=(v,)) for v in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results.values()) == ["ABORTED", "OK"]
    winner = next(v for v, r in results.items() if r == "OK")
    assert client.get_version("race", "production").version == winner
    history = client.alias_history("race", "production")
    assert [(m.from_version, m.to_version) for m in history] == [(1, winner), (0, 1)]
    back = client.rollback_alias("race", "production", reason="bad canary")
    assert (back.from_version, back.to_version) == (winner, 1)
    actions = [e.action for e in client.audit_events(model="race")]
    assert actions[:3] == ["alias.rollback", "alias.set", "alias.set"]


def _close(stream: Iterator[pb.ChangeEvent]) -> None:
    """RegistryClient.watch is a generator (declared as an Iterator): closing it cancels the call."""
    assert isinstance(stream, Generator)
    stream.close()


def test_watch_delivers_alias_moves_promptly(client: RegistryClient) -> None:
    client.register("watched", onnx_blob("w1"), format="onnx", signature=SIGNATURE)
    stream = client.watch(0, models=["watched"])
    while next(stream).type != pb.CHANGE_EVENT_TYPE_SNAPSHOT_DONE:
        pass
    started = time.monotonic()
    client.set_alias("watched", "production", 1)
    event = next(stream)
    assert (event.type, event.alias, event.version) == (pb.CHANGE_EVENT_TYPE_ALIAS_MOVED, "production", 1)
    assert time.monotonic() - started < 0.5
    _close(stream)


def test_watcher_reconnects_with_its_last_revision(client: RegistryClient) -> None:
    client.create_model("resume")
    stream = client.watch(0)
    last = 0
    for event in stream:
        last = event.revision
        if event.type == pb.CHANGE_EVENT_TYPE_SNAPSHOT_DONE:
            break
    _close(stream)  # disconnected; meanwhile three changes happen
    client.register("resume", onnx_blob("r1"), format="onnx", signature=SIGNATURE)
    client.set_alias("resume", "staging", 1)
    client.put_record("route", "resume", b"{}")
    resumed = client.watch(last)
    missed = [next(resumed) for _ in range(3)]
    assert [e.revision for e in missed] == [last + 1, last + 2, last + 3]
    assert [e.type for e in missed] == [pb.CHANGE_EVENT_TYPE_VERSION_CREATED, pb.CHANGE_EVENT_TYPE_ALIAS_MOVED,
                                        pb.CHANGE_EVENT_TYPE_RECORD_PUT]
    assert missed[2].record.data == b"{}"
    heartbeat = next(resumed)  # nothing else happened: the next thing is a heartbeat at the same revision
    assert (heartbeat.type, heartbeat.revision) == (pb.CHANGE_EVENT_TYPE_HEARTBEAT, last + 3)
    _close(resumed)
    for i in range(25):  # feed_retention is 20
        client.put_record("churn", f"k{i}", b"")
    with pytest.raises(RegistryError) as caught:
        next(client.watch(last))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "resync required" in caught.value.details()


def test_sigterm_ends_watches_and_exits_cleanly() -> None:
    own = RunningRegistry("sqlite", None).start()
    try:
        with RegistryClient(own.address) as sdk:
            stream = sdk.watch(0)
            assert next(stream).type == pb.CHANGE_EVENT_TYPE_SNAPSHOT_DONE
            started = time.monotonic()
            own.process.signal(signal.SIGTERM)
            with pytest.raises(RegistryError) as caught:
                next(stream)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert own.process.proc is not None and own.process.proc.wait(10) == 0
            assert time.monotonic() - started < 4.0  # did not sit out the 5 s grace period
    finally:
        own.close()


def test_a_corrupted_blob_is_reported_as_data_loss(client: RegistryClient, registry: RunningRegistry,
                                                    tmp_path: Path) -> None:
    data = onnx_blob("will be corrupted on disk")
    version = client.register("corrupt", data, format="onnx", signature=SIGNATURE)
    blob = registry.artifact_dir / "sha256" / version.artifact_sha256[:2] / version.artifact_sha256[2:]
    blob.write_bytes(b"X" + data[1:])
    with pytest.raises(RegistryError) as caught:
        client.download_artifact("corrupt", 1, tmp_path / "out.bin")
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert "is corrupt" in caught.value.details()
    assert not (tmp_path / "out.bin").exists() and list(tmp_path.iterdir()) == []
