"""Quotas: token buckets per API key and per model, shared by every gateway replica through Redis.

Two kinds: requests (each request takes one token) and, for generative models, tokens per minute
(a request is admitted while its buckets hold a token, then charged its prompt + completion
tokens when it ends; see TOKEN_USAGE_LUA).

One Lua script takes a token from every bucket that applies, atomically, or from none of them,
and answers how long to wait when any is empty. Without Redis the same buckets live in-process.
When a Redis call times out or fails, and for the retry-after window after it, the configured
failure mode applies at once (no waiting on Redis): "local" (the default) decides in-process with
a token bucket per key and model at 1/replicas of each limit, so a key is still limited; "open"
admits the request; "closed" refuses it with UNAVAILABLE. Every such decision is counted
(`gateway.quota.store_failures`, and `gateway.quota.local_decisions` by reason for "local"), and
logged as an outage (`services.common.outages.OutageLog`): one line when Redis stops answering,
at most one a minute while it stays away, one when it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import metrics

from services.common.errors import ResourceExhausted, Unavailable
from services.common.outages import OutageLog, describe_error
from services.gateway.entities import Caller, QuotaSpec

log = logging.getLogger("aiaas.gateway.quotas")

Bucket = tuple[str, QuotaSpec]
UNLIMITED = QuotaSpec()
FAILURE_MODES = ("local", "open", "closed")

# KEYS: bucket keys; ARGV: rate_1, capacity_1, rate_2, capacity_2, ...
# Returns 0 when a token was taken from every bucket, else the wait in ms before one would be.
TOKEN_BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local wait = 0
local levels = {}
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i - 1])
  local cap = tonumber(ARGV[2 * i])
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(v[1])
  local ts = tonumber(v[2])
  if tokens == nil or ts == nil then
    tokens = cap
  else
    tokens = math.min(cap, tokens + math.max(0, now - ts) * rate / 1000)
  end
  levels[i] = tokens
  if tokens < 1 then
    local w = math.ceil((1 - tokens) * 1000 / rate)
    if w > wait then wait = w end
  end
end
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i - 1])
  local cap = tonumber(ARGV[2 * i])
  local tokens = levels[i]
  if wait == 0 then tokens = tokens - 1 end
  redis.call('HSET', KEYS[i], 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(cap * 1000 / rate) + 1000)
end
return wait
"""


# Token quotas: one bucket of `tokens_per_minute` tokens per key and per model, refilled over a
# minute. A request is admitted while every bucket holds at least one token (nothing is taken then)
# and charged its prompt + completion tokens when it ends; a bucket may go below zero (the request
# was longer than what was left), and the next request waits until it is back above one.
# KEYS: bucket keys; ARGV: amount (0: only check), then rate_per_s_1, capacity_1, ...
# Returns the wait in ms before every bucket holds one token again (0: admitted, or charged).
TOKEN_USAGE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local amount = tonumber(ARGV[1])
local wait = 0
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i])
  local cap = tonumber(ARGV[2 * i + 1])
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(v[1])
  local ts = tonumber(v[2])
  if tokens == nil or ts == nil then
    tokens = cap
  else
    tokens = math.min(cap, tokens + math.max(0, now - ts) * rate / 1000)
  end
  if amount > 0 then
    tokens = tokens - amount
    redis.call('HSET', KEYS[i], 'tokens', tostring(tokens), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[i], math.ceil((cap - tokens) * 1000 / rate) + 1000)
  elseif tokens < 1 then
    local w = math.ceil((1 - tokens) * 1000 / rate)
    if w > wait then wait = w end
  end
