"""Who is calling: the identity a client presents to an aiaas service, and how it is proven.

Every internal caller (a service calling another, an operator tool) has an identity name:
`registry`, `inference`, `gateway`, `monitor`, `deployer`, `admin` (the policy in
`services/common/authz_policy.yaml` says what each may do). It is proven one of two ways:

- **Production: an mTLS client certificate.** The name is the last path segment of the
  certificate's SPIFFE-style URI SAN (`spiffe://aiaas/<namespace>/<name>`), or its CN when it has
  no such URI. The client sets `client_tls_ca` / `client_tls_cert` / `client_tls_key`.
- **Development: a signed token** in the `x-aiaas-identity` metadata: a JWT (EdDSA, Ed25519) whose
  `sub` is the name, signed by a key only the operator holds (`aiaas up` makes one per stack);
  services hold just the public key, so a service can verify tokens but never mint one.

`ClientIdentity` builds channels that present the identity; it reads the same settings as the
services (`AIAAS_CLIENT_TLS_CA`, `AIAAS_CLIENT_TLS_CERT`, `AIAAS_CLIENT_TLS_KEY`,
`AIAAS_CLIENT_TLS_SERVER_NAME`, `AIAAS_IDENTITY_TOKEN_FILE`). Minting needs `pyjwt[crypto]`, which
only the server distribution installs; presenting a token needs nothing but grpc.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

TOKEN_METADATA_KEY = "x-aiaas-identity"
TOKEN_ISSUER = "aiaas"
TOKEN_ALGORITHM = "EdDSA"
SPIFFE_SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "aiaas"
# Identities the default policy knows; a certificate or token may name another (it then may do
# nothing unless the policy grants it something).
KNOWN_IDENTITIES = ("registry", "inference", "gateway", "monitor", "deployer", "admin")
IDENTITY_NAME_MAX = 128


def spiffe_id(name: str, namespace: str = "default", trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"{SPIFFE_SCHEME}{trust_domain}/{namespace}/{name}"


def name_from_spiffe(uri: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str | None:
    """`spiffe://<trust_domain>/<namespace>/<name>` -> name; None for another trust domain or shape."""
    if not uri.startswith(SPIFFE_SCHEME):
        return None
    domain, _, path = uri[len(SPIFFE_SCHEME):].partition("/")
    parts = [p for p in path.split("/") if p]
    if domain != trust_domain or not parts:
        return None
    return parts[-1][:IDENTITY_NAME_MAX]


HOME_IDENTITY_DIR = "identity"


def default_home() -> Path:
    """`$AIAAS_HOME`, default `~/.aiaas`: where `aiaas up` keeps its state."""
    return Path(os.environ.get("AIAAS_HOME") or Path.home() / ".aiaas").expanduser().resolve()


def home_admin_token() -> Path | None:
    """The admin token `aiaas up` keeps in this user's home (mode 0600), when there is one."""
    path = default_home() / HOME_IDENTITY_DIR / "admin.token"
    return path if path.is_file() else None


# --- development tokens --------------------------------------------------------------------------

def generate_signing_key() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PEM, public PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def mint_token(private_pem: bytes, name: str, *, ttl_s: float = 30 * 24 * 3600.0,
               now: float | None = None) -> str:
    """A development identity token for `name`, valid `ttl_s` seconds."""
    import jwt

    if not name or len(name) > IDENTITY_NAME_MAX:
        raise ValueError(f"identity name must be 1..{IDENTITY_NAME_MAX} characters")
    issued = int(time.time() if now is None else now)
    claims = {"iss": TOKEN_ISSUER, "sub": name, "iat": issued, "exp": issued + int(ttl_s)}
    return jwt.encode(claims, private_pem, algorithm=TOKEN_ALGORITHM)


def read_token(path: str | os.PathLike[str]) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"identity token file {path} is empty")
    return token


