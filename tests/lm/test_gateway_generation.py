"""End to end through the gateway, against the real inference service serving a tiny Llama
(`hf_causal_lm`, made in the test): the official `openai` client (completions and chat, streamed
and not, usage, errors, a bad key, the token quota) on the OpenAI door, and `tritonclient`
streaming on the gateway's gRPC door. Registry, inference, gateway and Redis are real processes."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient

from aiaas.cli.main import main as cli_main
from aiaas.gateway_client import GatewayClient
from aiaas.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from aiaas.registry_client import RegistryClient
from tests.gateway.stack import ADMIN_TOKEN, start_gateway, wait_until
from tests.generative.models import build_llama, train_tokenizer
from tests.inference.conftest import Registry, inference_args, start_inference, start_registry, wait_model
from tests.support.procs import ServiceProcess
from tests.support.servers import RedisServer

MODEL = "tiny-chat"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def write_chat_checkpoint(directory: Path) -> Path:
    tokenizer = train_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    build_llama(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@dataclasses.dataclass
class LlmStack:
    gateway: ServiceProcess
    monitor: ServiceProcess
    token: str
    # 40 prompt + completion tokens a minute.
    thrifty_token: str

    def openai(self, token: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.openai_url, api_key=token or self.token, max_retries=0,
                             timeout=120)


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[LlmStack]:
    registry = Registry(start_registry(tmp_path_factory.mktemp("registry")))
    procs: list[ServiceProcess] = []
    try:
        checkpoint = write_chat_checkpoint(tmp_path_factory.mktemp("checkpoint"))
        with RegistryClient(registry.address, actor="tests") as client:
            version = client.upload_version(MODEL, checkpoint, format="hf_causal_lm",
                                            serving_config={"kv_cache_tokens": 4096, "max_num_seqs": 16})
            client.set_alias(MODEL, "production", version.version)
            client.set_alias(MODEL, "canary", version.version)
        inference = start_inference(inference_args(registry, tmp_path_factory.mktemp("cache"),
                                                   follow="production,canary"))
        procs.append(inference)
        wait_model(inference, MODEL, timeout=180)
        monitor = ServiceProcess("monitor", ["--registry-url", ""]).start()
        procs.append(monitor)
        gateway = start_gateway(registry, [inference], redis_server, monitor=monitor.address)
        procs.append(gateway)
        with GatewayClient(gateway.address, api_key=ADMIN_TOKEN) as admin:
            _, token = admin.create_key("llm", models=[MODEL], roles=["infer", "read"])
        # The token quota as an operator sets it: `aiaas keys create --tokens-per-minute`.
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli_main(["keys", "create", "--gateway", gateway.address, "--api-key", ADMIN_TOKEN, "--name",
                             "llm-thrifty", "--models", MODEL, "--roles", "infer", "--tokens-per-minute", "40",
                             "--json"]) == 0
        thrifty = json.loads(out.getvalue())
        assert thrifty["tokens_per_minute"] == 40
        yield LlmStack(gateway, monitor, token, thrifty["token"])
    finally:
        for proc in reversed(procs):
            proc.stop()
        registry.close()
        registry.proc.stop()


def test_models_lists_the_generative_model(llm: LlmStack) -> None:
    assert [m.id for m in llm.openai().models.list().data] == [MODEL]


def test_completions_stream_and_not_agree_and_count_tokens(llm: LlmStack) -> None:
    api = llm.openai()
    ask: dict[str, Any] = {"model": MODEL, "prompt": "def fibonacci(n):", "max_tokens": 12, "temperature": 0,
                           "extra_body": {"ignore_eos": True}}
    whole = api.completions.create(**ask)
    assert whole.choices[0].finish_reason == "length" and whole.usage is not None
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(api.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # token by token, not one piece
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    # The canary alias serves it too.
    assert api.completions.create(**{**ask, "model": f"{MODEL}:canary"}).choices[0].text == whole.choices[0].text


def test_chat_stream_and_not(llm: LlmStack) -> None:
    api = llm.openai()
    messages: Any = [{"role": "user", "content": "hello"}]
    whole = api.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert whole.choices[0].message.role == "assistant" and whole.usage is not None
    assert whole.usage.completion_tokens == 6
    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_openai_errors(llm: LlmStack) -> None:
    with pytest.raises(openai.AuthenticationError):
        llm.openai("aiaas_abcd1234_not-a-key").completions.create(model=MODEL, prompt="a")
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'other-model'"):
        llm.openai().completions.create(model="other-model", prompt="a")  # the key is scoped to MODEL
    with pytest.raises(openai.NotFoundError, match="unknown model: 'no-such-model'"):
        llm.openai(ADMIN_TOKEN).completions.create(model="no-such-model", prompt="a")
    with pytest.raises(openai.BadRequestError) as bad:
        llm.openai().completions.create(model=MODEL, prompt="a", n=3)
    assert bad.value.param == "n"


def test_token_quota_refuses_with_429(llm: LlmStack) -> None:
    api = llm.openai(llm.thrifty_token)
    first = api.completions.create(model=MODEL, prompt="import torch", max_tokens=40,
                                   extra_body={"ignore_eos": True})
    assert first.usage is not None and first.usage.total_tokens > 40
    with pytest.raises(openai.RateLimitError, match="token quota exceeded"):
        api.completions.create(model=MODEL, prompt="a", max_tokens=1)


def test_tritonclient_streams_through_the_gateway(llm: LlmStack) -> None:
    responses: list[Any] = []
    client = grpcclient.InferenceServerClient(llm.gateway.address)
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"def fibonacci(n):"], dtype=np.object_))
    stream = grpcclient.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    try:
        client.start_stream(callback=lambda result, error: responses.append((result, error)),
                            headers={"authorization": f"Bearer {llm.token}"})
        client.async_stream_infer(MODEL, [text, stream], request_id="t1",
                                  parameters={"max_tokens": 12, "temperature": 0, "ignore_eos": True})
    finally:
        client.stop_stream()  # waits for the responses under way
        client.close()
    assert all(error is None for _, error in responses) and len(responses) > 2
    final = responses[-1][0].get_response()
    assert final.parameters["triton_final_response"].bool_param
    assert final.parameters["completion_tokens"].int64_param == 12
    assert final.parameters["finish_reason"].string_param == "length"
    streamed = b"".join(r.as_numpy("text_output")[0] for r, _ in responses if r.as_numpy("text_output") is not None)
    whole = llm.openai().completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert streamed.decode() == whole.choices[0].text


def test_the_gateway_reports_generations_to_the_monitor(llm: LlmStack) -> None:
    llm.openai().completions.create(model=f"{MODEL}:canary", prompt="import torch", max_tokens=9,
                                    extra_body={"ignore_eos": True})

    def canary() -> Any:
        with grpc.insecure_channel(llm.monitor.address) as channel:
            reply = monitor_pb2_grpc.MonitorStub(channel).QueryMetrics(monitor_pb2.QueryMetricsRequest(
                model=MODEL, alias="canary", source="gateway", window_seconds=600), timeout=10)
        found = [series for series in reply.series if series.generation.count]
        return found[0] if found else None

    wait_until(lambda: canary() is not None, timeout=30)
    generation = canary().generation
    assert generation.completion_tokens >= 9 and generation.prompt_tokens > 0
    assert generation.ttft.p50_ms > 0 and generation.finish_reasons["length"] >= 1