end
return wait
"""


def token_buckets_for(caller: Caller, model: str, model_quota: QuotaSpec | None,
                      default_key_tpm: float, default_model_tpm: float) -> list[Bucket]:
    """The token buckets of a generative request: its key's and its model's tokens per minute, when limited."""
    found: list[Bucket] = []
    key_tpm = caller.quota.tokens_per_minute if caller.quota is not None and not caller.quota.tokens_unlimited \
        else default_key_tpm
    if key_tpm > 0:
        found.append((f"aiaas:tokens:key:{caller.key_id}", QuotaSpec(key_tpm / 60.0, math.ceil(key_tpm))))
    model_tpm = model_quota.tokens_per_minute if model_quota is not None and not model_quota.tokens_unlimited \
        else default_model_tpm
    if model_tpm > 0:
        found.append((f"aiaas:tokens:model:{model}", QuotaSpec(model_tpm / 60.0, math.ceil(model_tpm))))
    return found


def buckets_for(caller: Caller, model: str, model_quota: QuotaSpec | None,
                default_key: QuotaSpec, default_model: QuotaSpec) -> list[Bucket]:
    """The buckets a request must take a token from: its key's and its model's, when limited."""
    found: list[Bucket] = []
    key_quota = caller.quota if caller.quota is not None and not caller.quota.unlimited else default_key
    if not key_quota.unlimited:
        found.append((f"aiaas:quota:key:{caller.key_id}", key_quota))
    quota = model_quota if model_quota is not None and not model_quota.unlimited else default_model
    if not quota.unlimited:
        found.append((f"aiaas:quota:model:{model}", quota))
    return found


class LocalBuckets:
    """The same algorithm in-process (one gateway replica, or no Redis configured)."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, buckets: Sequence[Bucket], now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        wait = 0.0
        levels = []
        for name, spec in buckets:
            tokens, ts = self._state.get(name, (spec.capacity, now))
            tokens = min(spec.capacity, tokens + max(0.0, now - ts) * spec.rps)
            levels.append(tokens)
            if tokens < 1:
                wait = max(wait, (1 - tokens) / spec.rps)
        for (name, _), tokens in zip(buckets, levels, strict=True):
            self._state[name] = (tokens - 1 if wait == 0 else tokens, now)
        return math.ceil(wait * 1000 - 1e-6)


