"""Who is calling (authentication) and what they may do (authorization), for every internal RPC.

`Authenticator` turns a call into an `Identity`: the mTLS client certificate's SPIFFE URI SAN (or
CN) when the server runs mTLS, else a development token in `x-aiaas-identity` verified with the
public key(s) in `identity_token_key` (`aiaas/identity.py` says how both are made).
`Policy` is the declarative table in `authz_policy.yaml` (or the file named by `authz_policy`):
identity -> RPCs, optionally limited to resources (record kinds, report sources).

The service interceptor (`services/common/interceptors.py`) calls `Guard.check` on every call
before the handler runs; handlers read the verified caller from `caller_var` (audit actors, report
sources, feed filtering) and never trust a name sent in the request.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
import yaml

from aiaas.identity import (
    DEFAULT_TRUST_DOMAIN,
    IDENTITY_NAME_MAX,
    TOKEN_ALGORITHM,
    TOKEN_ISSUER,
    TOKEN_METADATA_KEY,
    name_from_spiffe,
)
from services.common.context import caller_var
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated

DEFAULT_POLICY = Path(__file__).with_name("authz_policy.yaml")
SELF = "$self"
ANYONE = "anonymous"
_TOKEN_CACHE_MAX = 4096

# The request fields a grant's resources are checked against, per RPC ("<service>/<Method>").
ResourceReader = Callable[[Any], Iterable[tuple[str, str]]]


def _record_kind(request: Any) -> Iterable[tuple[str, str]]:
    return (("kind", request.kind),)


def _report_sources(request: Any) -> Iterable[tuple[str, str]]:
    yield "source", request.source
    for record in request.records:
        if record.source:
            yield "source", record.source


RESOURCES: dict[str, ResourceReader] = {
    "registry/PutRecord": lambda r: (("kind", r.record.kind),),
    "registry/GetRecord": _record_kind,
    "registry/ListRecords": _record_kind,
    "registry/DeleteRecord": _record_kind,
    "monitor/Report": _report_sources,
}


@dataclasses.dataclass(frozen=True)
class Identity:
    name: str
    # How it was proven: "mtls", "token", or "none" (identity not required and none presented).
    via: str

    @property
    def verified(self) -> bool:
        return self.via != "none"


UNVERIFIED = Identity(ANYONE, "none")


# A grant's resource limits: None = any resource; else resource name -> allowed values.
Limits = dict[str, frozenset[str]] | None


class Policy:
    """identity name -> {"<service>/<Method>" or "<service>/*" or "*": limits}."""

    def __init__(self, grants: Mapping[str, Mapping[str, Limits]]) -> None:
        self._grants = {name: dict(rules) for name, rules in grants.items()}

    @classmethod
    def load(cls, path: str | Path | None = None) -> Policy:
        source = Path(path) if path else DEFAULT_POLICY
        try:
            document = yaml.safe_load(source.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidArgument(f"authorization policy {source}: {exc}") from None
        return cls.parse(document, str(source))

    @classmethod
    def parse(cls, document: Mapping[str, Any], where: str = "policy") -> Policy:
        groups = document.get("groups") or {}
        identities = document.get("identities")
        if not isinstance(identities, Mapping) or not isinstance(groups, Mapping):
            raise InvalidArgument(f"{where}: needs an `identities` mapping (and optionally `groups`)")
        table: dict[str, dict[str, Limits]] = {}
        for name, grants in identities.items():
            rules: dict[str, Limits] = {}
            for rpc, limits in _expand(grants or [], groups, f"{where}: identity {name}", 0):
                rules[rpc] = _merge(rules[rpc], limits) if rpc in rules else limits
            table[str(name)] = rules
        return cls(table)

    def identities(self) -> list[str]:
        return sorted(self._grants)

    def limits(self, identity: str, rpc: str) -> tuple[bool, Limits]:
        """(allowed at all, resource limits) for `identity` calling `rpc` ("registry/PutRecord")."""
        rules = self._grants.get(identity)
        if rules is None:
            return False, None
        service = rpc.partition("/")[0]
        found = False
        merged: Limits = None
        for key in (rpc, f"{service}/*", "*"):
            if key in rules:
                merged = rules[key] if not found else _merge(merged, rules[key])
                found = True
        return found, merged

    def check(self, identity: Identity, rpc: str, request: Any = None) -> None:
        allowed, limits = self.limits(identity.name, rpc)
        if not allowed:
            raise PermissionDenied(f"identity {identity.name!r} may not call {rpc} (authorization policy)")
        if limits is None or request is None:
            return
        reader = RESOURCES.get(rpc)
        if reader is None:
            return
        for resource, value in reader(request):
            allowed_values = limits.get(resource)
            if allowed_values is None:
                continue
            if value not in allowed_values and not (SELF in allowed_values and value == identity.name):
                raise PermissionDenied(
                    f"identity {identity.name!r} may not call {rpc} with {resource} {value!r} "
                    f"(allowed: {', '.join(sorted(v if v != SELF else identity.name for v in allowed_values))})"
                )

    def allowed_values(self, identity: Identity, rpc: str, resource: str) -> frozenset[str] | None:
        """The values of `resource` `identity` may touch through `rpc`; None means any."""
        allowed, limits = self.limits(identity.name, rpc)
        if not allowed:
            return frozenset()
        if limits is None or resource not in limits:
            return None
        return frozenset(identity.name if v == SELF else v for v in limits[resource])


def _merge(a: Limits, b: Limits) -> Limits:
    """Two grants of one RPC add up: no limit wins; else per resource the union (a resource one
    grant leaves unlimited stays unlimited)."""
    if a is None or b is None:
        return None
    merged: dict[str, frozenset[str]] = {}
    for resource in set(a) & set(b):
        merged[resource] = a[resource] | b[resource]
    return merged


def _expand(grants: Any, groups: Mapping[str, Any], where: str, depth: int) -> Iterable[tuple[str, Limits]]:
    if depth > 8:
        raise InvalidArgument(f"{where}: groups nest too deep (a cycle?)")
    if not isinstance(grants, list):
        raise InvalidArgument(f"{where}: grants must be a list")
    for grant in grants:
        if isinstance(grant, str) and grant.startswith("@"):
            group = groups.get(grant[1:])
            if group is None:
                raise InvalidArgument(f"{where}: unknown group {grant!r}")
            yield from _expand(group, groups, f"{where} {grant}", depth + 1)
        elif isinstance(grant, str):
            yield _rpc_name(grant, where), None
        elif isinstance(grant, Mapping) and "rpc" in grant:
            limits = {}
            for resource, values in grant.items():
                if resource == "rpc":
                    continue
                if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                    raise InvalidArgument(f"{where}: {grant['rpc']} {resource} must be a list of strings")
                limits[str(resource)] = frozenset(values)
            yield _rpc_name(str(grant["rpc"]), where), limits
        else:
            raise InvalidArgument(f"{where}: cannot read grant {grant!r}")


def _rpc_name(text: str, where: str) -> str:
    if text == "*":
        return text
    service, slash, method = text.partition("/")
    if not slash or not service or not method:
        raise InvalidArgument(f"{where}: grant {text!r} must be '<service>/<Method>', '<service>/*' or '*'")
    return text


class TokenVerifier:
    """Verifies development identity tokens against one or more Ed25519 public keys (several
    during a key rotation); caches verified tokens until they expire (hot path: a dict lookup)."""

    def __init__(self, public_keys: list[Any], *, clock: Callable[[], float] = time.time) -> None:
        if not public_keys:
            raise InvalidArgument("identity_token_key holds no public key")
        self._keys = public_keys
        self._clock = clock
        self._cache: dict[str, tuple[str, float]] = {}

    @classmethod
    def from_file(cls, path: str) -> TokenVerifier:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise InvalidArgument(f"identity_token_key {path}: {exc.strerror}") from None
        marker = "-----END PUBLIC KEY-----"
        blocks = [b + marker for b in text.split(marker) if "-----BEGIN PUBLIC KEY-----" in b]
        try:
            return cls([load_pem_public_key(b.strip().encode()) for b in blocks])
        except ValueError as exc:
            raise InvalidArgument(f"identity_token_key {path}: not a PEM public key ({exc})") from None

    def verify(self, token: str) -> str:
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None and cached[1] > now:
            return cached[0]
        import jwt

        if len(token) > 4096:
            raise Unauthenticated("identity token too long")
        last_error: Exception | None = None
        for key in self._keys:
            try:
                claims = jwt.decode(token, key, algorithms=[TOKEN_ALGORITHM], issuer=TOKEN_ISSUER,
                                    options={"require": ["sub", "exp", "iss"]})
                break
            except jwt.InvalidSignatureError as exc:
                last_error = exc
            except jwt.PyJWTError as exc:
                raise Unauthenticated(f"invalid identity token: {exc}") from None
        else:
            raise Unauthenticated(f"invalid identity token: {last_error}")
        name = str(claims["sub"])[:IDENTITY_NAME_MAX]
        if len(self._cache) >= _TOKEN_CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (name, float(claims["exp"]))
        return name


def _first(auth: Mapping[str, Any], key: str) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in auth.get(key, ())]


class Authenticator:
    """The identity of a call: its mTLS certificate, else its development token."""

    def __init__(self, *, mtls: bool, tokens: TokenVerifier | None, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self.mtls = mtls
        self.tokens = tokens
        self.trust_domain = trust_domain

    def certificate_identity(self, context: grpc.aio.ServicerContext) -> str | None:
        auth = context.auth_context() or {}
        for uri in _first(auth, "peer_spiffe_id") + _first(auth, "peer_uri"):
            name = name_from_spiffe(uri, self.trust_domain)
            if name:
                return name
        names = _first(auth, "x509_common_name")
        return names[0][:IDENTITY_NAME_MAX] if names else None

    def identify(self, context: grpc.aio.ServicerContext, metadata: Mapping[str, str]) -> Identity | None:
        if self.mtls:
            name = self.certificate_identity(context)
            if name:
                return Identity(name, "mtls")
        token = metadata.get(TOKEN_METADATA_KEY)
        if token and self.tokens is not None:
            return Identity(self.tokens.verify(token), "token")
        return None


class Guard:
    """Authentication + authorization for one service's RPCs (`<service>/<Method>` names)."""

    def __init__(self, service: str, authenticator: Authenticator | None, policy: Policy, *, required: bool) -> None:
        self.service = service
        self.authenticator = authenticator
        self.policy = policy
        self.required = required

    def rpc_name(self, method: str) -> str:
        """'/aiaas.registry.v1.ModelRegistry/PutRecord' -> 'registry/PutRecord'."""
        return f"{self.service}/{method.rpartition('/')[2]}"

    def authenticate(self, context: grpc.aio.ServicerContext, metadata: Mapping[str, str]) -> Identity:
        identity = self.authenticator.identify(context, metadata) if self.authenticator is not None else None
        if identity is None:
            if self.required:
                raise Unauthenticated(
                    f"{self.service} needs a verified caller identity: present an mTLS client certificate "
                    f"(client_tls_cert) or an identity token ({TOKEN_METADATA_KEY}, identity_token_file)"
                )
            identity = UNVERIFIED
        caller_var.set(identity.name)
        return identity

    def check(self, context: grpc.aio.ServicerContext, metadata: Mapping[str, str], method: str,
              request: Any = None) -> Identity:
        identity = self.authenticate(context, metadata)
        if self.required or identity.verified:
            self.policy.check(identity, self.rpc_name(method), request)
        return identity

    def allowed_values(self, rpc: str, resource: str) -> frozenset[str] | None:
        """For the current caller: which values of `resource` it may touch via `rpc` (None: any)."""
        name = caller_var.get()
        if name == ANYONE and not self.required:
            return None
        return self.policy.allowed_values(Identity(name, "verified"), f"{self.service}/{rpc}", resource)


def audit_actor(claimed: str = "") -> str:
    """The actor to record for the current call: the verified caller, never a name from the request
    alone. A caller acting for someone else (the gateway for an API key) may name them: the actor is
    then "<caller>/<claimed>". With no verified caller (identity not required) the claim is all there is."""
    caller = caller_var.get()
    claimed = claimed.strip()[:IDENTITY_NAME_MAX]
    if caller == ANYONE:
        return claimed or ANYONE
    if claimed and claimed != caller:
        return f"{caller}/{claimed}"
    return caller
