"""Registry fixtures: a store on SQLite or on a real throwaway PostgreSQL, and the core over it."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.registry.artifacts import ArtifactStore
from services.registry.core import RegistryCore
from services.registry.entities import ArtifactFormat, ServingConfig, Signature, TensorSpec, VersionSpec
from services.registry.sql_store import SqlRegistryStore
from tests.support.servers import PostgresServer

_db_numbers = itertools.count()

SIGNATURE = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),))


def make_database(backend: str, tmp_path: Path, postgres: PostgresServer | None) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    assert postgres is not None
    return postgres.create_database(f"registry_{next(_db_numbers)}")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    postgres = request.getfixturevalue("postgres_server") if request.param == "postgres" else None
    return make_database(request.param, tmp_path, postgres)


@pytest.fixture
def store(database_url: str) -> Iterator[SqlRegistryStore]:
    registry_store = SqlRegistryStore(database_url, feed_retention=50)
    yield registry_store
    registry_store.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def core(store: SqlRegistryStore, artifacts: ArtifactStore) -> RegistryCore:
    return RegistryCore(store, artifacts, max_artifact_bytes=1024 * 1024)


def spec_for(model: str, data: bytes, **changes: object) -> VersionSpec:
    fields: dict[str, object] = {
        "model": model, "format": ArtifactFormat.ONNX, "artifact_sha256": hashlib.sha256(data).hexdigest(),
        "artifact_size": len(data), "signature": SIGNATURE, "serving_config": ServingConfig(max_batch_size=8),
        "actor": "tester", "create_model": True,
    }
    fields.update(changes)
    return VersionSpec(**fields)  # type: ignore[arg-type]


def blobs(artifacts: ArtifactStore) -> list[Path]:
    return sorted(p for p in artifacts.root.rglob("*") if p.is_file())
