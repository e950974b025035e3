"""Sliding windows of request figures: time buckets of counters and log-spaced histograms.

Each (series, time bucket) is a flat map of integer counters, so a window is the sum of its
buckets and several monitor replicas can add to the same buckets in Redis (HINCRBY) and agree
on what they read. Latencies go into log-spaced bins (ratio `GAMMA`), so a percentile read
back is within sqrt(GAMMA) - 1 (about 2%) of the exact value.

Field names in a bucket:
  n            requests              e        server-fault errors     s:<STATUS>  per status
  l:<bin>      latency bins          ls       latency sum (us)
  qn           requests that reported a queue/compute split
  q:<bin> qs   queue-time bins/sum   c:<bin> cs  compute-time bins/sum
  b:<size>     batch-size histogram
Generative requests (those that report token figures) add:
  gn           generative requests   t:<bin> ts  time-to-first-token bins/sum (us)
  in           requests with >= 2 tokens          i:<bin> is  their mean inter-token gap bins/sum
  pt ot        prompt / completion tokens         pe          preemptions
  kv           KV-cache use at finish, per mille, summed      f:<reason>  per finish reason
Online quality (labels sent back through the gateway's Feedback, counted when they arrive):
  fk fc        class labels / correct predictions
  fv           numeric labels      fa  their absolute error sum (micro-units)
  fs fsu       their squared error sum: whole units and the micro-unit remainder (exact, no overflow)
  fq fqs       scores / score sum (micro-units)
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from services.common.errors import Unavailable
from services.common.outages import OutageLog, url_address
from services.monitor.entities import (
    SERVER_FAULT_STATUSES,
    Distribution,
    GenerationMetrics,
    QualitySample,
    Request,
    SeriesKey,
    SeriesMetrics,
)

log = logging.getLogger("aiaas.monitor.windows")

GAMMA = 1.04
_LOG_GAMMA = math.log(GAMMA)

NS_REQUESTS = "req"
NS_DRIFT = "drift"

Increments = dict[tuple[str, int], Counter[str]]


def latency_bin(us: int) -> int:
    """Bin 0 holds values below 1 us; bin i >= 1 holds [GAMMA**(i-1), GAMMA**i)."""
    if us < 1:
        return 0
    return int(math.log(us) / _LOG_GAMMA) + 1


def bin_value_us(index: int) -> float:
    """The geometric middle of a bin: within sqrt(GAMMA) of anything in it."""
    if index <= 0:
        return 0.0
    return GAMMA ** (index - 0.5)


def bucket_of(time_ns: int, bucket_s: float) -> int:
    return int(time_ns // int(bucket_s * 1e9))


def add_request(increments: Increments, req: Request, bucket_s: float) -> None:
    key = SeriesKey(model=req.model, version=req.version, alias=req.alias, source=req.source).encode()
    fields = increments.setdefault((key, bucket_of(req.time_ns, bucket_s)), Counter())
    fields["n"] += 1
    fields["s:" + req.status] += 1
    if req.status in SERVER_FAULT_STATUSES:
        fields["e"] += 1
    latency = max(0, int(req.latency_us))
    fields[f"l:{latency_bin(latency)}"] += 1
    fields["ls"] += latency
    if req.queue_us > 0 or req.compute_us > 0:
        fields["qn"] += 1
        fields[f"q:{latency_bin(req.queue_us)}"] += 1
        fields["qs"] += max(0, int(req.queue_us))
        fields[f"c:{latency_bin(req.compute_us)}"] += 1
        fields["cs"] += max(0, int(req.compute_us))
    if req.batch_size > 0:
        fields[f"b:{req.batch_size}"] += 1
    gen = req.generation
    if gen is not None:
        fields["gn"] += 1
        fields["pt"] += max(0, gen.prompt_tokens)
        fields["ot"] += max(0, gen.completion_tokens)
        fields["pe"] += max(0, gen.preemptions)
        fields["kv"] += round(min(max(gen.kv_cache_usage, 0.0), 1.0) * 1000)
        if gen.finish_reason:
            fields["f:" + gen.finish_reason] += 1
        if gen.completion_tokens > 0:
            ttft = max(0, int(gen.ttft_us))
            fields[f"t:{latency_bin(ttft)}"] += 1
            fields["ts"] += ttft
            fields["tn"] += 1
        if gen.completion_tokens > 1:
            itl = max(0, int(gen.itl_mean_us))
            fields[f"i:{latency_bin(itl)}"] += 1
            fields["is"] += itl
            fields["in"] += 1


# Bounds on what one quality sample may add: rows per Feedback call, and each row's error.
MAX_QUALITY_ROWS = 4096
MAX_ABS_ERROR = 1e6
_MICRO = 1_000_000
# The fields that make a series worth listing without requests in the window.
QUALITY_COUNTS = ("fk", "fv", "fq")


def quality_sample_ok(sample: QualitySample) -> bool:
    """Whether a reported sample is plausible: counts within bounds, sums finite and in range."""
    counts = (sample.class_labels, sample.correct, sample.value_labels)
    if any(c < 0 or c > MAX_QUALITY_ROWS for c in counts) or sample.correct > sample.class_labels:
        return False
    sums = (sample.abs_error_sum, sample.squared_error_sum)
    if not all(math.isfinite(x) and x >= 0 for x in sums):
        return False
    if sample.score is not None and not (math.isfinite(sample.score) and 0.0 <= sample.score <= 1.0):
        return False
    return sample.class_labels + sample.value_labels > 0 or sample.score is not None


def add_quality(increments: Increments, sample: QualitySample, bucket_s: float) -> None:
    """Count a sample checked by `quality_sample_ok` into its series' bucket (integers only)."""
    key = SeriesKey(model=sample.model, version=sample.version, alias=sample.alias, source="gateway").encode()
    fields = increments.setdefault((key, bucket_of(sample.time_ns, bucket_s)), Counter())
    if sample.class_labels:
        fields["fk"] += sample.class_labels
        fields["fc"] += sample.correct
    if sample.value_labels:
        fields["fv"] += sample.value_labels
        fields["fa"] += round(min(sample.abs_error_sum, sample.value_labels * MAX_ABS_ERROR) * _MICRO)
        squared = min(sample.squared_error_sum, sample.value_labels * MAX_ABS_ERROR**2)
        whole = math.floor(squared)
        fields["fs"] += whole
        fields["fsu"] += round((squared - whole) * _MICRO)
    if sample.score is not None:
        fields["fq"] += 1
        fields["fqs"] += round(sample.score * _MICRO)


