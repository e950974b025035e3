"""Development identities for the test session: one signing key, tokens per identity name, and a
small PKI (CA + per-service certificates with SPIFFE URI SANs) for mTLS tests.

`install_session_identity()` runs once from tests/conftest.py: every service process the tests
start verifies tokens with the session key, and every SDK client presents the `admin` token.
Services run with `require_identity=false` there (raw gRPC and tritonclient calls in older tests
carry no identity), so a presented token is still verified and checked against the policy; the
tests in tests/common/test_identity*.py start services with identities required.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from aiaas import pki
from aiaas.identity import ClientIdentity, generate_signing_key, mint_token


@dataclasses.dataclass(frozen=True)
class Identities:
    directory: Path
    private_pem: bytes
    public_key: Path

    def token(self, name: str, ttl_s: float = 3600.0) -> str:
        return mint_token(self.private_pem, name, ttl_s=ttl_s)

    def token_file(self, name: str) -> Path:
        path = self.directory / f"{name}.token"
        if not path.exists():
            path.write_text(self.token(name, ttl_s=24 * 3600.0))
        return path

    def client(self, name: str) -> ClientIdentity:
        return ClientIdentity(token=self.token(name))

    def service_env(self, name: str, *, required: bool = True) -> dict[str, str]:
        """Environment for a service process acting as `name` that verifies tokens."""
        return {"AIAAS_IDENTITY_TOKEN_KEY": str(self.public_key),
                "AIAAS_IDENTITY_TOKEN_FILE": str(self.token_file(name)),
                "AIAAS_REQUIRE_IDENTITY": "true" if required else "false"}


def make_identities(directory: Path) -> Identities:
    directory.mkdir(parents=True, exist_ok=True)
    private_pem, public_pem = generate_signing_key()
    public = directory / "signing.pub"
    public.write_bytes(public_pem)
    return Identities(directory, private_pem, public)


@dataclasses.dataclass(frozen=True)
class Pki:
    """A CA and, per identity name, a certificate + key on disk."""

    directory: Path
    ca: pki.Issued

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def files(self, name: str) -> tuple[Path, Path]:
        cert, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        if not cert.exists():
            pki.write(pki.issue(self.ca, name), self.directory, name)
        return cert, key

    def server_env(self, name: str) -> dict[str, str]:
        """A service acting as `name`: serves mTLS and presents its certificate to the services it calls."""
        cert, key = self.files(name)
        return {"AIAAS_TLS_CERT": str(cert), "AIAAS_TLS_KEY": str(key), "AIAAS_TLS_CLIENT_CA": str(self.ca_file),
                "AIAAS_CLIENT_TLS_CA": str(self.ca_file), "AIAAS_CLIENT_TLS_CERT": str(cert),
                "AIAAS_CLIENT_TLS_KEY": str(key), "AIAAS_REQUIRE_IDENTITY": "true"}

    def client_env(self, name: str) -> dict[str, str]:
        """A process that only calls services (the gateway, whose own door is public) as `name`."""
        cert, key = self.files(name)
        return {"AIAAS_CLIENT_TLS_CA": str(self.ca_file), "AIAAS_CLIENT_TLS_CERT": str(cert),
                "AIAAS_CLIENT_TLS_KEY": str(key)}

    def client(self, name: str) -> ClientIdentity:
        cert, key = self.files(name)
        return ClientIdentity(tls_ca=self.ca.cert_pem, tls_cert=cert.read_bytes(), tls_key=key.read_bytes())


def make_pki(directory: Path) -> Pki:
    ca = pki.make_ca()
    pki.write(ca, directory, "ca")
    return Pki(directory, ca)


_SESSION: Identities | None = None


def session_installed() -> bool:
    return _SESSION is not None


def session_identities() -> Identities:
    assert _SESSION is not None, "install_session_identity() runs from tests/conftest.py"
    return _SESSION


def install_session_identity() -> Identities:
    global _SESSION
    if _SESSION is None:
        _SESSION = make_identities(Path(tempfile.mkdtemp(prefix="aiaas-test-identity-")))
        os.environ["AIAAS_IDENTITY_TOKEN_KEY"] = str(_SESSION.public_key)
        os.environ["AIAAS_IDENTITY_TOKEN_FILE"] = str(_SESSION.token_file("admin"))
        os.environ.setdefault("AIAAS_REQUIRE_IDENTITY", "false")
        # Nothing the tests start reads this user's `aiaas up` home (~/.aiaas): a client without a
        # token of its own would otherwise present that stack's admin token to the test services.
        home = _SESSION.directory / "home"
        home.mkdir(exist_ok=True)
        os.environ["AIAAS_HOME"] = str(home)
    return _SESSION