class LocalTokenBuckets:
    """Token quotas in-process: `TOKEN_USAGE_LUA`'s algorithm (check, then charge the usage)."""

    def __init__(self, max_buckets: int = 100_000) -> None:
        self.max_buckets = max_buckets
        self._state: dict[str, tuple[float, float]] = {}

    def _level(self, name: str, spec: QuotaSpec, now: float) -> float:
        tokens, ts = self._state.get(name, (spec.capacity, now))
        return min(spec.capacity, tokens + max(0.0, now - ts) * spec.rps)

    def wait_ms(self, buckets: Sequence[Bucket], now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        wait = 0.0
        for name, spec in buckets:
            tokens = self._level(name, spec, now)
            if tokens < 1:
                wait = max(wait, (1 - tokens) / spec.rps)
        return math.ceil(wait * 1000 - 1e-6)

    def charge(self, buckets: Sequence[Bucket], amount: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if len(self._state) >= self.max_buckets:
            self._state.clear()  # full buckets are what a cleared entry starts from: forgiving, bounded
        for name, spec in buckets:
            self._state[name] = (self._level(name, spec, now) - amount, now)


def local_share(buckets: Sequence[Bucket], replicas: int) -> list[Bucket]:
    """This replica's share of each bucket while Redis is away: rate / replicas, burst likewise (at least 1)."""
    if replicas <= 1:
        return list(buckets)
    return [(name, QuotaSpec(spec.rps / replicas, max(1, math.floor(spec.capacity / replicas))))
            for name, spec in buckets]


def failure_reason(exc: BaseException) -> str:
    """"timeout" for a call that ran past its bound (asyncio's or redis's), else "error"."""
    if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
        return "timeout"
    return "error"


class QuotaEnforcer:
    """Checks a request against its buckets; raises ResourceExhausted with a retry-after hint."""

    def __init__(
        self, *, redis: Any | None = None, failure_mode: str = "local", timeout_s: float = 0.05,
        retry_after_s: float = 1.0, default_key: QuotaSpec = UNLIMITED, default_model: QuotaSpec = UNLIMITED,
        replicas: int = 1, meter: metrics.Meter | None = None, address: str = "",
    ) -> None:
        if failure_mode not in FAILURE_MODES:
            raise ValueError(f"failure_mode must be one of {FAILURE_MODES}")
        self.redis = redis
        self.failure_mode = failure_mode
        self.replicas = max(1, replicas)
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.default_key = default_key
        self.default_model = default_model
        self.local = LocalBuckets()
        self.local_tokens = LocalTokenBuckets()
        # Token buckets of this replica's share, used only while Redis is slow or down (mode "local").
        self.fallback_tokens = LocalTokenBuckets()
        self._token_script = redis.register_script(TOKEN_USAGE_LUA) if redis is not None else None
        # Buckets of this replica's share, used only while Redis is slow or down (mode "local").
        self.fallback = LocalBuckets()
        self._script = redis.register_script(TOKEN_BUCKET_LUA) if redis is not None else None
        self._store_down_until = 0.0
        self._down_reason = "error"
        self._down_error = ""
        self._outage = OutageLog(log, "quota store (Redis)", address,
                                 level=logging.WARNING if failure_mode == "local" else logging.ERROR)
        self.store_failures = 0
        self.local_decisions: dict[str, int] = {"timeout": 0, "error": 0}
        meter = meter if meter is not None else metrics.get_meter("aiaas.gateway")
        self._failures = meter.create_counter(
            "gateway.quota.store_failures", description="Quota checks that could not reach Redis"
        )
        self._local_counter = meter.create_counter(
            "gateway.quota.local_decisions",
            description="Quota decisions made by this replica's local buckets while Redis was slow or down",
        )

    @property
    def store_healthy(self) -> bool:
        return time.monotonic() >= self._store_down_until

    async def check(self, caller: Caller, model: str, model_quota: QuotaSpec | None) -> None:
        buckets = buckets_for(caller, model, model_quota, self.default_key, self.default_model)
        if not buckets:
            return
        if self._script is None:
            wait_ms = self.local.take(buckets)
        else:
            shared = await self._take_shared(self._script, buckets)
            if shared is None:
                return
            wait_ms = shared
            if wait_ms < 0:  # Redis is away and the mode is "local"
                wait_ms = self.fallback.take(local_share(buckets, self.replicas))
        if wait_ms > 0:
            which = " and ".join(name.split(":", 2)[2] for name, _ in buckets)
            raise ResourceExhausted(
                f"quota exceeded ({which}); retry after {wait_ms} ms",
                metadata={"retry-after-ms": str(wait_ms)},
            )

    def token_buckets(self, caller: Caller, model: str, model_quota: QuotaSpec | None) -> list[Bucket]:
        return token_buckets_for(caller, model, model_quota, self.default_key.tokens_per_minute,
                                 self.default_model.tokens_per_minute)

    async def check_tokens(self, buckets: Sequence[Bucket]) -> None:
        """ResourceExhausted while a token bucket of the request is empty (nothing is taken)."""
        if not buckets:
            return
        if self._token_script is None:
            wait_ms = self.local_tokens.wait_ms(buckets)
        else:
            shared = await self._take_shared(self._token_script, buckets, first=(0,))
            if shared is None:
                return
            wait_ms = shared if shared >= 0 else self.fallback_tokens.wait_ms(local_share(buckets, self.replicas))
        if wait_ms > 0:
            which = " and ".join(name.split(":", 2)[2] for name, _ in buckets)
            raise ResourceExhausted(
                f"token quota exceeded ({which}: tokens per minute used up); retry after {wait_ms} ms",
                metadata={"retry-after-ms": str(wait_ms)},
            )

    async def charge_tokens(self, buckets: Sequence[Bucket], tokens: int) -> None:
        """Take a finished request's prompt + completion tokens from its token buckets."""
        if not buckets or tokens <= 0:
            return
        if self._token_script is None:
            self.local_tokens.charge(buckets, tokens)
            return
        shared = await self._take_shared(self._token_script, buckets, first=(tokens,))
        if shared is not None and shared < 0:
            self.fallback_tokens.charge(local_share(buckets, self.replicas), tokens)

    async def _take_shared(self, script: Any, buckets: Sequence[Bucket], first: Sequence[float] = ()) -> int | None:
        """Wait in ms from Redis; None when the store is away and the mode is "open", -1 when "local"."""
        if time.monotonic() < self._store_down_until:
            return self._store_unavailable(None)
        args: list[float] = list(first)
        for _, spec in buckets:
            args += [spec.rps, spec.capacity]
        try:
            result = await asyncio.wait_for(
                script(keys=[name for name, _ in buckets], args=args), self.timeout_s
            )
            self._outage.recovered()
            return int(result)
        except (TimeoutError, OSError, ConnectionError) as exc:
            return self._store_unavailable(exc)
        except Exception as exc:  # any redis error means the shared store failed
            if type(exc).__module__.startswith("redis"):
                return self._store_unavailable(exc)
            raise

    def _store_unavailable(self, exc: BaseException | None) -> int | None:
        now = time.monotonic()
        if exc is not None:
            self._store_down_until = now + self.retry_after_s
            self._down_reason = failure_reason(exc)
            self._down_error = (f"TIMEOUT: no answer within {self.timeout_s * 1000:g} ms"
                                if self._down_reason == "timeout" else describe_error(exc))
        reason = self._down_reason
        self.store_failures += 1
        self._failures.add(1, {"mode": self.failure_mode})
        action = {
            "local": f"deciding quotas locally at 1/{self.replicas} of each limit",
            "open": "admitting requests without a quota check",
            "closed": "refusing requests with UNAVAILABLE",
        }[self.failure_mode]
        self._outage.failed(self._down_error, consequence=action)
        if self.failure_mode == "local":
            self.local_decisions[reason] += 1
            self._local_counter.add(1, {"reason": reason})
            return -1
        if self.failure_mode == "open":
            return None
        retry_ms = max(1, int(self.retry_after_s * 1000))
        raise Unavailable(
            f"quota store unreachable; retry after {retry_ms} ms", metadata={"retry-after-ms": str(retry_ms)}
        )
