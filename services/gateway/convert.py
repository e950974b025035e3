"""Pure conversions between protobuf messages (gateway, registry) and the gateway's domain types."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import timestamp_pb2

from aiaas.gateway.v1 import gateway_pb2 as gw
from services.common.errors import InvalidArgument
from services.gateway.domain import ApiKeyEntry, QuotaSpec, Role, Route, RouteSplit, ShadowTarget
from services.gateway.keys import HASH_SCHEME
from services.gateway.limits import Signature, TensorSpec

ROLE_TO_PB = {Role.INFER: gw.ROLE_INFER, Role.READ: gw.ROLE_READ, Role.ADMIN: gw.ROLE_ADMIN}
ROLE_FROM_PB = {v: k for k, v in ROLE_TO_PB.items()}
ROLE_NAMES = {role.value: role for role in Role}


def time_to_pb(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def time_from_pb(message: object, field: str) -> float | None:
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    return float(getattr(message, field).ToNanoseconds()) / 1e9


def quota_from_pb(message: object, field: str = "quota") -> QuotaSpec | None:
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    quota = getattr(message, field)
    if quota.requests_per_second < 0:
        raise InvalidArgument("quota requests_per_second must be >= 0")
    return QuotaSpec(rps=quota.requests_per_second, burst=quota.burst)


def quota_to_pb(quota: QuotaSpec) -> gw.Quota:
    return gw.Quota(requests_per_second=quota.rps, burst=quota.burst)


def roles_from_pb(roles: Iterable[int]) -> frozenset[Role]:
    found = set()
    for value in roles:
        role = ROLE_FROM_PB.get(value)  # type: ignore[call-overload]
        if role is None:
            raise InvalidArgument(f"unknown role {value}")
        found.add(role)
    return frozenset(found)


def key_to_pb(entry: ApiKeyEntry) -> gw.ApiKey:
    key = gw.ApiKey(
        key_id=entry.key_id, name=entry.name, models=list(entry.models),
        roles=sorted(ROLE_TO_PB[r] for r in entry.roles), revoked=entry.revoked, created_by=entry.created_by,
    )
    if entry.quota is not None:
        key.quota.CopyFrom(quota_to_pb(entry.quota))
    for field, value in (("create_time", entry.create_time), ("expire_time", entry.expire_time),
                         ("revoke_time", entry.revoke_time)):
        stamp = time_to_pb(value)
        if stamp is not None:
            getattr(key, field).CopyFrom(stamp)
    return key


def key_from_pb(key: gw.ApiKey, salt: bytes = b"", secret_hash: bytes = b"") -> ApiKeyEntry:
    return ApiKeyEntry(
        key_id=key.key_id, name=key.name, models=tuple(key.models) or ("*",), roles=roles_from_pb(key.roles),
        quota=quota_from_pb(key), create_time=time_from_pb(key, "create_time") or 0.0,
        expire_time=time_from_pb(key, "expire_time"), revoked=key.revoked,
        revoke_time=time_from_pb(key, "revoke_time"), created_by=key.created_by, salt=salt, secret_hash=secret_hash,
    )


def stored_key_to_bytes(entry: ApiKeyEntry) -> bytes:
    stored = gw.StoredApiKey(
        key=key_to_pb(entry), salt=entry.salt, secret_hash=entry.secret_hash, hash_scheme=HASH_SCHEME
    )
    return stored.SerializeToString()


def stored_key_from_bytes(data: bytes) -> ApiKeyEntry:
    stored = gw.StoredApiKey.FromString(data)
    if stored.hash_scheme != HASH_SCHEME:
        raise InvalidArgument(f"API key {stored.key.key_id}: unknown hash scheme {stored.hash_scheme!r}")
    return key_from_pb(stored.key, stored.salt, stored.secret_hash)


def route_from_pb(route: gw.Route) -> Route:
    if not route.model:
        raise InvalidArgument("route.model is required")
    splits = tuple(RouteSplit(alias=s.alias, version=s.version, weight=s.weight) for s in route.splits)
    shadows = tuple(ShadowTarget(alias=s.alias, version=s.version, sample_rate=s.sample_rate) for s in route.shadows)
    targets: list[RouteSplit | ShadowTarget] = [*splits, *shadows]
    for target in targets:
        if bool(target.alias) == bool(target.version):
            raise InvalidArgument(f"route for {route.model!r}: each split and shadow names an alias or a version")
        if target.version < 0:
            raise InvalidArgument(f"route for {route.model!r}: versions are positive")
    for shadow in shadows:
        if not 0.0 <= shadow.sample_rate <= 1.0:
            raise InvalidArgument(f"route for {route.model!r}: shadow sample_rate must be within 0..1")
    return Route(model=route.model, splits=splits, sticky=route.sticky, shadows=shadows, quota=quota_from_pb(route))


def route_to_pb(route: Route) -> gw.Route:
    message = gw.Route(
        model=route.model, sticky=route.sticky,
        splits=[gw.RouteSplit(alias=s.alias, version=s.version, weight=s.weight) for s in route.splits],
        shadows=[gw.ShadowTarget(alias=s.alias, version=s.version, sample_rate=s.sample_rate) for s in route.shadows],
    )
    if route.quota is not None:
        message.quota.CopyFrom(quota_to_pb(route.quota))
    return message


def signature_from_pb(version: object) -> Signature:
    """The input signature of a registry ModelVersion."""
    return Signature(
        inputs=tuple(
            TensorSpec(name=t.name, datatype=t.datatype, shape=tuple(t.shape))
            for t in version.signature.inputs  # type: ignore[attr-defined]
        ),
        batched=version.serving_config.max_batch_size > 0,  # type: ignore[attr-defined]
    )
