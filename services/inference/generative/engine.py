"""The generative engine: a causal LM served with continuous batching inside one worker process.

Callers in any thread `submit` requests (validated and tokenized there, refused at once when they
could never run or the queue is full) and `cancel` them; both only post to the engine's inbox.
One thread owns everything else and runs `step()` in a loop: take the inbox, let the scheduler
pick this iteration's decodes and prefill chunks, run one forward pass, sample, and emit a chunk
per request (to its `GenerationHandle`, or to the sink given at submit, e.g. a pipe to the
service). The KV cache is allocated once at construction, within the configured budget.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from aiaas.errors import ErrorCode, InvalidArgument, ResourceExhausted, Unavailable
from services.inference.generative.config import EngineConfig
from services.inference.generative.entities import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    StepMetrics,
)
from services.inference.generative.kv_cache import BlockPool, PagedKVCache
from services.inference.generative.output import ChunkSink, RequestState
from services.inference.generative.packing import compute_dtype
from services.inference.generative.runner import ModelRunner
from services.inference.generative.sampling import sample
from services.inference.generative.scheduler import Scheduler, SchedulerOutput, Sequence
from services.inference.generative.streams import GenerationHandle

log = logging.getLogger("aiaas.inference.generative")

StepObserver = Callable[[StepMetrics], None]


class GenerativeEngine:
    """One causal LM and its tokenizer, a KV cache within the budget, a scheduler, and the step loop."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, config: EngineConfig | None = None, *,
                 step_observer: StepObserver | None = None, after_deliver: Callable[[], None] | None = None) -> None:
        """`after_deliver` (engine thread) runs once after each round of chunks handed to sinks: at the
        end of every step and after a request ends outside one, so a sink may buffer and send in batches."""
        self.config = config = config or EngineConfig()
        checkpoint_dtype = model.dtype
        self.compute_dtype = compute_dtype(checkpoint_dtype, config.compute_dtype, model.device)
        if self.compute_dtype != checkpoint_dtype:
            log.info("the model computes in %s (checkpoint in %s, compute_dtype %s)", _dtype_name(self.compute_dtype),
                     _dtype_name(checkpoint_dtype), config.compute_dtype)
            torch.nn.Module.to(model, self.compute_dtype)  # in place, like packing: the caller's model changes
        text_config = model.config.get_text_config()
        kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        layers = text_config.num_hidden_layers
        per_token = PagedKVCache.bytes_per_token(num_layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                                 dtype=model.dtype)
        num_blocks = config.num_blocks(per_token)
        self.pool = BlockPool(num_blocks, config.block_size)
        self.cache = PagedKVCache(num_layers=layers, num_blocks=num_blocks, block_size=config.block_size,
                                  kv_heads=kv_heads, head_dim=head_dim, dtype=model.dtype, device=model.device)
        self.runner = ModelRunner(model, self.cache, pack_weights=config.pack_weights,
                                  batch_hint=min(64, config.max_num_seqs))
        self.scheduler = Scheduler(self.pool, config)
        self.tokenizer = tokenizer
        embeddings: torch.nn.Embedding = model.get_input_embeddings()  # type: ignore[assignment]
        self.vocab_size = embeddings.num_embeddings
        model_len = config.max_model_len or getattr(text_config, "max_position_embeddings", None) or 2048
        # Prompt + output of one sequence: it must fit the model and, alone, the whole KV budget.
        self.max_seq_len = min(model_len, num_blocks * config.block_size)
        self.eos_ids = frozenset(_token_ids(model.generation_config.eos_token_id)
                                 or _token_ids(getattr(tokenizer, "eos_token_id", None)))
        self._step_observer = step_observer
        self._after_deliver = after_deliver
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards the counts and ids below, and the step history
        self._all_done = threading.Condition(self._lock)  # notified when the last live request ends
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once
        self._queued = 0
        self._live: set[str] = set()
        self._active: dict[str, RequestState] = {}  # engine thread only
        self._deferred_wakes: list[Callable[[], None]] = []  # engine thread only
        self._steps: deque[StepMetrics] = deque(maxlen=config.step_history)
        self._step_count = 0
        self._closing = False
        self._stopped = False  # engine thread only: close was posted
        self._thread: threading.Thread | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, *,
                        dtype: torch.dtype = torch.float32, **kwargs: Any) -> GenerativeEngine:
        """Load a local checkpoint directory (model and tokenizer); nothing is downloaded."""
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(model, tokenizer, config, **kwargs)

    # -- the callers' side (any thread) ---------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: ChunkSink | None = None) -> GenerationHandle:
        """Queue a request; its chunks go to the returned handle, or to `sink` (called on the engine thread)."""
        prompt_ids = self._prompt_ids(request)
        params = request.params
        room = self.max_seq_len - len(prompt_ids)
        if room < 1:
            raise InvalidArgument(f"the prompt has {len(prompt_ids)} tokens; a sequence (prompt and output) "
                                  f"may hold at most {self.max_seq_len} here")
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room:
            raise InvalidArgument(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                  f"{self.max_seq_len} tokens a sequence may hold here")
        if params.min_tokens > max_tokens:
            raise InvalidArgument(f"min_tokens ({params.min_tokens}) exceeds the {max_tokens} tokens this request "
                                  "may produce")
        timeout = request.timeout_s if request.timeout_s is not None else self.config.default_timeout_s
        now = time.monotonic()
        seq = Sequence(request_id=request.request_id, prompt_ids=prompt_ids, params=params, max_tokens=max_tokens,
                       arrival_s=now, deadline_s=now + timeout if timeout else None)
        handle = GenerationHandle(request.request_id, self.cancel, self._defer_wake)
        state = RequestState(seq, self.tokenizer.backend_tokenizer, self.eos_ids, sink or handle.put)
        with self._lock:
            if self._closing:
                raise Unavailable("the generative engine is closing; retry")
            if request.request_id in self._live:
                raise InvalidArgument(f"request id '{request.request_id}' is already in use")
            if self._queued >= self.config.max_queue_size:
                raise ResourceExhausted(f"the queue is full ({self.config.max_queue_size} requests waiting)")
            self._queued += 1
            self._live.add(request.request_id)
        self._inbox.put(("add", state))
        self._wake.set()
        return handle

    def cancel(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next step runs. Unknown ids are ignored."""
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
        else:
            with self._tokenizer_lock:
                ids = list(self.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"])
        if not ids:
            raise InvalidArgument("the prompt is empty")
        bad = [t for t in ids if t >= self.vocab_size]
        if bad:
            raise InvalidArgument(f"prompt token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        return ids

    def step_metrics(self) -> list[StepMetrics]:
        """The most recent steps, oldest first (up to `config.step_history`)."""
        with self._lock:
            return list(self._steps)

    @property
    def queued(self) -> int:
        """Requests submitted and not yet admitted (nor finished)."""
        with self._lock:
            return self._queued

    # -- the engine thread ----------------------------------------------------------------------

    def start(self) -> None:
        """Run the step loop in a thread of its own."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="aiaas-generative-engine", daemon=True)
        self._thread.start()

    def close(self, grace_s: float = 0.0) -> None:
        """Refuse new requests; let running ones finish for up to `grace_s`; end the rest with UNAVAILABLE."""
        with self._lock:
            self._closing = True
        if self._thread is not None and grace_s > 0:
            with self._lock:
                self._all_done.wait_for(lambda: not self._live, timeout=grace_s)
        thread, self._thread = self._thread, None
        self._inbox.put(("close", None))
        self._wake.set()
        if thread is not None:
            thread.join()
        self._take_inbox()
        self._fail_all(ErrorCode.UNAVAILABLE, "the generative engine closed; retry")

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    def _run(self) -> None:
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        while not self._stopped:
            self._wake.clear()
            if self._inbox.empty() and not self.scheduler.has_work:
                self._wake.wait()
                continue
            try:
                self.step()
            except Exception:
                log.exception("generative step failed; failing every request")
                self._fail_all(ErrorCode.INTERNAL, "the generative engine failed while running the model")

    def _take_inbox(self) -> None:
        """Apply posted submits and cancels (and the close)."""
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._active[item.seq.request_id] = item
                self.scheduler.add(item.seq)
            elif kind == "cancel":
                self._abort(item, FinishReason.CANCELLED)
            else:
                self._stopped = True

    def step(self) -> StepMetrics | None:
        """One iteration: schedule, run the model once, sample, emit. None when there was nothing to run."""
        self._take_inbox()
        if self._stopped:
            return None
        started = time.monotonic()
        out = self.scheduler.schedule(started)
        self._settle_queue(out)
        for seq in out.timed_out:
            self._end(seq.request_id, FinishReason.TIMEOUT, started, error_code=ErrorCode.UNAVAILABLE,
                      error_message="Request timeout expired")
        if out.empty:
            return None
        sampling = [entry for entry in out.scheduled if entry.samples]
        with torch.inference_mode():
            logits = self.runner.execute(out.decodes, out.prefills)
            tokens = sample(logits, [self._active[e.seq.request_id].sampler for e in sampling])
        for entry in out.scheduled:
            entry.seq.num_computed += entry.num_tokens
        now = time.monotonic()
        finished = 0
        for entry, token in zip(sampling, tokens, strict=True):
            state = self._active[entry.seq.request_id]
            chunk = state.add_token(token, now)
            if chunk.finished:  # free the blocks first: a reader that sees the end sees them free
                self.scheduler.finish(entry.seq)
                self._forget(entry.seq.request_id)
                finished += 1
            self._deliver(state, chunk)
        self._wake_readers()
        return self._record(out, started, now, len(sampling), finished)

    def _defer_wake(self, wake: Callable[[], None]) -> None:
        self._deferred_wakes.append(wake)

    def _wake_readers(self) -> None:
        wakes, self._deferred_wakes = self._deferred_wakes, []
        for wake in wakes:
            wake()
        if self._after_deliver is not None:
            try:
                self._after_deliver()
            except Exception:
                log.exception("the engine's after-deliver hook failed")

    def _settle_queue(self, out: SchedulerOutput) -> None:
        """Requests admitted for the first time leave the queue count."""
        admitted = 0
        for entry in out.prefills:
            state = self._active[entry.seq.request_id]
            if state.counted_as_queued:
                state.counted_as_queued = False
                admitted += 1
        if admitted:
            with self._lock:
                self._queued -= admitted

    def _record(self, out: SchedulerOutput, started: float, now: float, sampled: int, finished: int) -> StepMetrics:
        self._step_count += 1
        metrics = StepMetrics(
            step=self._step_count, started_s=started, duration_s=now - started,
            num_seqs=len(out.decodes) + len(out.prefills), num_decode_seqs=len(out.decodes),
            num_prefill_seqs=len(out.prefills), prefill_tokens=sum(e.num_tokens for e in out.prefills),
            decode_tokens=len(out.decodes), sampled_tokens=sampled, kv_blocks_used=self.pool.num_used,
            kv_blocks_total=self.pool.num_blocks, waiting=len(self.scheduler.waiting),
            preemptions=len(out.preempted), finished=finished)
        with self._lock:
            self._steps.append(metrics)
        if self._step_observer is not None:
            self._step_observer(metrics)
        return metrics

    def _abort(self, request_id: str, reason: FinishReason) -> None:
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._end(request_id, reason, time.monotonic())

    def _end(self, request_id: str, reason: FinishReason, now: float, *, error_code: ErrorCode | None = None,
             error_message: str = "") -> None:
        state = self._active.get(request_id)
        if state is None:
            return
        if state.counted_as_queued:
            state.counted_as_queued = False
            with self._lock:
                self._queued -= 1
        self._forget(request_id)
        self._deliver(state, state.end(reason, now, error_code=error_code, error_message=error_message))
        self._wake_readers()

    def _deliver(self, state: RequestState, chunk: GenerationChunk) -> None:
        """Hand a chunk to its sink; a sink that raises loses its request, not the engine."""
        try:
            state.sink(chunk)
        except Exception:
            log.exception("the chunk sink of request '%s' failed; dropping the request", chunk.request_id)
            if not chunk.finished and self.scheduler.abort(chunk.request_id) is not None:
                self._forget(chunk.request_id)

    def _forget(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        with self._lock:
            self._live.discard(request_id)
            if not self._live:
                self._all_done.notify_all()

    def _fail_all(self, code: ErrorCode, message: str) -> None:
        for request_id in list(self._active):
            self.scheduler.abort(request_id)
            self._end(request_id, FinishReason.ERROR, time.monotonic(), error_code=code, error_message=message)


def _token_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
