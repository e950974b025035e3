"""Every RPC of the registry, inference and monitor, called as real processes with identities
required: with no identity (UNAUTHENTICATED), with each identity the policy knows plus one it does
not (PERMISSION_DENIED exactly where the policy says so), over development tokens and over mTLS
client certificates. The gateway's door is keyed by API keys instead (tests/gateway/test_keys*.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from tritonclient.grpc import service_pb2 as inference_pb2

from aiaas.identity import KNOWN_IDENTITIES, TOKEN_METADATA_KEY, ClientIdentity
from aiaas.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from aiaas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.authz import Identity, Policy
from services.common.errors import PermissionDenied
from tests.support.identity import Identities, Pki, make_identities, make_pki
from tests.support.procs import ServiceProcess

POLICY = Policy.load()
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
SERVICES = {
    "registry": registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"],
    "inference": inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    "monitor": monitor_pb2.DESCRIPTOR.services_by_name["Monitor"],
}
NAMES = (*KNOWN_IDENTITIES, "intruder")


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    return make_identities(tmp_path_factory.mktemp("identity"))


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _args(name: str, tmp: Path, registry: str = "") -> list[str]:
    if name == "registry":
        return ["--database-url", f"sqlite:///{tmp}/registry.db", "--artifact-dir", str(tmp / "artifacts")]
    if name == "inference":
        return ["--model-cache-dir", str(tmp / "cache"), "--torch-threads", "1", "--grace-period-s", "2",
                "--registry-url", registry, "--follow-aliases", "production"]
    return ["--grace-period-s", "2", "--registry-url", registry]


@pytest.fixture(scope="module")
def token_fleet(identities: Identities, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    """Registry, inference and monitor requiring identities; inference and monitor follow the
    registry as themselves (their own tokens), so the policy's read grants are exercised too."""
    procs: dict[str, ServiceProcess] = {}
    try:
        for name in SERVICES:
            registry = procs["registry"].address if procs else ""
            procs[name] = ServiceProcess(name, args=_args(name, tmp_path_factory.mktemp(name), registry),
                                         env=identities.service_env(name)).start(timeout=120)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def _outcome(channel: grpc.Channel, path: str, method: object, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    """The status of calling `path` with an empty request; OK when a stream answered at all."""
    client_streaming = method.client_streaming  # type: ignore[attr-defined]
    server_streaming = method.server_streaming  # type: ignore[attr-defined]
    try:
        if not client_streaming and not server_streaming:
            channel.unary_unary(path)(b"", timeout=5, metadata=metadata)
        elif client_streaming and not server_streaming:
            channel.stream_unary(path)(iter([b""]), timeout=5, metadata=metadata)
        else:
            call = (channel.unary_stream(path)(b"", timeout=1.5, metadata=metadata) if not client_streaming
                    else channel.stream_stream(path)(iter([b""]), timeout=1.5, metadata=metadata))
            try:
                next(iter(call))
            finally:
                call.cancel()
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        return grpc.StatusCode.OK if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED) else code
    except StopIteration:
        pass
    return grpc.StatusCode.OK


def _policy_allows(name: str, service: str, method: object) -> bool:
    """What the table says for this identity and an empty request of this RPC."""
    # By descriptor: a request may be declared in another file of the package (registry's evaluation.proto).
    request = message_factory.GetMessageClass(method.input_type)()  # type: ignore[attr-defined]
    try:
        POLICY.check(Identity(name, "token"), f"{service}/{method.name}", request)  # type: ignore[attr-defined]
    except PermissionDenied:
        return False
    return True


def _walk(service: str, channel_for: dict[str | None, grpc.Channel],
          metadata_for: dict[str | None, tuple[tuple[str, str], ...]]) -> list[str]:
    """Every method x (no identity when channel_for has None, each name): mismatches with the policy."""
    wrong = []
    descriptor = SERVICES[service]
    for method in descriptor.methods:
        path = f"/{descriptor.full_name}/{method.name}"
        if None in channel_for:
            code = _outcome(channel_for[None], path, method, metadata_for.get(None, ()))
            if code != grpc.StatusCode.UNAUTHENTICATED:
                wrong.append(f"{service}/{method.name} with no identity: {code.name}")
        for name in NAMES:
            code = _outcome(channel_for[name], path, method, metadata_for.get(name, ()))
            expected_allowed = _policy_allows(name, service, method)
            if code == grpc.StatusCode.UNAUTHENTICATED or (code == grpc.StatusCode.PERMISSION_DENIED) == expected_allowed:
                wrong.append(f"{service}/{method.name} as {name}: {code.name}, policy allows: {expected_allowed}")
    return wrong


@pytest.mark.parametrize("service", list(SERVICES))
def test_every_rpc_with_tokens(service: str, token_fleet: dict[str, ServiceProcess], identities: Identities) -> None:
    channel = grpc.insecure_channel(token_fleet[service].address)
    try:
        metadata: dict[str | None, tuple[tuple[str, str], ...]] = {None: ()}
        metadata.update({n: ((TOKEN_METADATA_KEY, identities.token(n)),) for n in NAMES})
        wrong = _walk(service, dict.fromkeys((None, *NAMES), channel), metadata)
        # A token signed by another key, or garbage, is no identity.
        stranger = make_identities(identities.directory / "stranger")
        for bad in (stranger.token("admin"), "garbage"):
            code = _outcome(channel, f"/{SERVICES[service].full_name}/{SERVICES[service].methods[0].name}",
                            SERVICES[service].methods[0], ((TOKEN_METADATA_KEY, bad),))
            if code != grpc.StatusCode.UNAUTHENTICATED:
                wrong.append(f"forged token answered {code.name}")
    finally:
        channel.close()
    assert wrong == [], "\n".join(wrong)


