"""Shared fixtures: real redis-server and PostgreSQL, started once per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.identity import install_session_identity
from tests.support.servers import PostgresServer, RedisServer

# Before any service starts: every process verifies the session's development tokens, and SDK
# clients present the `admin` one (tests/support/identity.py).
install_session_identity()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.close()
