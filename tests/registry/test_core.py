"""RegistryCore over the SQL store, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from services.common.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.registry import schema
from services.registry.core import RegistryCore
from services.registry.entities import ChangeType, Lineage
from services.registry.sql_store import SqlRegistryStore
from tests.registry.conftest import blobs, spec_for
from tests.support.blobs import onnx_blob


def test_models_create_get_update_list_delete(core: RegistryCore) -> None:
    made = core.create_model("resnet", "image classifier", {"team": "vision"}, actor="alice")
    assert (made.name, made.description, made.labels, made.created_by) == ("resnet", "image classifier",
                                                                           {"team": "vision"}, "alice")
    with pytest.raises(AlreadyExists, match="'resnet' already exists"):
        core.create_model("resnet")
    updated = core.update_model("resnet", labels={"team": "ml"}, actor="bob")
    assert updated.labels == {"team": "ml"} and updated.description == "image classifier"
    with pytest.raises(InvalidArgument, match="nothing to update"):
        core.update_model("resnet")
    core.delete_model("resnet")
    with pytest.raises(NotFound, match="model 'resnet' not found"):
        core.get_model("resnet")


def test_list_models_pages_with_tokens(core: RegistryCore) -> None:
    for i in range(7):
        core.create_model(f"m{i}")
    seen, token = [], ""
    while True:
        page = core.list_models(page_size=3, page_token=token)
        seen += [m.name for m in page.items]
        token = page.next_token
        if not token:
            break
    assert seen == [f"m{i}" for i in range(7)]
    with pytest.raises(InvalidArgument, match="page_token is malformed"):
        core.list_models(page_token="garbage!")
    with pytest.raises(InvalidArgument, match="page_size must be between 1 and 1000"):
        core.list_models(page_size=5000)


def test_versions_are_numbered_per_model_and_keep_what_was_declared(core: RegistryCore) -> None:
    v1, dedup1 = core.upload_bytes(spec_for("a", onnx_blob("one"), metadata={"acc": 0.9}), onnx_blob("one"))
    v2, dedup2 = core.upload_bytes(spec_for("a", onnx_blob("two"), lineage=Lineage(1, "quantize:int8-dynamic")),
                                   onnx_blob("two"))
    other, _ = core.upload_bytes(spec_for("b", onnx_blob("one")), onnx_blob("one"))
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert (dedup1, dedup2) == (False, False)
    got = core.get_version("a", 2)
    assert got.lineage == Lineage(1, "quantize:int8-dynamic", "")
    assert got.signature.inputs[0].shape == (-1, 4) and got.serving_config.max_batch_size == 8
    assert core.get_version("a", 1).metadata == {"acc": 0.9}
    assert core.get_model("a").latest_version == 2
    page = core.list_versions("a", page_size=1)
    assert [v.version for v in page.items] == [1] and page.next_token
    assert [v.version for v in core.list_versions("a", page_token=page.next_token).items] == [2]


def test_concurrent_uploads_get_distinct_numbers(core: RegistryCore) -> None:
    core.create_model("busy")
    numbers: list[int] = []
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        data = onnx_blob(f"artifact {i}")
        try:
            numbers.append(core.upload_bytes(spec_for("busy", data), data)[0].version)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(numbers) == list(range(1, 9))


def test_identical_content_is_stored_once_and_deleted_with_its_last_version(core: RegistryCore) -> None:
    data = onnx_blob("same bytes")
    core.upload_bytes(spec_for("a", data), data)
    _, deduplicated = core.upload_bytes(spec_for("b", data), data)
    assert deduplicated
    assert len(blobs(core.artifacts)) == 1
    core.delete_version("a", 1)
    assert len(blobs(core.artifacts)) == 1
    core.delete_model("b")
    assert blobs(core.artifacts) == []


def test_failed_upload_leaves_no_version_and_no_blob(core: RegistryCore) -> None:
    data = onnx_blob("real content")
    with pytest.raises(InvalidArgument, match="sha256 mismatch"):
        core.upload_bytes(spec_for("m", onnx_blob("other content"), artifact_size=len(data)), data)
    upload = core.begin_upload(spec_for("m", data))
    upload.write(data[:4])
    upload.abort()  # a stream that broke
    with pytest.raises(InvalidArgument, match="ended after 3 bytes"):
        core.upload_bytes(spec_for("m", data), data[:3])
    with pytest.raises(InvalidArgument, match="exceeds this registry's limit"):
        core.begin_upload(spec_for("m", data, artifact_size=10 * 1024 * 1024))
    with pytest.raises(NotFound, match="create it first"):
        core.begin_upload(spec_for("m", data, create_model=False))
    with pytest.raises(NotFound, match="lineage: parent model .m. not found"):
        core.begin_upload(spec_for("m", data, lineage=Lineage(4, "x")))
    assert blobs(core.artifacts) == []
    with pytest.raises(NotFound):
        core.get_model("m")


def test_alias_compare_and_set_and_rollback(core: RegistryCore) -> None:
    for data in (onnx_blob("v1"), onnx_blob("v2"), onnx_blob("v3")):
        core.upload_bytes(spec_for("m", data), data)
    core.set_alias("m", "production", 1, expected_version=0, actor="alice", reason="launch")
    with pytest.raises(Aborted, match="points at version 1, not the expected version 2"):
        core.set_alias("m", "production", 3, expected_version=2)
    with pytest.raises(Aborted, match="not the expected no version"):
        core.set_alias("m", "production", 3, expected_version=0)
    core.set_alias("m", "production", 2, expected_version=1, actor="bob", reason="better")
    core.set_alias("m", "production", 3)
    assert core.get_version("m", alias="production").version == 3
    move = core.rollback_alias("m", "production", actor="carol", reason="latency")
    assert (move.from_version, move.to_version, move.actor) == (3, 2, "carol")
    history = core.alias_history("m", "production")
    assert [(h.from_version, h.to_version) for h in history] == [(3, 2), (2, 3), (1, 2), (0, 1)]
    assert history[-1].actor == "alice" and history[-1].reason == "launch"
    with pytest.raises(FailedPrecondition, match="aliased by production"):
        core.delete_version("m", 2)
    with pytest.raises(FailedPrecondition, match=r"still has aliases \(production->2\)"):
        core.delete_model("m")
    with pytest.raises(NotFound, match="has no version 9"):
        core.set_alias("m", "canary", 9)
    core.set_alias("m", "canary", 1)
    with pytest.raises(FailedPrecondition, match="no earlier version"):
        core.rollback_alias("m", "canary")
    core.delete_alias("m", "canary")
    assert core.rollback_alias("m", "canary").to_version == 1  # rolling back a deletion restores it
    assert core.get_model("m").aliases == {"canary": 1, "production": 2}


def test_racing_alias_moves_with_compare_and_set_one_wins(core: RegistryCore) -> None:
    for data in (onnx_blob("v1"), onnx_blob("v2"), onnx_blob("v3")):
        core.upload_bytes(spec_for("m", data), data)
    core.set_alias("m", "production", 1)
    barrier = threading.Barrier(2)
    outcomes: dict[int, str] = {}

    def move(to: int) -> None:
        barrier.wait()
        try:
            core.set_alias("m", "production", to, expected_version=1)
            outcomes[to] = "won"
        except Aborted:
            outcomes[to] = "aborted"

    threads = [threading.Thread(target=move, args=(v,)) for v in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes.values()) == ["aborted", "won"]
    winner = next(v for v, o in outcomes.items() if o == "won")
    assert core.get_version("m", alias="production").version == winner
    assert len(core.alias_history("m", "production")) == 2


def test_records_compare_and_set(core: RegistryCore) -> None:
    first = core.put_record("route", "default/resnet", b'{"w": 1}', expected_revision=0)
    with pytest.raises(Aborted, match="is at revision"):
        core.put_record("route", "default/resnet", b"{}", expected_revision=0)
    second = core.put_record("route", "default/resnet", b'{"w": 2}', expected_revision=first.revision)
    assert second.revision > first.revision
    assert core.get_record("route", "default/resnet").data == b'{"w": 2}'
    assert [r.name for r in core.list_records("route").items] == ["default/resnet"]
    with pytest.raises(InvalidArgument, match="record data is"):
        core.put_record("route", "big", b"x" * (1024 * 1024 + 1))
    core.delete_record("route", "default/resnet")
    with pytest.raises(NotFound, match="record route/default/resnet not found"):
        core.get_record("route", "default/resnet")


def test_audit_log_by_model_and_time(core: RegistryCore) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    core.upload_bytes(spec_for("a", onnx_blob("1")), onnx_blob("1"))
    core.set_alias("a", "production", 1, actor="alice", reason="go")
    core.create_model("b")
    core.append_audit("monitor", "canary.rollback", "a", 1, {"slo": "p99"})
    actions = [e.action for e in core.list_audit(model="a").items]
    assert actions == ["canary.rollback", "alias.set", "version.create", "model.create"]
    assert all(e.action != "model.create" or e.model == "a" for e in core.list_audit(model="a").items)
    assert core.list_audit(since=datetime.now(UTC) + timedelta(seconds=5)).items == []
    assert len(core.list_audit(since=start).items) == 5
    page = core.list_audit(page_size=2)
    rest = core.list_audit(page_size=10, page_token=page.next_token)
    assert [e.id for e in page.items + rest.items] == sorted((e.id for e in page.items + rest.items), reverse=True)


def test_feed_is_gapless_ordered_and_pruned(core: RegistryCore, store: SqlRegistryStore) -> None:
    core.upload_bytes(spec_for("m", onnx_blob("1")), onnx_blob("1"))
    core.set_alias("m", "production", 1)
    events = store.events_after(0, 100)
    assert [e.type for e in events] == [ChangeType.MODEL_CREATED, ChangeType.VERSION_CREATED, ChangeType.ALIAS_MOVED]
    assert [e.revision for e in events] == [1, 2, 3]
    for i in range(60):  # retention is 50 in these tests
        core.put_record("kv", f"k{i}", b"")
    assert store.head_revision() == 63
    assert store.oldest_revision() == 14
    head, snapshot = store.snapshot()
    assert head == 63 and all(e.snapshot and e.revision == 63 for e in snapshot)
    assert sum(e.type is ChangeType.RECORD_PUT for e in snapshot) == 60


def test_migrations_are_versioned_and_idempotent(database_url: str) -> None:
    first = SqlRegistryStore(database_url)
    first.close()
    again = SqlRegistryStore(database_url)
    with again.engine.connect() as conn:
        assert schema.current_version(conn) == schema.LATEST
    assert schema.migrate(again.engine) == schema.LATEST
    again.close()
