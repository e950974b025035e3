"""The generative side of a model worker process (format `hf_causal_lm`; see `_worker_main`).

Runs after the sandbox is applied, in the worker's fresh interpreter: loads the checkpoint with
`aiaas.lm.load_causal_lm` (artifact gate, `trust_remote_code=False`, safetensors only, local files
only), builds a `GenerativeEngine` within the version's KV budget, and serves several requests at
once: the main thread reads the service's messages, the engine thread steps and sends chunks.

Messages in (JSON, `_worker_replies.read_message`; nothing on this wire is pickled either way):
              the config (a dict), then
              ["generate", {"request": GenerationRequest.to_message(), "messages": [...] | None}]
              ["cancel", request_id]
              ["stop", grace_s]
Messages out (JSON, one list each; the service checks every field, see `generative_workers`):
              ["ready", pid, sandbox_report] | ["error", code, message]      after loading
              ["chunks", [{...}, ...]]          the engine chunks of one step, in order (see `_wire_chunk`);
                                                several messages when they would not fit in one
              ["refused", request_id, code, message]     the engine refused it at submit
"""

from __future__ import annotations

import os
import threading
from multiprocessing.connection import Connection
from typing import Any

from services.inference import sandbox
from services.inference._worker_replies import (
    MAX_ERROR_CHARS,
    MAX_TEXT_CHARS,
    ChunkBatch,
    Sender,
    read_message,
    us,
)


def serve(conn: Connection, config: dict[str, Any], report: sandbox.SandboxReport) -> None:
    """Load the checkpoint and answer the service until it says stop or goes away."""
    from aiaas.errors import AiaasError

    sender = Sender(conn)
    batch = ChunkBatch(sender)
    artifact = config["artifact_path"]
    path = report.paths.get(artifact, artifact)
    try:
        engine = _load(path, config, batch.flush)
    except AiaasError as exc:
        sender.send("error", exc.code.value, exc.message.replace(path, artifact)[:MAX_ERROR_CHARS])
        return
    except Exception as exc:  # noqa: BLE001 - the loader's own message is what the operator needs
        message = f"cannot load model: {type(exc).__name__}: {exc}".replace(path, artifact)
        sender.send("error", "failed_precondition", message[:MAX_ERROR_CHARS])
        return
    engine.start()
    sender.send("ready", os.getpid(), report.as_dict())
    grace_s = 0.0
    try:
        grace_s = _read_loop(conn, engine, sender, batch)
    finally:
        engine.close(grace_s)


def _load(path: str, config: dict[str, Any], after_deliver: Any) -> Any:
    import torch

    from aiaas.lm import load_causal_lm
    from services.inference.generative import EngineConfig, GenerativeEngine

    torch.set_num_threads(config["threads"])
    try:  # only settable before any parallel work
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    loaded = load_causal_lm(path, device=config["device"])
    engine_config = EngineConfig(**(config.get("engine") or {}))
    return GenerativeEngine(loaded.model, loaded.tokenizer, engine_config, after_deliver=after_deliver)


def _read_loop(conn: Connection, engine: Any, sender: Sender, batch: ChunkBatch) -> float:
    """Submit, cancel, stop; returns the grace period of the stop (0 when the service went away)."""
    from aiaas.errors import AiaasError, InvalidArgument
    from services.inference.generative import GenerationRequest

    tokenizer_lock = threading.Lock()
    while True:
        try:
            message = read_message(conn)
        except (EOFError, OSError, ValueError):
            return 0.0
        kind = message[0]
        if kind == "cancel":
            engine.cancel(str(message[1]))
            continue
        if kind != "generate":
            return float(message[1]) if kind == "stop" and len(message) > 1 else 0.0
        body = message[1]
        request_id = str(body.get("request", {}).get("request_id", ""))
        try:
            fields = dict(body["request"])
            if body.get("messages") is not None:
                fields["prompt"] = _chat_prompt(engine.tokenizer, body["messages"], tokenizer_lock)
                fields["add_special_tokens"] = False  # the template writes its own special tokens
            request = GenerationRequest.from_message(fields)
            engine.submit(request, sink=lambda chunk, e=engine: batch.add(_wire_chunk(chunk, e)))
        except AiaasError as exc:
            sender.send("refused", request_id, exc.code.value, exc.message[:MAX_ERROR_CHARS])
        except (TypeError, ValueError, KeyError) as exc:
            error = InvalidArgument(f"bad generate request: {exc}")
            sender.send("refused", request_id, error.code.value, error.message[:MAX_ERROR_CHARS])


def _chat_prompt(tokenizer: Any, messages: list[dict[str, str]], lock: threading.Lock) -> str:
    from aiaas.errors import InvalidArgument

    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument("this model's tokenizer has no chat template: send text_input instead of messages")
    with lock:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template error is the caller's input
            raise InvalidArgument(f"messages: the chat template failed: {type(exc).__name__}: {exc}") from None
    return str(text)


def _wire_chunk(chunk: Any, engine: Any) -> dict[str, Any]:
    """What the service reads of a chunk: text, token count, and on the last one the outcome and timings."""
    wire: dict[str, Any] = {"id": chunk.request_id, "text": chunk.text[:MAX_TEXT_CHARS], "tokens": len(chunk.token_ids)}
    if chunk.finish_reason is None:
        return wire
    metrics = chunk.metrics
    gaps = metrics.inter_token_s if metrics is not None else ()
    pool = engine.pool
    wire.update({
        "finish": chunk.finish_reason.value,
        "stop": chunk.stop_reason if isinstance(chunk.stop_reason, (str, int)) else None,
        "prompt_tokens": chunk.usage.prompt_tokens if chunk.usage is not None else 0,
        "completion_tokens": chunk.usage.completion_tokens if chunk.usage is not None else 0,
        "error_code": chunk.error_code.value if chunk.error_code is not None else None,
        "error": chunk.error_message[:MAX_ERROR_CHARS],
        "queue_us": us(metrics.queue_s if metrics is not None else 0.0),
        "ttft_us": us(metrics.ttft_s if metrics is not None and metrics.ttft_s is not None else 0.0),
        "itl_mean_us": us(sum(gaps) / len(gaps) if gaps else 0.0),
        "itl_max_us": us(max(gaps) if gaps else 0.0),
        "e2e_us": us(metrics.e2e_s if metrics is not None else 0.0),
        "preemptions": metrics.preemptions if metrics is not None else 0,
        "kv_used": pool.num_used,
        "kv_total": pool.num_blocks,
    })
    return wire

