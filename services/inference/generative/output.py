"""One live request's side of the engine: its sampler, its text, its timeline, and the chunks it emits.

`RequestState.add_token` takes each sampled token, decides whether the request is finished (a stop
token, a stop string, max_tokens) and makes its chunk; `end` makes the last chunk of a request
that ends without a token (cancelled, timed out, failed). The engine sends them to `sink`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from tokenizers import Tokenizer

from aiaas.errors import ErrorCode
from services.inference.generative.entities import FinishReason, GenerationChunk, RequestMetrics, Usage
from services.inference.generative.sampling import RequestSampler
from services.inference.generative.scheduler import Sequence
from services.inference.generative.text import OutputText

ChunkSink = Callable[[GenerationChunk], None]


class RequestState:
    def __init__(self, seq: Sequence, tokenizer: Tokenizer, eos_ids: frozenset[int], sink: ChunkSink) -> None:
        params = seq.params
        self.seq = seq
        self.sink = sink
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_ids)
        self.sampler = RequestSampler(params, seq.prompt_ids, len(seq.prompt_ids) + seq.max_tokens, self.stop_ids)
        self.text = OutputText(tokenizer, seq.prompt_ids, params.stop, params.skip_special_tokens)
        self.token_times: list[float] = []
        self.counted_as_queued = True  # in the engine's queue count until first admitted

    def add_token(self, token: int, now: float) -> GenerationChunk:
        """Record a sampled token; the chunk to emit (the last one when the token finished the request)."""
        seq, params = self.seq, self.seq.params
        seq.output_ids.append(token)
        self.sampler.append(token)
        self.token_times.append(now)
        produced = len(seq.output_ids)
        reason: FinishReason | None = None
        stop_reason: str | int | None = None
        if token in self.stop_ids and produced > params.min_tokens:
            reason = FinishReason.STOP
            stop_reason = token if token in params.stop_token_ids else None
        else:
            matched = self.text.add(token, check_stop=produced >= params.min_tokens)
            if matched is not None:
                reason, stop_reason = FinishReason.STOP, matched
            elif produced >= seq.max_tokens:
                reason = FinishReason.LENGTH
        if reason is not None and not isinstance(stop_reason, str):  # not cut at a stop string
            self.text.flush()
        return self._chunk((token,), reason, stop_reason, now)

    def end(self, reason: FinishReason, now: float, *, error_code: ErrorCode | None = None,
            error_message: str = "") -> GenerationChunk:
        """The last chunk of a request that ends without a token."""
        return self._chunk((), reason, None, now, error_code=error_code, error_message=error_message)

    def _chunk(self, token_ids: tuple[int, ...], reason: FinishReason | None, stop_reason: str | int | None,
               now: float, *, error_code: ErrorCode | None = None, error_message: str = "") -> GenerationChunk:
        final = reason is not None
        return GenerationChunk(
            request_id=self.seq.request_id,
            token_ids=token_ids,
            text=self.text.take(final=final),
            finish_reason=reason,
            stop_reason=stop_reason,
            usage=Usage(len(self.seq.prompt_ids), len(self.seq.output_ids)) if final else None,
            metrics=self.metrics(now) if final else None,
            error_code=error_code,
            error_message=error_message,
        )

    def metrics(self, now: float) -> RequestMetrics:
        seq = self.seq
        arrival = seq.arrival_s
        times = self.token_times
        return RequestMetrics(
            queue_s=(seq.admitted_s if seq.admitted_s is not None else now) - arrival,
            ttft_s=times[0] - arrival if times else None,
            e2e_s=now - arrival,
            inter_token_s=tuple(b - a for a, b in itertools.pairwise(times)),
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            preemptions=seq.preemptions,
        )