# --- presenting an identity ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClientIdentity:
    """What a client presents: TLS material (server CA, own certificate and key) and/or a token."""

    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    server_name: str | None = None
    token: str | None = None

    @classmethod
    def from_files(cls, *, tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                   server_name: str | None = None, token_file: str | None = None) -> ClientIdentity:
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("client_tls_cert and client_tls_key must be given together")
        if tls_cert and not tls_ca:
            raise ValueError("client_tls_cert needs client_tls_ca (the CA that signed the servers)")
        return cls(
            tls_ca=Path(tls_ca).read_bytes() if tls_ca else None,
            tls_cert=Path(tls_cert).read_bytes() if tls_cert else None,
            tls_key=Path(tls_key).read_bytes() if tls_key else None,
            server_name=server_name or None,
            token=read_token(token_file) if token_file else None,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientIdentity:
        """The identity named by `AIAAS_CLIENT_TLS_*` and `AIAAS_IDENTITY_TOKEN_FILE`; without either,
        the admin token of `aiaas up` in `$AIAAS_HOME` when present; else none."""
        env = os.environ if env is None else env
        token_file = env.get("AIAAS_IDENTITY_TOKEN_FILE") or None
        if token_file is None and not env.get("AIAAS_CLIENT_TLS_CERT"):
            # On a machine running `aiaas up`, its user's tools act as the stack's admin.
            home_token = home_admin_token()
            token_file = str(home_token) if home_token else None
        return cls.from_files(
            tls_ca=env.get("AIAAS_CLIENT_TLS_CA") or None, tls_cert=env.get("AIAAS_CLIENT_TLS_CERT") or None,
            tls_key=env.get("AIAAS_CLIENT_TLS_KEY") or None,
            server_name=env.get("AIAAS_CLIENT_TLS_SERVER_NAME") or None,
            token_file=token_file,
        )

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_ca is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.tls_ca, private_key=self.tls_key,
                                            certificate_chain=self.tls_cert)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name and self.tls else []

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA_KEY, self.token),) if self.token else ()

    def channel(self, target: str, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        """A blocking channel to `target` presenting this identity."""
        opts = [*(options or ()), *self.options()]
        credentials = self.credentials()
        channel = (grpc.secure_channel(target, credentials, options=opts) if credentials is not None
                   else grpc.insecure_channel(target, options=opts))
        if self.token:
            return grpc.intercept_channel(channel, _SyncMetadata(self.metadata()))
        return channel

    def aio_channel(self, target: str, options: list[tuple[str, Any]] | None = None, *,
                    token_interceptors: bool = True) -> grpc.aio.Channel:
        """An asyncio channel to `target` presenting this identity.

        With `token_interceptors=False` the channel carries the TLS identity only, and the caller
        adds `metadata()` to each call itself: grpc.aio routes every message of an intercepted
        streaming call through extra Python (an async generator per direction), which a hot path
        such as the gateway's token relay should not pay.
        """
        opts = [*(options or ()), *self.options()]
        credentials = self.credentials()
        interceptors = list(aio_metadata_interceptors(self.metadata())) if self.token and token_interceptors else None
        if credentials is not None:
            return grpc.aio.secure_channel(target, credentials, options=opts, interceptors=interceptors)
        return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)


def _with_metadata(details: Any, extra: tuple[tuple[str, str], ...], factory: Callable[..., Any]) -> Any:
    metadata = tuple(details.metadata or ()) + extra
    fields = {f: getattr(details, f, None) for f in ("method", "timeout", "credentials", "wait_for_ready")}
    if factory is _SyncDetails:
        fields["compression"] = getattr(details, "compression", None)
    return factory(metadata=metadata, **fields)


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self, name, value)


class _SyncMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the identity token to every call of a blocking channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return _with_metadata(details, self._metadata, _SyncDetails)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


def aio_metadata_interceptors(metadata: tuple[tuple[str, str], ...]) -> tuple[grpc.aio.ClientInterceptor, ...]:
    """Interceptors adding `metadata` to every call of a grpc.aio channel (one per call shape)."""

    def details(client_call_details: Any) -> grpc.aio.ClientCallDetails:
        return _with_metadata(client_call_details, metadata, grpc.aio.ClientCallDetails)

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
            return await continuation(details(client_call_details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
            return await continuation(details(client_call_details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                                         request_iterator: Any) -> Any:
            return await continuation(details(client_call_details), request_iterator)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation: Any, client_call_details: Any,
                                          request_iterator: Any) -> Any:
            return await continuation(details(client_call_details), request_iterator)

    return UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()
