"""API keys: token format, salted hashing, authentication failures of each kind, scopes, what a key
may grant or manage, and who may set a priority (the attacks themselves, against real gateway
processes, are in test_key_escalation.py)."""

from __future__ import annotations

import dataclasses
import time

import pytest
from tritonclient.grpc import service_pb2 as pb

from aiaas.api_keys import Role, hash_secret, make_key, parse_token, pattern_within
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from services.gateway.dataplane import check_priority
from services.gateway.entities import Caller
from services.gateway.keys import KeyRing, authorize, bearer_token, check_grant, check_manage, may_manage

PEPPER = b"test-pepper"


def ring_with(**kwargs: object) -> tuple[KeyRing, str]:
    ring = KeyRing(PEPPER)
    entry, token = make_key(PEPPER, **kwargs)  # type: ignore[arg-type]
    ring.put(entry)
    return ring, token


def test_token_round_trip_and_only_a_salted_hash_is_kept() -> None:
    entry, token = make_key(PEPPER, name="ci")
    key_id, secret = parse_token(token)
    assert key_id == entry.key_id and token.startswith(f"aiaas_{key_id}_")
    assert secret not in repr(entry)
    assert entry.secret_hash == hash_secret(PEPPER, entry.salt, secret)
    other, _ = make_key(PEPPER, secret=secret)
    assert other.salt != entry.salt and other.secret_hash != entry.secret_hash


def test_a_good_key_authenticates() -> None:
    ring, token = ring_with(models=("fraud*",), roles=frozenset({Role.INFER}))
    caller = ring.authenticate(f"Bearer {token}")
    assert caller.models == ("fraud*",) and caller.roles == frozenset({Role.INFER})


@pytest.mark.parametrize("header, message", [
    (None, "missing API key"),
    ("", "missing API key"),
    ("Basic abc", "malformed authorization header"),
    ("Bearer nonsense", "malformed API key"),
    ("Bearer aiaas_UPPER_x", "malformed API key"),
])
def test_missing_or_malformed_keys_are_unauthenticated(header: str | None, message: str) -> None:
    ring, _ = ring_with()
    with pytest.raises(Unauthenticated, match=message):
        ring.authenticate(header)


def test_a_wrong_secret_or_unknown_id_is_unauthenticated() -> None:
    ring, token = ring_with()
    key_id, _ = parse_token(token)
    with pytest.raises(Unauthenticated, match="invalid API key"):
        ring.authenticate(f"Bearer aiaas_{key_id}_wrongsecret")
    with pytest.raises(Unauthenticated, match="invalid API key"):
        ring.authenticate("Bearer aiaas_0000aaaa_whatever")


def test_revoked_and_expired_keys_are_unauthenticated() -> None:
    ring, token = ring_with()
    key_id, _ = parse_token(token)
    entry = ring.get(key_id)
    assert entry is not None
    ring.put(dataclasses.replace(entry, expire_time=time.time() - 1))
    with pytest.raises(Unauthenticated, match="expired"):
        ring.authenticate(f"Bearer {token}")
    ring.put(dataclasses.replace(entry, revoked=True))
    with pytest.raises(Unauthenticated, match="revoked"):
        ring.authenticate(f"Bearer {token}")


def test_scopes_roles_and_model_patterns() -> None:
    ring, token = ring_with(models=("fraud*", "resnet"), roles=frozenset({Role.INFER}))
    caller = ring.authenticate(f"Bearer {token}")
    authorize(caller, Role.INFER, "fraud-v2")
    authorize(caller, Role.INFER, "resnet")
    with pytest.raises(PermissionDenied, match="may not use model 'resnet50'"):
        authorize(caller, Role.INFER, "resnet50")
    with pytest.raises(PermissionDenied, match="lacks the 'read' role"):
        authorize(caller, Role.READ, "resnet")
    with pytest.raises(PermissionDenied, match="'admin'"):
        authorize(caller, Role.ADMIN)


def test_admin_implies_every_role() -> None:
    ring, token = ring_with(roles=frozenset({Role.ADMIN}))
    caller = ring.authenticate(f"Bearer {token}")
    authorize(caller, Role.INFER, "anything")
    authorize(caller, Role.READ, "anything")


def test_a_cached_header_stops_working_once_its_key_is_revoked_expires_or_goes() -> None:
    """Streams re-check their key per request through this cache: it must not outlive a change."""
    ring, token = ring_with()
    header = f"Bearer {token}"
    key_id, _ = parse_token(token)
    entry = ring.get(key_id)
    assert entry is not None
    ring.authenticate(header)  # now cached
    ring.put(dataclasses.replace(entry, revoked=True))
    with pytest.raises(Unauthenticated, match="revoked"):
        ring.authenticate(header)
    ring.put(dataclasses.replace(entry, expire_time=time.time() + 3600))
    assert ring.authenticate(header).key_id == key_id  # cached again, with its expiry
    with pytest.raises(Unauthenticated, match="expired"):
        ring.authenticate(header, now=time.time() + 7200)
    ring.remove(key_id)
    with pytest.raises(Unauthenticated, match="invalid API key"):
        ring.authenticate(header)


