"""`serving_config.engine: vllm`: the same generate protocol served by vLLM's engine in the worker.

Marked `vllm`, left out of `make test`: it needs vLLM's CPU build (about 3.5 GB), which
`bench.llm_peers.ensure_vllm` installs once into its own venv under ~/.cache/aiaas/llm-bench
(minutes the first time), and each start of the engine takes 20-60 s. Run it with `make test-vllm`.
The inference service runs as a real process with `--vllm-python` pointing at that venv;
the client is the stock `tritonclient`.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as triton

from aiaas.lm import deploy_lm
from bench.bench_llm_service import bf16_checkpoint
from bench.llm_peers import ensure_vllm
from tests.inference.conftest import Registry, inference_args, start_inference, start_registry, wait_model
from tests.inference_generative.calls import Stream, infer

pytestmark = pytest.mark.vllm

PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser("


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    python = ensure_vllm()
    checkpoint = bf16_checkpoint(Path(tempfile.gettempdir()))
    tmp = tmp_path_factory.mktemp("vllm-engine")
    registry_proc = start_registry(tmp / "registry")
    registry = Registry(registry_proc)
    deploy_lm(checkpoint, name="vl", registry=registry.address,
              serving_config={"engine": "vllm", "kv_cache_tokens": 8192, "max_num_seqs": 32})
    inference = start_inference(inference_args(registry, tmp / "cache", "--vllm-python", str(python)))
    try:
        wait_model(inference, "vl", timeout=600)
        yield triton.InferenceServerClient(inference.address)
    finally:
        inference.stop()
        registry.close()
        registry_proc.stop()


def test_tritonclient_streams_tokens_and_the_whole_text_matches(served: Any) -> None:
    stream = Stream(served)
    try:
        stream.send("vl", PROMPT, max_tokens=16, min_tokens=16, ignore_eos=True, temperature=0.0)
        answers = stream.until_final(timeout=120)
    finally:
        stream.close()
    assert len(answers) >= 2 and answers[-1].final
    assert answers[-1].params["completion_tokens"] == 16
    assert answers[-1].params["finish_reason"] == "length"
    assert answers[-1].params["prompt_tokens"] > 5
    streamed = "".join(a.text for a in answers)
    whole = infer(served, "vl", PROMPT, max_tokens=16, min_tokens=16, ignore_eos=True, temperature=0.0)
    assert whole.final and whole.text == streamed and whole.params["completion_tokens"] == 16


def test_a_stop_string_ends_the_text_before_it(served: Any) -> None:
    greedy = infer(served, "vl", PROMPT, max_tokens=24, ignore_eos=True, temperature=0.0)
    text = greedy.text
    cut = text[len(text) // 2:len(text) // 2 + 3]
    assert cut.strip(), text
    stopped = infer(served, "vl", PROMPT, max_tokens=24, ignore_eos=True, temperature=0.0, stop=cut)
    assert stopped.params["finish_reason"] == "stop"
    assert stopped.text == text[:text.index(cut)]


def test_a_cancelled_stream_leaves_the_engine_serving(served: Any) -> None:
    stream = Stream(served)
    stream.send("vl", PROMPT, max_tokens=1500, ignore_eos=True, temperature=0.0)
    first = stream.next(timeout=120)
    assert not isinstance(first, Exception) and not first.final
    stream.close(cancel=True)
    started = time.monotonic()
    again = infer(served, "vl", PROMPT, max_tokens=4, ignore_eos=True, temperature=0.0)
    assert again.params["completion_tokens"] == 4 and time.monotonic() - started < 60
