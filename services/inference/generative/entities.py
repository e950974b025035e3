"""The generative engine's plain types: a request and its sampling parameters, the chunks it streams
back, and the per-request and per-step metrics. Every type converts to and from builtins only
(`to_message` / `from_message`), so a worker process can pass them over a pipe as JSON."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

from aiaas.errors import ErrorCode, InvalidArgument


class FinishReason(enum.Enum):
    STOP = "stop"  # an EOS token, a stop token id or a stop string
    LENGTH = "length"  # max_tokens, or the model's (or the KV budget's) length
    CANCELLED = "cancelled"  # the caller went away
    TIMEOUT = "timeout"  # the queue timeout expired before the request was admitted
    ERROR = "error"  # the engine failed; the chunk's error says why


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops; validated once, when built.

    `temperature == 0` is greedy decoding (top_p and top_k then do nothing). `max_tokens=None`
    generates until a stop condition or the engine's maximum sequence length.
    """

    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._check_lengths()
        self._check_sampling()
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidArgument("stop strings must be non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise InvalidArgument("stop_token_ids must be non-negative integers")

    def _check_lengths(self) -> None:
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise InvalidArgument(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise InvalidArgument(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidArgument(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")

    def _check_sampling(self) -> None:
        if not _is_finite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidArgument(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not _is_finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidArgument(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidArgument(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_message(self) -> dict[str, Any]:
        message = dataclasses.asdict(self)
        message["stop"] = list(self.stop)
        message["stop_token_ids"] = list(self.stop_token_ids)
        return message

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(message) - known)
        if unknown:
            raise InvalidArgument(f"unknown sampling parameters: {', '.join(unknown)}")
        return cls(**message)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One completion to run: a prompt (text, or token ids), how to sample, how long it may queue.

    `timeout_s` bounds the time in the queue before the request is admitted (Triton's queue
    timeout); None takes the engine's default, 0 waits forever.
    """

    request_id: str
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    timeout_s: float | None = None
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidArgument("request_id must be a non-empty string")
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise InvalidArgument("give exactly one of prompt and prompt_token_ids")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InvalidArgument("prompt must be a string")
        if self.prompt_token_ids is not None:
            object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
            if any(not _is_int(t) or t < 0 for t in self.prompt_token_ids):
                raise InvalidArgument("prompt_token_ids must be non-negative integers")
        if self.timeout_s is not None and (not _is_finite(self.timeout_s) or self.timeout_s < 0):
            raise InvalidArgument(f"timeout_s must be a finite number >= 0, got {self.timeout_s!r}")

    def to_message(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "prompt": self.prompt,
            "prompt_token_ids": None if self.prompt_token_ids is None else list(self.prompt_token_ids),
            "params": self.params.to_message(),
            "timeout_s": self.timeout_s,
            "add_special_tokens": self.add_special_tokens,
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> GenerationRequest:
        fields = dict(message)
        fields["params"] = SamplingParams.from_message(fields.get("params") or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise InvalidArgument(f"unknown request fields: {', '.join(unknown)}")
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """One request's timeline, in seconds from its arrival (monotonic clock)."""

    queue_s: float  # arrival -> first admitted into the running batch
    ttft_s: float | None  # arrival -> first token sampled (None: no token)
    e2e_s: float  # arrival -> finished
    inter_token_s: tuple[float, ...]  # gaps between successive tokens
    prompt_tokens: int
    completion_tokens: int
    preemptions: int  # times its KV blocks were taken back (it was recomputed later)


@dataclasses.dataclass(frozen=True)
class GenerationChunk:
    """What one step produced for one request: new tokens and the text they completed.

    `text` may lag `token_ids`: bytes of an unfinished character, and text that may still turn
    into a stop string, are held back until they are settled. The last chunk of a request has a
    `finish_reason`, its `usage` and `metrics`; a failed or timed-out request also an `error`.
    """

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    usage: Usage | None = None
    metrics: RequestMetrics | None = None
    error_code: ErrorCode | None = None
    error_message: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_message(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "token_ids": list(self.token_ids),
            "text": self.text,
            "finish_reason": None if self.finish_reason is None else self.finish_reason.value,
            "stop_reason": self.stop_reason,
            "usage": None if self.usage is None else dataclasses.asdict(self.usage),
            "metrics": None if self.metrics is None else dataclasses.asdict(self.metrics),
            "error_code": None if self.error_code is None else self.error_code.value,
            "error_message": self.error_message,
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> GenerationChunk:
        metrics = message.get("metrics")
        usage = message.get("usage")
        return cls(
            request_id=message["request_id"],
            token_ids=tuple(message.get("token_ids") or ()),
            text=message.get("text") or "",
            finish_reason=None if message.get("finish_reason") is None else FinishReason(message["finish_reason"]),
            stop_reason=message.get("stop_reason"),
            usage=None if usage is None else Usage(**usage),
            metrics=None if metrics is None else RequestMetrics(
                **{**metrics, "inter_token_s": tuple(metrics["inter_token_s"])}),
            error_code=None if message.get("error_code") is None else ErrorCode(message["error_code"]),
            error_message=message.get("error_message") or "",
        )


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """All chunks of one request folded together (what a non-streaming caller wants)."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    stop_reason: str | int | None
    usage: Usage | None
    metrics: RequestMetrics | None
    error_code: ErrorCode | None = None
    error_message: str = ""

    @classmethod
    def from_chunks(cls, chunks: list[GenerationChunk]) -> GenerationResult:
        last = chunks[-1] if chunks else None
        if last is None or last.finish_reason is None:
            raise ValueError("the request has not finished")
        return cls(
            request_id=last.request_id,
            token_ids=tuple(t for c in chunks for t in c.token_ids),
            text="".join(c.text for c in chunks),
            finish_reason=last.finish_reason,
            stop_reason=last.stop_reason,
            usage=last.usage,
            metrics=last.metrics,
            error_code=last.error_code,
            error_message=last.error_message,
        )


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """One scheduler iteration: what ran, what it cost, how full the KV cache was after it."""

    step: int
    started_s: float  # monotonic clock
    duration_s: float
    num_seqs: int  # sequences in the forward pass (the batch size)
    num_decode_seqs: int
    num_prefill_seqs: int
    prefill_tokens: int
    decode_tokens: int
    sampled_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    waiting: int  # requests still queued after this step
    preemptions: int  # sequences whose blocks this step took back
    finished: int

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
