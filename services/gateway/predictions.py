"""Sampled predictions kept for feedback: which ModelInfer answers are kept, reduced to what a label
is compared with, and where they wait (Redis, shared by every gateway replica, or this process).

On the serving path `PredictionLog.maybe_keep` costs one `random()` and, for a sampled request
with an `id`, one `put_nowait` on a bounded queue (full: dropped and counted). One background
task decodes the kept answers (off the event loop when large) and writes them with a TTL of
`feedback_window_s` (up to 64 in one Redis round trip); nothing of it can delay or fail the
response.

A prediction keeps only the first output, per row: the argmax class of a row with several
numbers, the class of an integer (or BOOL) row with one, the number of a floating-point row with
one (regression), the text of a BYTES row; at most `MAX_ROWS` rows. The first prediction kept
under a (model, request id) stays: a later request with the same id is not kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from collections import OrderedDict
from typing import Any, Protocol

from tritonclient.grpc import service_pb2 as pb

from services.common.datatypes import raw_to_array
from services.common.errors import Unavailable

log = logging.getLogger("aiaas.gateway.predictions")

# Rows of one prediction kept (a bigger batch is not kept), characters of a kept text, characters
# of a request id, and the largest answer decoded for it.
MAX_ROWS = 64
MAX_TEXT = 256
MAX_REQUEST_ID = 128
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# Answers larger than this are decoded in a worker thread rather than on the event loop.
_INLINE_BYTES = 64 * 1024
# Kept predictions written to the store in one round trip, at most.
_WRITE_BATCH = 64
_INTEGER_TYPES = frozenset(("BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"))
_FLOAT_TYPES = frozenset(("FP16", "FP32", "FP64"))

CLASS = "class"
VALUE = "value"
TEXT = "text"


@dataclasses.dataclass(frozen=True, slots=True)
class Prediction:
    """What a sampled request was answered, reduced: `kind` CLASS (ints), VALUE (floats) or TEXT."""

    model: str
    version: int
    alias: str
    key_id: str
    output: str
    kind: str
    rows: tuple[Any, ...]

    def encode(self) -> bytes:
        return json.dumps({"m": self.model, "v": self.version, "a": self.alias, "k": self.key_id,
                           "o": self.output, "t": self.kind, "p": list(self.rows)}).encode()

    @staticmethod
    def decode(data: bytes) -> Prediction:
        d = json.loads(data)
        return Prediction(model=str(d["m"]), version=int(d["v"]), alias=str(d["a"]), key_id=str(d["k"]),
                          output=str(d["o"]), kind=str(d["t"]), rows=tuple(d["p"]))


def reduce_response(raw: bytes, model: str, version: int, alias: str, key_id: str) -> Prediction | None:
    """The prediction of a serialized ModelInferResponse; None when its first output cannot be kept."""
    response = pb.ModelInferResponse.FromString(raw)
    if not response.outputs or len(response.raw_output_contents) < 1:
        return None
    spec = response.outputs[0]
    datatype = spec.datatype
    if datatype not in _INTEGER_TYPES and datatype not in _FLOAT_TYPES and datatype != "BYTES":
        return None
    array = raw_to_array(response.raw_output_contents[0], datatype, list(spec.shape))
    rows = array.reshape(array.shape[0], -1) if array.ndim >= 2 else array.reshape(-1, 1)
    if rows.shape[0] == 0 or rows.shape[0] > MAX_ROWS or rows.shape[1] == 0:
        return None
    kept: tuple[Any, ...]
    if datatype == "BYTES":
        if rows.shape[1] != 1:
            return None
        kind = TEXT
        kept = tuple(_text(v) for v in rows[:, 0])
    elif rows.shape[1] > 1:
        kind = CLASS
        kept = tuple(int(i) for i in rows.argmax(axis=1))
    elif datatype in _INTEGER_TYPES:
        kind = CLASS
        kept = tuple(int(v) for v in rows[:, 0])
    else:
        kind = VALUE
        kept = tuple(float(v) for v in rows[:, 0])
    return Prediction(model=model, version=version, alias=alias, key_id=key_id, output=spec.name, kind=kind,
                      rows=kept)


def _text(value: Any) -> str:
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    return text[:MAX_TEXT]


class PredictionStore(Protocol):
    async def put(self, model: str, request_id: str, data: bytes, ttl_s: float) -> bool:
        """Keep `data` unless the id already holds one; False when it did."""
        ...

    async def put_many(self, items: list[tuple[str, str, bytes]], ttl_s: float) -> list[bool]:
        """`put` of each (model, request id, data), in one round trip where the store has them."""
        ...

    async def get(self, model: str, request_id: str) -> bytes | None: ...

    async def claim(self, model: str, request_id: str, ttl_s: float) -> bool:
        """Mark the prediction labeled; False when it was already."""
        ...


class MemoryPredictionStore:
    """Predictions in this process (one gateway replica without Redis): at most `max_entries`,
    the oldest forgotten first (counted in `evicted`)."""

    def __init__(self, max_entries: int = 100_000, clock: Any = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self.evicted = 0
        # key -> (expires at, prediction, labeled)
        self._entries: OrderedDict[tuple[str, str], tuple[float, bytes, bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _live(self, key: tuple[str, str]) -> tuple[float, bytes, bool] | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] <= self.clock():
            del self._entries[key]
            return None
        return entry

    async def put(self, model: str, request_id: str, data: bytes, ttl_s: float) -> bool:
        key = (model, request_id)
        if self._live(key) is not None:
            return False
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1
        self._entries[key] = (self.clock() + ttl_s, data, False)
        return True

    async def put_many(self, items: list[tuple[str, str, bytes]], ttl_s: float) -> list[bool]:
        return [await self.put(model, request_id, data, ttl_s) for model, request_id, data in items]

    async def get(self, model: str, request_id: str) -> bytes | None:
        entry = self._live((model, request_id))
        return None if entry is None else entry[1]

    async def claim(self, model: str, request_id: str, ttl_s: float) -> bool:
        key = (model, request_id)
        entry = self._live(key)
        if entry is None or entry[2]:
            return False
        self._entries[key] = (entry[0], entry[1], True)
        return True


class RedisPredictionStore:
    """Predictions in Redis, shared by every gateway replica: `<prefix>:<model>:<id>` (SET NX PX) and
    its labeled marker `...:labeled`."""

    def __init__(self, redis: Any, prefix: str = "aiaas:feedback") -> None:
        self.redis = redis
        self.prefix = prefix

    def _key(self, model: str, request_id: str) -> str:
        return f"{self.prefix}:{model}:{request_id}"

    async def put(self, model: str, request_id: str, data: bytes, ttl_s: float) -> bool:
        return (await self.put_many([(model, request_id, data)], ttl_s))[0]

    async def put_many(self, items: list[tuple[str, str, bytes]], ttl_s: float) -> list[bool]:
        pipe = self.redis.pipeline(transaction=False)
        for model, request_id, data in items:
            pipe.set(self._key(model, request_id), data, nx=True, px=max(1, int(ttl_s * 1000)))
        return [bool(done) for done in await pipe.execute()]

    async def get(self, model: str, request_id: str) -> bytes | None:
        from redis.exceptions import RedisError

        try:
            value = await self.redis.get(self._key(model, request_id))
        except RedisError as exc:
            raise Unavailable(f"the prediction store (Redis) did not answer: {exc}; retry later") from None
        return bytes(value) if value is not None else None

    async def claim(self, model: str, request_id: str, ttl_s: float) -> bool:
        from redis.exceptions import RedisError

        try:
            return bool(await self.redis.set(self._key(model, request_id) + ":labeled", b"1", nx=True,
                                             px=max(1, int(ttl_s * 1000))))
        except RedisError as exc:
            raise Unavailable(f"the prediction store (Redis) did not answer: {exc}; retry later") from None


@dataclasses.dataclass(slots=True)
class _Answer:
    request_id: str
    raw: bytes
    model: str
    version: int
    alias: str
    key_id: str


class PredictionLog:
    """Keeps a `rate` share of answered requests that carry an id, for `window_s`; see the module doc."""

    def __init__(self, store: PredictionStore, rate: float, window_s: float, *, max_pending: int = 256) -> None:
        self.store = store
        self.rate = rate
        self.window_s = window_s
        self.max_pending = max_pending
        # What happened to sampled answers: kept, dropped (queue full), skipped (too big, no usable
        # output, id too long), duplicate (the id already held one), failed (store error).
        self.kept = self.dropped = self.skipped = self.duplicates = self.failed = 0
        self._queue: asyncio.Queue[_Answer] | None = None
        self._task: asyncio.Task[None] | None = None

    def maybe_keep(self, request_id: str, raw_response: bytes, model: str, version: int, alias: str,
                   key_id: str) -> None:
        """On the serving path: O(1), never blocks, never raises."""
        if not self.rate or not request_id or random.random() >= self.rate:
            return
        if len(request_id) > MAX_REQUEST_ID or len(raw_response) > MAX_RESPONSE_BYTES:
            self.skipped += 1
            return
        queue = self._queue
        if queue is None:
            queue = self._queue = asyncio.Queue(self.max_pending)
            self._task = asyncio.get_running_loop().create_task(self._run(queue), name="prediction-log")
        try:
            queue.put_nowait(_Answer(request_id, raw_response, model, version, alias, key_id))
        except asyncio.QueueFull:
            self.dropped += 1

    async def _run(self, queue: asyncio.Queue[_Answer]) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < _WRITE_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._keep(batch)
            except Exception:  # a store hiccup must not stop the writer
                self.failed += len(batch)
                log.debug("predictions for feedback not kept", exc_info=True)
            finally:
                for _ in batch:
                    queue.task_done()

    async def _keep(self, batch: list[_Answer]) -> None:
        items: list[tuple[str, str, bytes]] = []
        for a in batch:
            args = (a.raw, a.model, a.version, a.alias, a.key_id)
            try:
                prediction = (reduce_response(*args) if len(a.raw) <= _INLINE_BYTES
                              else await asyncio.to_thread(reduce_response, *args))
            except Exception:  # a malformed answer: not kept
                self.failed += 1
                log.debug("answer to %s not decoded for feedback", a.model, exc_info=True)
                continue
            if prediction is None:
                self.skipped += 1
            else:
                items.append((a.model, a.request_id, prediction.encode()))
        if not items:
            return
        stored = await self.store.put_many(items, self.window_s)
        self.kept += sum(stored)
        self.duplicates += len(stored) - sum(stored)

    async def drain(self) -> None:
        """Wait until every queued answer has been handled (tests, shutdown)."""
        if self._queue is not None:
            await self._queue.join()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
