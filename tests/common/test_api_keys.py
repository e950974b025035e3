"""The API-key vocabulary in the client package: said once, importable without the servers, and the
record an operator tool writes is the one the gateway reads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from aiaas import api_keys, records
from aiaas.errors import InvalidArgument, Unauthenticated
from aiaas.gateway.v1 import gateway_pb2
from services.gateway import convert, entities, keys

REPO = Path(__file__).resolve().parents[2]


def test_key_types_and_codecs_are_defined_only_in_the_client_package() -> None:
    shared = {"Role", "QuotaSpec", "ApiKeyEntry", "make_key", "parse_token", "format_token", "hash_secret",
              "key_to_pb", "key_from_pb", "stored_key_to_bytes", "stored_key_from_bytes", "quota_from_pb"}
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "services").rglob("*.py")) + sorted((REPO / "aiaas").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in shared:
                found.setdefault(node.name, []).append(str(path.relative_to(REPO)))
    assert found == {name: ["aiaas/api_keys.py"] for name in shared}
    # The gateway names the same objects, not copies.
    assert entities.Role is api_keys.Role and entities.ApiKeyEntry is api_keys.ApiKeyEntry
    assert convert.key_to_pb is api_keys.key_to_pb


def test_minting_a_key_imports_no_server_code() -> None:
    code = ("import sys, aiaas.api_keys as k; e, t = k.make_key(b'p'); k.stored_key_record(e); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'services'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_record_a_tool_writes_is_the_key_the_gateway_accepts() -> None:
    entry, token = api_keys.make_key(b"pepper", name="ops", models=("fraud*",), roles=frozenset({api_keys.Role.ADMIN}),
                                     quota=api_keys.QuotaSpec(5, 10), created_by="cli")
    record = api_keys.stored_key_record(entry)
    assert (record.kind, record.name) == (records.API_KEY.kind, entry.key_id)
    assert records.API_KEY.decode(record.data).hash_scheme == api_keys.HASH_SCHEME
    stored = api_keys.stored_key_from_bytes(record.data)
    assert stored == entry
    ring = keys.KeyRing(b"pepper")
    ring.put(stored)
    caller = ring.authenticate(f"Bearer {token}")
    assert (caller.key_id, caller.models, caller.quota) == (entry.key_id, ("fraud*",), api_keys.QuotaSpec(5, 10))
    other = keys.KeyRing(b"another pepper")  # a gateway with another pepper refuses it
    other.put(stored)
    with pytest.raises(Unauthenticated, match="invalid API key"):
        other.authenticate(f"Bearer {token}")


def test_token_format() -> None:
    token = api_keys.format_token("abcd1234", "s3cr_et")
    assert token == "aiaas_abcd1234_s3cr_et"
    assert api_keys.parse_token(token) == ("abcd1234", "s3cr_et")
    for bad in ("aiaas_abcd1234_", "other_abcd1234_x", "aiaas_AB_x", "aiaas"):
        with pytest.raises(Unauthenticated, match="malformed API key"):
            api_keys.parse_token(bad)
    assert set(api_keys.ROLE_NAMES) == {"infer", "read", "admin", "priority"}


def test_unreadable_or_foreign_records_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="api_key record 'k1' does not parse"):
        api_keys.stored_key_from_bytes(b"\xff\xff", "k1")
    foreign = gateway_pb2.StoredApiKey(key=gateway_pb2.ApiKey(key_id="k1"), hash_scheme="md5").SerializeToString()
    with pytest.raises(InvalidArgument, match="unknown hash scheme 'md5'"):
        api_keys.stored_key_from_bytes(foreign)
