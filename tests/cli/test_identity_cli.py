"""`aiaas identity`: the keys, tokens and certificates it makes are what services accept."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiaas.cli.main import main
from aiaas.identity import ClientIdentity
from aiaas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.authz import TokenVerifier
from tests.support.procs import ServiceProcess


def test_keygen_token_and_certs_are_accepted_by_a_registry(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    assert main(["identity", "keygen", str(keys)]) == 0
    assert (keys / "signing.key").stat().st_mode & 0o777 == 0o600
    assert main(["identity", "keygen", str(keys)]) == 2  # never silently replaced
    assert main(["identity", "token", "deployer", "--key", str(keys / "signing.key"),
                 "--out", str(tmp_path / "deployer.token")]) == 0
    token = (tmp_path / "deployer.token").read_text()
    assert TokenVerifier.from_file(str(keys / "signing.pub")).verify(token) == "deployer"
    assert main(["identity", "certs", str(tmp_path / "pki"), "registry", "admin"]) == 0
    assert "spiffe://aiaas/default/admin" in capsys.readouterr().out

    registry = ServiceProcess("registry", args=["--database-url", f"sqlite:///{tmp_path}/r.db", "--artifact-dir",
                                                str(tmp_path / "artifacts")],
                              env={"AIAAS_IDENTITY_TOKEN_KEY": str(keys / "signing.pub"),
                                   "AIAAS_REQUIRE_IDENTITY": "true"}).start()
    try:
        monkeypatch.setenv("AIAAS_IDENTITY_TOKEN_FILE", str(tmp_path / "deployer.token"))
        assert main(["models", "list", "--registry", registry.address]) == 0
        with ClientIdentity.from_env().channel(registry.address) as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            stub.CreateModel(registry_pb2.CreateModelRequest(name="m", actor="release-bot"), timeout=5)
            events = stub.ListAuditEvents(registry_pb2.ListAuditEventsRequest(model="m"), timeout=5).events
        assert [e.actor for e in events] == ["deployer/release-bot"]
        # The session's admin token is signed by another key: this registry does not know it.
        monkeypatch.setenv("AIAAS_IDENTITY_TOKEN_FILE", str(Path(registry.env["AIAAS_IDENTITY_TOKEN_FILE"])))
        capsys.readouterr()
        assert main(["models", "list", "--registry", registry.address]) != 0
        assert "identity token" in capsys.readouterr().err
    finally:
        registry.stop()