def test_every_registry_rpc_with_client_certificates(certificates: Pki, tmp_path: Path) -> None:
    proc = ServiceProcess("registry", args=_args("registry", tmp_path), env=certificates.server_env("registry")).start(
        timeout=120)
    channels: dict[str | None, grpc.Channel] = {}
    list_models = SERVICES["registry"].methods_by_name["ListModels"]
    try:
        # With mTLS a caller without a certificate, or with one from another CA, never gets a
        # connection: the handshake fails (UNAVAILABLE) before any RPC.
        foreign = make_pki(tmp_path / "foreign")
        foreign_cert, foreign_key = foreign.files("admin")
        for stranger in (ClientIdentity(tls_ca=certificates.ca.cert_pem),
                         ClientIdentity(tls_ca=certificates.ca.cert_pem, tls_cert=foreign_cert.read_bytes(),
                                        tls_key=foreign_key.read_bytes())):
            with stranger.channel(f"localhost:{proc.port}") as channel:
                code = _outcome(channel, "/aiaas.registry.v1.ModelRegistry/ListModels", list_models, ())
                assert code == grpc.StatusCode.UNAVAILABLE
        for name in NAMES:
            channels[name] = certificates.client(name).channel(f"localhost:{proc.port}")
        wrong = _walk("registry", channels, {})
    finally:
        for channel in channels.values():
            channel.close()
        proc.stop()
    assert wrong == [], "\n".join(wrong)


# --- the attacks of issue 13, replayed against the token fleet -------------------------------------

def _registry(fleet: dict[str, ServiceProcess], identity: ClientIdentity | None) -> registry_pb2_grpc.ModelRegistryStub:
    channel = (identity or ClientIdentity()).channel(fleet["registry"].address)
    return registry_pb2_grpc.ModelRegistryStub(channel)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def test_internal_attacks_are_refused(token_fleet: dict[str, ServiceProcess], identities: Identities) -> None:
    admin = _registry(token_fleet, identities.client("admin"))
    key = registry_pb2.Record(kind="api_key", name="k1", data=b"salt+hmac, infer-only")
    admin.PutRecord(registry_pb2.PutRecordRequest(record=key, expected_revision=-1, actor="ops"), timeout=5)
    admin.CreateModel(registry_pb2.CreateModelRequest(name="mlp"), timeout=5)

    anonymous = _registry(token_fleet, None)
    inference = _registry(token_fleet, identities.client("inference"))
    monitor = _registry(token_fleet, identities.client("monitor"))
    gateway = _registry(token_fleet, identities.client("gateway"))
    move = registry_pb2.SetAliasRequest(model="mlp", alias="production", version=1, expected_version=-1)
    escalate = registry_pb2.PutRecordRequest(
        record=registry_pb2.Record(kind="api_key", name="k1", data=b"roles: admin, models: *"), expected_revision=-1)
    # Moving production, reading or rewriting API keys, appending audit events: no identity, none.
    assert _code(lambda: anonymous.SetAlias(move, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: anonymous.ListRecords(registry_pb2.ListRecordsRequest(kind="api_key"), timeout=5)) \
        == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: anonymous.PutRecord(escalate, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    # A compromised inference or monitor pod cannot either.
    for stub in (inference, monitor):
        assert _code(partial(stub.SetAlias, move, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(partial(stub.GetRecord, registry_pb2.GetRecordRequest(kind="api_key", name="k1"),
                             timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(partial(stub.PutRecord, escalate, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: inference.AppendAuditEvent(
        registry_pb2.AppendAuditEventRequest(actor="admin", action="alias.set", model="mlp"), timeout=5)) \
        == grpc.StatusCode.PERMISSION_DENIED
    # The gateway may write keys, but the audit log names it, not the actor it claims.
    event = gateway.AppendAuditEvent(registry_pb2.AppendAuditEventRequest(actor="admin", action="gateway.key.create"),
                                     timeout=5).event
    assert event.actor == "gateway/admin"
    stored = admin.GetRecord(registry_pb2.GetRecordRequest(kind="api_key", name="k1"), timeout=5).record
    assert stored.data == key.data  # untouched by every refused write

    # Following the feed as inference shows that k1 exists, never its salt and HMAC.
    feed = inference.WatchModels(registry_pb2.WatchModelsRequest(after_revision=0), timeout=10)
    try:
        records = []
        for reply in feed:
            if reply.event.HasField("record") and reply.event.record.kind == "api_key":
                records.append(reply.event.record)
            if reply.event.type == registry_pb2.CHANGE_EVENT_TYPE_SNAPSHOT_DONE:
                break
    finally:
        feed.cancel()
    assert [r.name for r in records] == ["k1"] and records[0].data == b""


def test_a_forged_report_is_refused(token_fleet: dict[str, ServiceProcess], identities: Identities) -> None:
    forged = monitor_pb2.ReportRequest(source="gateway", records=[
        monitor_pb2.RequestRecord(model="fraud", version=2, alias="canary", status="INTERNAL", latency_us=10)
        for _ in range(50)])
    for name in ("inference", "intruder"):
        channel = identities.client(name).channel(token_fleet["monitor"].address)
        with channel:
            code = _code(partial(monitor_pb2_grpc.MonitorStub(channel).Report, forged, timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED, name
    with identities.client("gateway").channel(token_fleet["monitor"].address) as channel:
        assert monitor_pb2_grpc.MonitorStub(channel).Report(forged, timeout=5).accepted == 50
