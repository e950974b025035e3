"""Blob references in the database: counted with the versions that use them, and blob files placed and
removed only inside a writing transaction, so two registries on one database and one artifact directory
never lose a blob (issue 12, item 4). On SQLite and on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from services.common.errors import Aborted
from services.registry import rows, schema
from services.registry.artifacts import ArtifactStore
from services.registry.core import RegistryCore
from services.registry.entities import ModelVersion, VersionSpec
from services.registry.sql_store import SqlRegistryStore
from services.registry.store import PlaceBlob
from tests.registry.conftest import blobs, spec_for
from tests.support.blobs import onnx_blob

WAIT_S = 30.0


class Replica:
    """What one registry process holds: its own engine and its own ArtifactStore over the shared directory."""

    def __init__(self, database_url: str, artifact_dir: Path, store_class: type[SqlRegistryStore] = SqlRegistryStore):
        self.store = store_class(database_url)
        self.artifacts = ArtifactStore(artifact_dir)
        self.core = RegistryCore(self.store, self.artifacts, max_artifact_bytes=1024 * 1024)


@pytest.fixture
def replicas(database_url: str, tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    pair = (Replica(database_url, tmp_path / "shared"), Replica(database_url, tmp_path / "shared"))
    yield pair
    for replica in pair:
        replica.store.close()


def sha_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_references_follow_the_versions_that_use_a_blob(core: RegistryCore, store: SqlRegistryStore) -> None:
    data, other = onnx_blob("counted"), onnx_blob("another")
    core.upload_bytes(spec_for("a", data), data)
    core.upload_bytes(spec_for("a", data), data)
    core.upload_bytes(spec_for("b", data), data)
    core.upload_bytes(spec_for("b", other), other)
    assert (store.blob_refs(sha_of(data)), store.blob_refs(sha_of(other))) == (3, 1)
    core.delete_version("a", 1)
    assert store.blob_refs(sha_of(data)) == 2
    core.delete_model("b")
    assert (store.blob_refs(sha_of(data)), store.blob_refs(sha_of(other))) == (1, None)
    assert [p.name for p in blobs(core.artifacts)] == [sha_of(data)[2:]]
    core.delete_version("a", 2)
    assert store.blob_refs(sha_of(data)) is None and blobs(core.artifacts) == []
    assert store.unreferenced_blobs(10) == []


def test_an_upload_waits_for_a_collection_of_its_bytes_on_another_replica_then_stores_them_again(
        replicas: tuple[Replica, Replica]) -> None:
    collector, uploader = replicas
    data = onnx_blob("collected while uploaded")
    sha = sha_of(data)
    collector.core.upload_bytes(spec_for("m", data), data)
    collector.store.delete_version("m", 1, "tester")  # the reference is gone; the file goes with the collection
    inside, proceed = threading.Event(), threading.Event()
    collected: list[bool] = []

    def remove_slowly(digest: str) -> None:
        inside.set()
        proceed.wait(WAIT_S)
        collector.artifacts.remove(digest)

    collecting = threading.Thread(target=lambda: collected.append(collector.store.collect_blob(sha, remove_slowly)))
    collecting.start()
    assert inside.wait(WAIT_S)
    uploaded: list[tuple[ModelVersion, bool]] = []
    done = threading.Event()

    def upload() -> None:
        try:
            uploaded.append(uploader.core.upload_bytes(spec_for("m", data), data))
        finally:
            done.set()

    uploading = threading.Thread(target=upload)
    uploading.start()
    assert not done.wait(0.5), "the upload committed while another replica was removing its bytes"
    proceed.set()
    collecting.join(WAIT_S)
    uploading.join(WAIT_S)
    assert collected == [True]
    (version, deduplicated), = uploaded
    assert deduplicated is False  # the file was gone, so the upload put its own copy in place
    assert uploader.store.blob_refs(sha) == 1
    assert b"".join(collector.core.read_artifact("m", version.version)[1]) == data


def test_a_collection_waits_for_an_upload_of_the_same_bytes_and_then_keeps_the_blob(
        replicas: tuple[Replica, Replica]) -> None:
    collector, uploader = replicas
    data = onnx_blob("uploaded while collected")
    sha = sha_of(data)
    collector.core.upload_bytes(spec_for("m", data), data)
    collector.store.delete_version("m", 1, "tester")
    inside, proceed = threading.Event(), threading.Event()
    pending = uploader.artifacts.begin(sha, len(data))
    pending.write(data)
    pending.seal()

    def place_slowly() -> None:
        pending.place()
        inside.set()
        proceed.wait(WAIT_S)

    created: list[ModelVersion] = []
    uploading = threading.Thread(target=lambda: created.append(
        uploader.store.create_version(spec_for("m", data), place_slowly)))
    uploading.start()
    assert inside.wait(WAIT_S)
    collected: list[bool] = []
    done = threading.Event()

    def collect() -> None:
        try:
            collected.append(collector.core.collect_blob(sha))
        finally:
            done.set()

    collecting = threading.Thread(target=collect)
    collecting.start()
    assert not done.wait(0.5), "a collection ran while another replica was recording a version of the blob"
    proceed.set()
    uploading.join(WAIT_S)
    collecting.join(WAIT_S)
    pending.discard()
    assert collected == [False] and pending.placed is False  # the file was still there: nothing placed, none removed
    assert uploader.store.blob_refs(sha) == 1
    assert b"".join(collector.core.read_artifact("m", created[0].version)[1]) == data


class CommitFails(SqlRegistryStore):
    """A store whose version transaction fails after the blob is placed, as a lost connection would make it."""

    def create_version(self, spec: VersionSpec, place_blob: PlaceBlob) -> ModelVersion:
        def place_then_fail() -> None:
            place_blob()
            raise Aborted("the connection was lost at commit")

        return super().create_version(spec, place_then_fail)


def test_a_version_that_does_not_commit_leaves_no_blob_unless_another_version_uses_it(
        database_url: str, tmp_path: Path) -> None:
    replica = Replica(database_url, tmp_path / "artifacts", CommitFails)
    healthy = Replica(database_url, tmp_path / "artifacts")
    try:
        data = onnx_blob("never committed")
        with pytest.raises(Aborted, match="lost at commit"):
            replica.core.upload_bytes(spec_for("m", data), data)
        assert blobs(replica.artifacts) == [] and replica.store.blob_refs(sha_of(data)) is None
        healthy.core.upload_bytes(spec_for("m", data), data)
        with pytest.raises(Aborted, match="lost at commit"):
            replica.core.upload_bytes(spec_for("m", data), data)
        assert len(blobs(replica.artifacts)) == 1 and replica.store.blob_refs(sha_of(data)) == 1
        assert [v.version for v in healthy.core.list_versions("m").items] == [1]  # the failures left no number
    finally:
        replica.store.close()
        healthy.store.close()


def test_the_sweep_removes_blobs_a_deletion_left_unreferenced(core: RegistryCore, store: SqlRegistryStore) -> None:
    data, kept = onnx_blob("left behind"), onnx_blob("still used")
    core.upload_bytes(spec_for("m", data), data)
    core.upload_bytes(spec_for("m", kept), kept)
    store.delete_version("m", 1, "tester")  # as if the process died before collecting
    assert store.unreferenced_blobs(10) == [sha_of(data)]
    assert len(blobs(core.artifacts)) == 2
    assert core.collect_unreferenced_blobs() == 1
    assert [p.name for p in blobs(core.artifacts)] == [sha_of(kept)[2:]]
    assert store.unreferenced_blobs(10) == [] and core.collect_unreferenced_blobs() == 0


def test_the_migration_counts_the_references_of_existing_versions(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    data, other = onnx_blob("from before"), onnx_blob("also from before")
    with engine.begin() as conn:  # a database as the first schema left it, with versions
        schema.schema_version.create(conn)
        schema.MIGRATIONS[0][1](conn)
        conn.execute(schema.schema_version.insert().values(id=1, version=1))
        model_id = conn.execute(schema.models.insert().values(
            name="m", description="", labels="{}", last_version=3, created_by="t", create_us=0,
            update_us=0).returning(schema.models.c.id)).scalar_one()
        for number, content in enumerate((data, data, other), start=1):
            conn.execute(schema.versions.insert().values(model_id=model_id, version=number, create_us=0,
                                                         **rows.version_values(spec_for("m", content))))
    engine.dispose()
    store = SqlRegistryStore(database_url)
    try:
        assert (store.blob_refs(sha_of(data)), store.blob_refs(sha_of(other))) == (2, 1)
        assert store.get_version("m", 1).files == ()  # single-file versions list no files
        with store.engine.connect() as conn:
            assert schema.current_version(conn) == schema.LATEST == len(schema.MIGRATIONS)
    finally:
        store.close()


def test_a_sealed_upload_is_spared_by_the_sweeper_until_discarded_and_placing_a_removed_one_aborts(
        tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path)
    data = b"sealed" * 100
    pending = artifacts.begin(sha_of(data), len(data))
    pending.write(data)
    pending.seal()
    past = 0.0
    os.utime(pending.path, (past, past))
    assert artifacts.sweep_dead_uploads(older_than_s=1) == 0 and pending.path.exists()
    assert artifacts.clean_stale_uploads(older_than_s=1) == 1  # what another replica's sweeper does
    with pytest.raises(Aborted, match="temporary file was removed"):
        pending.place()
    assert not artifacts.exists(sha_of(data))
    pending.discard()
    assert artifacts.live_uploads() == set()