@pytest.mark.parametrize("inner, outer, within", [
    ("fraud-v2", "fraud*", True),
    ("fraud*", "fraud*", True),
    ("fraud-v*", "fraud*", True),
    ("fraud?", "fraud*", True),
    ("anything*", "*", True),
    ("resnet", "resnet", True),
    ("*", "fraud*", False),
    ("fr*", "fraud*", False),
    ("resnet50", "resnet", False),
    ("a*", "a?", False),
    # Narrower in fact, but not provably so by these rules: refused, never granted by mistake.
    ("[ab]x", "*x", False),
])
def test_pattern_within(inner: str, outer: str, within: bool) -> None:
    assert pattern_within(inner, outer) is within


def caller(models: tuple[str, ...] = ("*",), roles: frozenset[Role] = frozenset({Role.ADMIN}),
           expire_time: float | None = None) -> Caller:
    return Caller(key_id="creator", models=models, roles=roles, expire_time=expire_time)


def test_a_key_grants_nothing_beyond_itself() -> None:
    scoped = caller(models=("tiny", "fraud*"))
    check_grant(scoped, models=("tiny", "fraud-v2"), roles=frozenset({Role.ADMIN}), expire_time=None)
    with pytest.raises(PermissionDenied, match=r"models '\*' \(outside its scope 'tiny', 'fraud\*'\)"):
        check_grant(scoped, models=("*",), roles=frozenset({Role.INFER}), expire_time=None)
    with pytest.raises(PermissionDenied, match="models 'other'"):
        check_grant(scoped, models=("tiny", "other"), roles=frozenset({Role.INFER}), expire_time=None)
    reader = caller(roles=frozenset({Role.READ}))
    with pytest.raises(PermissionDenied, match="roles 'admin', 'priority'"):
        check_grant(reader, models=("*",), roles=frozenset({Role.READ, Role.ADMIN, Role.PRIORITY}), expire_time=None)
    ends = time.time() + 3600
    expiring = caller(expire_time=ends)
    check_grant(expiring, models=("*",), roles=frozenset({Role.INFER}), expire_time=ends - 1)
    for later in (None, ends + 1):
        with pytest.raises(PermissionDenied, match="after its own"):
            check_grant(expiring, models=("*",), roles=frozenset({Role.INFER}), expire_time=later)


def test_a_key_manages_only_keys_within_its_scope() -> None:
    scoped = caller(models=("tiny",))
    narrow, _ = make_key(PEPPER, models=("tiny",), roles=frozenset({Role.INFER}))
    broad, _ = make_key(PEPPER, models=("*",), roles=frozenset({Role.ADMIN}))
    assert may_manage(scoped, narrow) and not may_manage(scoped, broad)
    check_manage(scoped, narrow, "revoke")
    with pytest.raises(PermissionDenied, match=f"may not revoke API key {broad.key_id}, which holds models '\\*'"):
        check_manage(scoped, broad, "revoke")
    assert may_manage(Caller(key_id=broad.key_id, models=("tiny",), roles=frozenset({Role.INFER})), broad)


def test_only_the_priority_role_sets_a_priority() -> None:
    request = pb.ModelInferRequest(model_name="m")
    plain = caller(roles=frozenset({Role.INFER}))
    check_priority(plain, request)
    request.parameters["priority"].int64_param = 0
    check_priority(plain, request)  # 0 is the default level
    for field in ("uint64_param", "int64_param"):
        request.parameters["priority"].Clear()
        setattr(request.parameters["priority"], field, 1)
        with pytest.raises(PermissionDenied, match="lacks the 'priority' role"):
            check_priority(plain, request)
        check_priority(caller(roles=frozenset({Role.INFER, Role.PRIORITY})), request)
        check_priority(caller(roles=frozenset({Role.ADMIN})), request)
    request.parameters["priority"].string_param = "0"
    with pytest.raises(PermissionDenied):
        check_priority(plain, request)


def test_auth_off_lets_everyone_in() -> None:
    caller = KeyRing(PEPPER, enabled=False).authenticate(None)
    authorize(caller, Role.ADMIN)


def test_bearer_parsing_and_bad_key_ids() -> None:
    assert bearer_token("bearer  abc ") == "abc"
    with pytest.raises(InvalidArgument):
        make_key(PEPPER, key_id="BAD!")
    with pytest.raises(InvalidArgument):
        make_key(PEPPER, roles=frozenset())


def test_a_malformed_bootstrap_token_is_refused_at_start() -> None:
    from services.gateway.settings import GatewaySettings

    with pytest.raises(InvalidArgument, match="bootstrap_admin_key must be a token"):
        GatewaySettings(key_pepper="p", bootstrap_admin_key="admin-secret").validate()
    GatewaySettings(key_pepper="p", bootstrap_admin_key="aiaas_b00751a9_secret").validate()
