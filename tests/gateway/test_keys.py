"""API keys: token format, salted hashing, authentication failures of each kind, scopes."""

from __future__ import annotations

import dataclasses
import time

import pytest

from aiaas.api_keys import Role, hash_secret, make_key, parse_token
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from services.gateway.keys import KeyRing, authorize, bearer_token

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


def test_bootstrap_admin_key_is_accepted_but_never_listed() -> None:
    _, token = make_key(PEPPER)
    ring = KeyRing(PEPPER, bootstrap_token=token)
    caller = ring.authenticate(f"Bearer {token}")
    assert Role.ADMIN in caller.roles
    assert ring.entries() == []


def test_auth_off_lets_everyone_in() -> None:
    caller = KeyRing(PEPPER, enabled=False).authenticate(None)
    authorize(caller, Role.ADMIN)


def test_bearer_parsing_and_bad_key_ids() -> None:
    assert bearer_token("bearer  abc ") == "abc"
    with pytest.raises(InvalidArgument):
        make_key(PEPPER, key_id="BAD!")
    with pytest.raises(InvalidArgument):
        make_key(PEPPER, roles=frozenset())