def _distribution(fields: Mapping[str, int], prefix: str, total_field: str, count: int) -> Distribution:
    if count <= 0:
        return Distribution()
    bins = sorted((int(name[len(prefix):]), n) for name, n in fields.items() if name.startswith(prefix) and n > 0)
    if not bins:
        return Distribution()

    def percentile(q: float) -> float:
        rank = max(1, math.ceil(q * count))
        seen = 0
        for index, n in bins:
            seen += n
            if seen >= rank:
                return bin_value_us(index) / 1000.0
        return bin_value_us(bins[-1][0]) / 1000.0

    return Distribution(
        p50_ms=percentile(0.50), p90_ms=percentile(0.90), p99_ms=percentile(0.99),
        mean_ms=fields.get(total_field, 0) / count / 1000.0,
        max_ms=(GAMMA ** bins[-1][0]) / 1000.0 if bins[-1][0] > 0 else 0.0,
    )


def summarize(key: SeriesKey, fields: Mapping[str, int], window_s: float, span_s: float) -> SeriesMetrics:
    """Turn a window's summed counters into figures. `span_s` is the part of the window with data."""
    count = int(fields.get("n", 0))
    errors = int(fields.get("e", 0))
    batch_sizes = {int(name[2:]): int(n) for name, n in fields.items() if name.startswith("b:") and n > 0}
    batched = sum(batch_sizes.values())
    queued = int(fields.get("qn", 0))
    generated = int(fields.get("gn", 0))
    generation = None
    if generated:
        generation = GenerationMetrics(
            count=generated,
            ttft=_distribution(fields, "t:", "ts", int(fields.get("tn", 0))),
            inter_token=_distribution(fields, "i:", "is", int(fields.get("in", 0))),
            prompt_tokens=int(fields.get("pt", 0)),
            completion_tokens=int(fields.get("ot", 0)),
            output_tokens_per_s=int(fields.get("ot", 0)) / max(span_s, 1e-9),
            mean_kv_cache_usage=int(fields.get("kv", 0)) / 1000.0 / generated,
            preemptions=int(fields.get("pe", 0)),
            finish_reasons={name[2:]: int(n) for name, n in fields.items() if name.startswith("f:") and n > 0},
        )
    class_labels, value_labels, scores = (int(fields.get(f, 0)) for f in QUALITY_COUNTS)
    squared = fields.get("fs", 0) + fields.get("fsu", 0) / _MICRO
    return SeriesMetrics(
        generation=generation,
        key=key,
        window_s=window_s,
        count=count,
        rate_per_s=count / max(span_s, 1e-9) if count else 0.0,
        errors=errors,
        error_rate=errors / count if count else 0.0,
        status_counts={name[2:]: int(n) for name, n in fields.items() if name.startswith("s:") and n > 0},
        latency=_distribution(fields, "l:", "ls", count),
        queue=_distribution(fields, "q:", "qs", queued),
        compute=_distribution(fields, "c:", "cs", queued),
        batch_sizes=dict(sorted(batch_sizes.items())),
        mean_batch_size=sum(size * n for size, n in batch_sizes.items()) / batched if batched else 0.0,
        class_labels=class_labels, correct=int(fields.get("fc", 0)),
        accuracy=fields.get("fc", 0) / class_labels if class_labels else 0.0,
        value_labels=value_labels,
        mean_abs_error=fields.get("fa", 0) / _MICRO / value_labels if value_labels else 0.0,
        rmse=math.sqrt(squared / value_labels) if value_labels else 0.0,
        scores=scores, mean_score=fields.get("fqs", 0) / _MICRO / scores if scores else 0.0,
    )


