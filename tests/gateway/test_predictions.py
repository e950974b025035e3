"""Predictions kept for feedback and the feedback desk on their own, over a real Redis: what a
prediction keeps of an answer, the window, the bounded queue and store, joins and refusals."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as aioredis
from tritonclient.grpc import service_pb2 as pb

from services.common.datatypes import array_to_raw
from services.common.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from services.gateway.entities import Caller, Role
from services.gateway.feedback import FeedbackDesk, Label, join
from services.gateway.predictions import (
    CLASS,
    MAX_ROWS,
    TEXT,
    VALUE,
    MemoryPredictionStore,
    Prediction,
    PredictionLog,
    RedisPredictionStore,
    reduce_response,
)
from tests.support.servers import RedisServer

ALICE = Caller(key_id="alice", models=("m",), roles=frozenset({Role.INFER}))
BOB = Caller(key_id="bob", models=("m",), roles=frozenset({Role.INFER}))
READER = Caller(key_id="reader", models=("m",), roles=frozenset({Role.READ}))


def answer(array: np.ndarray, datatype: str, name: str = "out") -> bytes:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
    response.raw_output_contents.append(array_to_raw(array, datatype))
    return response.SerializeToString()


def test_a_prediction_keeps_argmax_class_integer_value_or_text_per_row() -> None:
    scores = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    cases = [
        (answer(scores, "FP32"), CLASS, tuple(int(i) for i in scores.argmax(axis=1))),
        (answer(np.array([[3], [1]], np.int64), "INT64"), CLASS, (3, 1)),
        (answer(np.array([0.5, -2.25], np.float64), "FP64"), VALUE, (0.5, -2.25)),
        (answer(np.array([[b"cat"], [b"dog"]], dtype=object), "BYTES"), TEXT, ("cat", "dog")),
    ]
    for raw, kind, rows in cases:
        kept = reduce_response(raw, "m", 1, "production", "alice")
        assert kept is not None and (kept.kind, kept.rows, kept.output) == (kind, rows, "out")
        assert Prediction.decode(kept.encode()) == kept
    # More rows than a prediction keeps, or nothing to keep: not kept.
    assert reduce_response(answer(np.zeros((MAX_ROWS + 1, 3), np.float32), "FP32"), "m", 1, "", "a") is None
    assert reduce_response(pb.ModelInferResponse().SerializeToString(), "m", 1, "", "a") is None


def test_labels_join_the_prediction_they_fit_only() -> None:
    classes = Prediction("m", 1, "production", "alice", "out", CLASS, (2, 0, 1))
    result = join(classes, [2, 1, 1])
    assert (result.class_labels, result.correct, result.value_labels) == (3, 2, 0)
    values = Prediction("m", 1, "production", "alice", "out", VALUE, (1.5, -1.0))
    result = join(values, [1.0, 2])  # an integer label of a numeric output is a number
    assert result.value_labels == 2 and result.abs_error_sum == 3.5 and result.squared_error_sum == 9.25
    cases: list[tuple[Prediction, list[Label], str]] = [
        (classes, [2, 0], "has 3 row"),
        (classes, [2.0, 0.0, 1.0], "class_id labels"),
        (values, ["a", "b"], "numeric labels"),
        (Prediction("m", 1, "", "a", "out", TEXT, ("x",)), [1], "text labels"),
    ]
    for prediction, labels, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            join(prediction, labels)


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisPredictionStore]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield RedisPredictionStore(client, prefix=f"test-feedback-{uuid.uuid4().hex}")
    await client.aclose()


async def test_feedback_joins_once_for_the_key_that_asked_within_the_window(store: RedisPredictionStore) -> None:
    log = PredictionLog(store, rate=1.0, window_s=0.5)
    raw = answer(np.array([[0.1, 0.7, 0.2]], np.float32), "FP32")
    log.maybe_keep("r1", raw, "m", 3, "canary", "alice")
    log.maybe_keep("r1", answer(np.array([[0.9, 0.0, 0.1]], np.float32), "FP32"), "m", 3, "canary", "alice")
    log.maybe_keep("", raw, "m", 3, "canary", "alice")  # no id: nothing to label later
    await log.drain()
    assert (log.kept, log.duplicates) == (1, 1)  # the first prediction under an id stays
    desk = FeedbackDesk(store, None, window_s=0.5)
    with pytest.raises(PermissionDenied, match="another API key"):
        await desk.give(BOB, "m", "r1", [1], None)
    with pytest.raises(PermissionDenied, match="lacks the 'infer' role"):
        await desk.give(READER, "m", "r1", [1], None)
    with pytest.raises(InvalidArgument, match="score"):
        await desk.give(ALICE, "m", "r1", [], 1.5)
    with pytest.raises(InvalidArgument, match="labels"):
        await desk.give(ALICE, "m", "r1", [], None)
    result = await desk.give(ALICE, "m", "r1", [1], 0.5)
    assert (result.prediction.version, result.prediction.alias, result.correct, result.class_labels) == \
        (3, "canary", 1, 1)
    with pytest.raises(AlreadyExists, match="labeled already"):
        await desk.give(ALICE, "m", "r1", [1], None)
    log.maybe_keep("r2", raw, "m", 3, "canary", "alice")
    await log.drain()
    await asyncio.sleep(0.7)  # past the window: Redis forgot it
    with pytest.raises(NotFound, match=r"older than the feedback window \(0.5s\)"):
        await desk.give(ALICE, "m", "r2", [1], None)
    await log.close()


async def test_the_queue_and_the_memory_store_are_bounded() -> None:
    store = MemoryPredictionStore(max_entries=3)
    log = PredictionLog(store, rate=1.0, window_s=60, max_pending=2)
    raw = answer(np.array([[1.0, 0.0]], np.float32), "FP32")
    for i in range(5):  # no loop turn in between: the writer has not taken any yet
        log.maybe_keep(f"q{i}", raw, "m", 1, "", "alice")
    await log.drain()
    assert (log.kept, log.dropped) == (2, 3)
    for i in range(5, 9):
        log.maybe_keep(f"q{i}", raw, "m", 1, "", "alice")
        await log.drain()
    assert len(store) == 3 and store.evicted == 3
    assert await store.get("m", "q8") is not None and await store.get("m", "q0") is None
    log.maybe_keep("x" * 200, raw, "m", 1, "", "alice")  # an id longer than kept ids
    assert log.skipped == 1
    # An answer that does not decode is counted and spares the others written with it.
    log.maybe_keep("bad", b"\xff\xff\xff", "m", 1, "", "alice")
    log.maybe_keep("q9", raw, "m", 1, "", "alice")
    await log.drain()
    assert log.failed == 1 and await store.get("m", "q9") is not None and await store.get("m", "bad") is None
    await log.close()
