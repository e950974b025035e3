"""The authorization policy and development tokens, without processes (tests/common/test_identity_rpcs.py
walks every RPC of real processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiaas.identity import generate_signing_key, mint_token, name_from_spiffe, spiffe_id
from aiaas.monitor.v1 import monitor_pb2
from aiaas.registry.v1 import registry_pb2
from services.common.authz import Identity, Policy, TokenVerifier, audit_actor
from services.common.context import caller_var
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated

POLICY = Policy.load()


def allowed(name: str, rpc: str, request: object = None) -> bool:
    try:
        POLICY.check(Identity(name, "token"), rpc, request)
    except PermissionDenied:
        return False
    return True


def put(kind: str) -> registry_pb2.PutRecordRequest:
    return registry_pb2.PutRecordRequest(record=registry_pb2.Record(kind=kind, name="x"))


def test_default_policy_defaults_from_the_issue() -> None:
    reads = ("GetModel", "ListModels", "GetVersion", "ListVersions", "DownloadArtifact", "WatchModels")
    for reader in ("inference", "monitor", "gateway", "deployer"):
        assert all(allowed(reader, f"registry/{m}") for m in reads), reader
    # Inference and monitor read; they never upload, move aliases or touch API keys.
    for name in ("inference", "monitor"):
        for rpc in ("UploadVersion", "SetAlias", "RollbackAlias", "CreateModel", "DeleteVersion", "UpdateModel"):
            assert not allowed(name, f"registry/{rpc}"), (name, rpc)
        assert not allowed(name, "registry/ListRecords", registry_pb2.ListRecordsRequest(kind="api_key"))
        assert not allowed(name, "registry/PutRecord", put("api_key"))
    # The gateway writes API keys and routes, nothing else.
    assert allowed("gateway", "registry/PutRecord", put("api_key"))
    assert allowed("gateway", "registry/PutRecord", put("route"))
    assert not allowed("gateway", "registry/PutRecord", put("slo"))
    assert not allowed("gateway", "registry/SetAlias")
    assert not allowed("gateway", "registry/UploadVersion")
    # The monitor writes routes (canary rollback) and its own records, never API keys.
    assert allowed("monitor", "registry/PutRecord", put("route"))
    assert allowed("monitor", "registry/PutRecord", put("slo"))
    assert not allowed("monitor", "registry/PutRecord", put("api_key"))
    # Deployer uploads and moves aliases; admin does everything; an unknown name nothing.
    assert allowed("deployer", "registry/UploadVersion") and allowed("deployer", "registry/SetAlias")
    assert not allowed("deployer", "registry/PutRecord", put("api_key"))
    assert allowed("admin", "registry/PutRecord", put("api_key")) and allowed("admin", "inference/SystemSharedMemoryRegister")
    assert not allowed("intruder", "registry/GetModel")
    assert not allowed("registry", "registry/GetModel")
    # Shared memory registration maps server files: admin only.
    assert not allowed("gateway", "inference/SystemSharedMemoryRegister")


def test_report_source_must_be_the_caller() -> None:
    own = monitor_pb2.ReportRequest(source="gateway", records=[monitor_pb2.RequestRecord(model="m")])
    assert allowed("gateway", "monitor/Report", own)
    forged = monitor_pb2.ReportRequest(source="gateway")
    assert not allowed("inference", "monitor/Report", forged)
    mixed = monitor_pb2.ReportRequest(source="inference",
                                      records=[monitor_pb2.RequestRecord(model="m", source="gateway")])
    with pytest.raises(PermissionDenied, match="source 'gateway'"):
        POLICY.check(Identity("inference", "token"), "monitor/Report", mixed)
    assert not allowed("deployer", "monitor/Report", own)
    assert allowed("admin", "monitor/Report", forged)


def test_feed_kinds_per_identity() -> None:
    assert POLICY.allowed_values(Identity("inference", "token"), "registry/WatchModels", "kind") == {
        "route", "slo", "baseline"}
    assert "api_key" in (POLICY.allowed_values(Identity("gateway", "token"), "registry/WatchModels", "kind") or ())
    assert POLICY.allowed_values(Identity("admin", "token"), "registry/WatchModels", "kind") is None
    assert POLICY.allowed_values(Identity("intruder", "token"), "registry/WatchModels", "kind") == frozenset()


@pytest.mark.parametrize("document, message", [
    ({}, "identities"),
    ({"identities": {"x": ["registry"]}}, "<service>/<Method>"),
    ({"identities": {"x": ["@nope"]}}, "unknown group"),
    ({"identities": {"x": [{"rpc": "registry/PutRecord", "kind": "route"}]}}, "list of strings"),
    ({"groups": {"a": ["@a"]}, "identities": {"x": ["@a"]}}, "cycle"),
])
def test_bad_policy_is_refused_with_a_reason(document: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Policy.parse(document)


def test_policy_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("identities: [unclosed")
    with pytest.raises(InvalidArgument, match="policy.yaml"):
        Policy.load(bad)


def test_tokens_verify_expire_and_refuse_other_keys(tmp_path: Path) -> None:
    private, public = generate_signing_key()
    other_private, other_public = generate_signing_key()
    key_file = tmp_path / "keys.pub"
    key_file.write_bytes(public)
    verifier = TokenVerifier.from_file(str(key_file))
    assert verifier.verify(mint_token(private, "gateway")) == "gateway"
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(mint_token(private, "gateway", ttl_s=10, now=1_000_000))
    with pytest.raises(Unauthenticated, match="invalid identity token"):
        verifier.verify(mint_token(other_private, "admin"))
    token = mint_token(private, "monitor")
    header, _payload, signature = token.split(".")
    forged = mint_token(other_private, "admin").split(".")[1]
    with pytest.raises(Unauthenticated):
        verifier.verify(f"{header}.{forged}.{signature}")
    with pytest.raises(Unauthenticated):
        verifier.verify("not-a-token")
    # Rotation: a file with two keys accepts tokens of both.
    key_file.write_bytes(public + other_public)
    both = TokenVerifier.from_file(str(key_file))
    assert both.verify(mint_token(other_private, "admin")) == "admin"
    assert both.verify(token) == "monitor"


def test_spiffe_names() -> None:
    assert name_from_spiffe(spiffe_id("gateway", "prod")) == "gateway"
    assert name_from_spiffe("spiffe://other/prod/gateway") is None
    assert name_from_spiffe("https://aiaas/prod/gateway") is None


def test_audit_actor_comes_from_the_verified_caller() -> None:
    token = caller_var.set("gateway")
    try:
        assert audit_actor("key:abc") == "gateway/key:abc"
        assert audit_actor("") == "gateway"
        assert audit_actor("gateway") == "gateway"
    finally:
        caller_var.reset(token)
    assert audit_actor("someone") == "someone"  # identity not required and none presented