class WindowStore(Protocol):
    """Where buckets live: in this process, or in Redis shared by every replica."""

    bucket_s: float

    async def add(self, ns: str, increments: Increments) -> None: ...

    async def series(self, ns: str, since_bucket: int) -> list[str]: ...

    async def read(self, ns: str, series: Iterable[str], first_bucket: int, last_bucket: int
                   ) -> dict[str, tuple[Counter[str], int]]:
        """Sum each series' buckets in [first, last]; also return its first non-empty bucket."""
        ...

    async def put_meta(self, name: str, fields: Mapping[str, int], *, only_if_absent: bool = False) -> None: ...

    async def get_meta(self, names: Iterable[str]) -> dict[str, dict[str, int]]: ...

    async def delete_meta_field(self, name: str, field: str) -> None: ...

    async def close(self) -> None: ...


class MemoryWindowStore:
    """Buckets in a dict; for one replica without Redis, and for tests."""

    def __init__(self, bucket_s: float = 1.0, retention_s: float = 3600.0) -> None:
        self.bucket_s = bucket_s
        self.retention_buckets = max(1, math.ceil(retention_s / bucket_s))
        self._data: dict[str, dict[str, dict[int, Counter[str]]]] = {}
        self._last: dict[str, dict[str, int]] = {}
        self._meta: dict[str, dict[str, int]] = {}
        self._adds = 0

    async def add(self, ns: str, increments: Increments) -> None:
        data = self._data.setdefault(ns, {})
        last = self._last.setdefault(ns, {})
        for (series, bucket), fields in increments.items():
            data.setdefault(series, {}).setdefault(bucket, Counter()).update(fields)
            if bucket > last.get(series, -1):
                last[series] = bucket
        self._adds += 1
        if self._adds % 256 == 0:
            self._prune()

    def _prune(self) -> None:
        oldest = bucket_of(time.time_ns(), self.bucket_s) - self.retention_buckets
        for ns, data in self._data.items():
            for series in list(data):
                buckets = data[series]
                for bucket in [b for b in buckets if b < oldest]:
                    del buckets[bucket]
                if not buckets:
                    del data[series]
                    self._last[ns].pop(series, None)

    async def series(self, ns: str, since_bucket: int) -> list[str]:
        return sorted(s for s, last in self._last.get(ns, {}).items() if last >= since_bucket)

    async def read(self, ns: str, series: Iterable[str], first_bucket: int, last_bucket: int
                   ) -> dict[str, tuple[Counter[str], int]]:
        data = self._data.get(ns, {})
        out: dict[str, tuple[Counter[str], int]] = {}
        for name in series:
            total: Counter[str] = Counter()
            first = -1
            for bucket, fields in data.get(name, {}).items():
                if first_bucket <= bucket <= last_bucket:
                    total.update(fields)
                    first = bucket if first < 0 else min(first, bucket)
            out[name] = (total, first)
        return out

    async def put_meta(self, name: str, fields: Mapping[str, int], *, only_if_absent: bool = False) -> None:
        entry = self._meta.setdefault(name, {})
        for field, value in fields.items():
            if not only_if_absent or field not in entry:
                entry[field] = int(value)

    async def get_meta(self, names: Iterable[str]) -> dict[str, dict[str, int]]:
        return {name: dict(self._meta.get(name, {})) for name in names}

    async def delete_meta_field(self, name: str, field: str) -> None:
        self._meta.get(name, {}).pop(field, None)

    async def close(self) -> None:
        return None


def _redis_unavailable(fn: Any) -> Any:
    """Redis failures reach callers as UNAVAILABLE (retry later), not as an internal error, and the
    log as the store's outage (one line, then at most one a minute, and one when Redis answers)."""

    @functools.wraps(fn)
    async def wrapper(self: RedisWindowStore, *args: Any, **kwargs: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            result = await fn(self, *args, **kwargs)
        except RedisError as exc:
            self.outage.failed(exc, consequence="metrics are neither stored nor judged until it answers")
            raise Unavailable(f"window store (Redis) unavailable: {exc}") from None
        self.outage.recovered()
        return result

    return wrapper


class RedisWindowStore:
    """Buckets as Redis hashes with a TTL: one hash per (series, bucket), HINCRBY, merge on read."""

    def __init__(self, url: str, bucket_s: float = 1.0, retention_s: float = 3600.0,
                 prefix: str = "aiaas:monitor") -> None:
        import redis.asyncio as aioredis

        self.bucket_s = bucket_s
        self.ttl_s = max(1, math.ceil(retention_s + 2 * bucket_s))
        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.outage = OutageLog(log, "window store (Redis)", url_address(url, 6379))

    def _hash(self, ns: str, series: str, bucket: int) -> str:
        return f"{self.prefix}:{ns}:b:{series}:{bucket}"

    def _index(self, ns: str) -> str:
        return f"{self.prefix}:{ns}:index"

    @_redis_unavailable
    async def add(self, ns: str, increments: Increments) -> None:
        if not increments:
            return
        pipe = self._redis.pipeline(transaction=False)
        latest: dict[str, int] = {}
        for (series, bucket), fields in increments.items():
            name = self._hash(ns, series, bucket)
            for field, value in fields.items():
                if value:
                    pipe.hincrby(name, field, int(value))
            pipe.expire(name, self.ttl_s)
            latest[series] = max(bucket, latest.get(series, bucket))
        # GT keeps the newest bucket when replicas race.
        pipe.zadd(self._index(ns), {s: b for s, b in latest.items()}, gt=True)
        await pipe.execute()

    @_redis_unavailable
    async def series(self, ns: str, since_bucket: int) -> list[str]:
        raw = await self._redis.zrangebyscore(self._index(ns), since_bucket, "+inf")
        oldest = since_bucket - math.ceil(self.ttl_s / self.bucket_s)
        await self._redis.zremrangebyscore(self._index(ns), "-inf", oldest)
        return sorted(item.decode() if isinstance(item, bytes) else str(item) for item in raw)

    @_redis_unavailable
    async def read(self, ns: str, series: Iterable[str], first_bucket: int, last_bucket: int
                   ) -> dict[str, tuple[Counter[str], int]]:
        names = list(series)
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            for bucket in range(first_bucket, last_bucket + 1):
                pipe.hgetall(self._hash(ns, name, bucket))
        replies = await pipe.execute()
        out: dict[str, tuple[Counter[str], int]] = {}
        width = last_bucket - first_bucket + 1
        for i, name in enumerate(names):
            total: Counter[str] = Counter()
            first = -1
            for j in range(width):
                reply = replies[i * width + j]
                if reply:
                    if first < 0:
                        first = first_bucket + j
                    for field, value in reply.items():
                        total[field.decode()] += int(value)
            out[name] = (total, first)
        return out

    @_redis_unavailable
    async def put_meta(self, name: str, fields: Mapping[str, int], *, only_if_absent: bool = False) -> None:
        key = f"{self.prefix}:meta:{name}"
        pipe = self._redis.pipeline(transaction=False)
        for field, value in fields.items():
            if only_if_absent:
                pipe.hsetnx(key, field, int(value))
            else:
                pipe.hset(key, field, int(value))
        pipe.expire(key, self.ttl_s * 24)
        await pipe.execute()

    @_redis_unavailable
    async def get_meta(self, names: Iterable[str]) -> dict[str, dict[str, int]]:
        names = list(names)
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(f"{self.prefix}:meta:{name}")
        replies = await pipe.execute()
        return {name: {k.decode(): int(v) for k, v in reply.items()} for name, reply in zip(names, replies, strict=True)}

    @_redis_unavailable
    async def delete_meta_field(self, name: str, field: str) -> None:
        await self._redis.hdel(f"{self.prefix}:meta:{name}", field)

    async def close(self) -> None:
        await self._redis.aclose()
