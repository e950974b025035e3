"""Generative workers under load, through a real inference service: continuous batching interleaves
requests, a cancelled stream gives its place back at once, a killed worker fails its generations with
UNAVAILABLE and comes back, and the model only ever loads in sandboxed worker processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import psutil
import pytest
from tritonclient.utils import InferenceServerException

from aiaas.registry.v1 import registry_pb2
from tests.inference_generative.calls import Answer, Stream, infer
from tests.inference_generative.conftest import Stack


def worker_processes(stack: Stack, model: str) -> list[psutil.Process]:
    """The inference service's worker processes that map `model`'s checkpoint from the artifact cache."""
    version = stack.registry.stub.GetVersion(registry_pb2.GetVersionRequest(model=model, alias="production"),
                                             timeout=10)
    sha = version.version.artifact_sha256
    assert stack.inference.proc is not None
    found = []
    for child in psutil.Process(stack.inference.proc.pid).children():
        try:
            if any(sha in m.path and m.path.endswith(".safetensors") for m in child.memory_maps()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def drain(stream: Stream) -> list[Answer | InferenceServerException]:
    events = []
    while not stream.events.empty():
        events.append(stream.events.get_nowait())
    return events


def test_a_short_request_arriving_during_a_long_decode_finishes_first(stack: Stack) -> None:
    prompt = "def fibonacci(n):"
    _, long_text = stack.reference("tiny-llm", prompt, 400, exact_length=True)
    long_stream, short_stream = Stream(stack.client()), Stream(stack.client())
    try:
        long_stream.send("tiny-llm", prompt, request_id="long", max_tokens=400, temperature=0, ignore_eos=True)
        first = long_stream.next()
        assert isinstance(first, Answer) and not first.final
        short_stream.send("tiny-llm", "x", request_id="short", max_tokens=4, temperature=0, ignore_eos=True)
        short = short_stream.until_final()
        seen = drain(long_stream)
        assert not any(isinstance(e, Answer) and e.final for e in seen), "the long request finished first"
        rest = long_stream.until_final(120)
    finally:
        long_stream.close()
        short_stream.close()
    assert short[-1].params["completion_tokens"] == 4
    answers = [first, *[e for e in seen if isinstance(e, Answer)], *rest]
    # Batched with the short one, the long one still equals generate token for token.
    assert "".join(a.text for a in answers) == long_text
    assert answers[-1].params["completion_tokens"] == 400


def test_cancelling_a_stream_frees_its_place_for_the_next_request(stack: Stack) -> None:
    # one-seq-llm runs one sequence at a time: while the long one decodes, another request only queues.
    stream = Stream(stack.client())
    client = stack.client()
    started = time.monotonic()
    stream.send("one-seq-llm", "x", max_tokens=1900, temperature=0, ignore_eos=True)
    first = stream.next()
    assert isinstance(first, Answer) and not first.final
    with pytest.raises(InferenceServerException) as caught:  # the queue timeout expires while it decodes
        infer(client, "one-seq-llm", "hello", max_tokens=4, temperature=0, queue_timeout_us=300_000)
    assert caught.value.status() == str(grpc.StatusCode.UNAVAILABLE)
    assert "Request timeout expired" in caught.value.message()
    progress = [e for e in drain(stream) if isinstance(e, Answer)]
    assert not any(a.final for a in progress), "the long request must still be decoding"
    produced = max([first.params["completion_tokens"], *(a.params["completion_tokens"] for a in progress)])
    elapsed = time.monotonic() - started
    remaining_s = (1900 - produced) * elapsed / produced
    stream.close(cancel=True)
    cancelled = time.monotonic()
    # Not cancelled, the long request would hold the only place for `remaining_s` more.
    answer = infer(client, "one-seq-llm", "hello", max_tokens=4, temperature=0, ignore_eos=True,
                   queue_timeout_us=int(min(remaining_s / 2, 5.0) * 1e6))
    waited = time.monotonic() - cancelled
    assert answer.params["completion_tokens"] == 4
    assert waited < remaining_s / 2, f"waited {waited:.2f}s; the long request had {remaining_s:.2f}s to go"


def test_a_full_queue_is_resource_exhausted_and_cancelled_streams_leave_it(stack: Stack) -> None:
    long_stream, queued = Stream(stack.client()), Stream(stack.client())
    client = stack.client()
    try:
        long_stream.send("one-seq-llm", "x", max_tokens=1900, temperature=0, ignore_eos=True)
        first = long_stream.next()
        assert isinstance(first, Answer) and not first.final
        for i in range(2):  # the version's max_queue_size
            queued.send("one-seq-llm", "hello", request_id=f"q{i}", max_tokens=4, temperature=0)
        time.sleep(1.0)
        with pytest.raises(InferenceServerException) as caught:
            infer(client, "one-seq-llm", "hello", max_tokens=4, temperature=0)
        assert caught.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "queue is full" in caught.value.message()
    finally:
        long_stream.close(cancel=True)
        queued.close(cancel=True)
    # The cancelled running and queued requests leave the worker (a cancel reaches it asynchronously,
    # so the queue may still look full for a moment); then the next request runs.
    deadline = time.monotonic() + 3.0
    while True:
        try:
            answer = infer(client, "one-seq-llm", "hello", max_tokens=4, temperature=0, ignore_eos=True,
                           queue_timeout_us=5_000_000)
            break
        except InferenceServerException as exc:
            if exc.status() != str(grpc.StatusCode.RESOURCE_EXHAUSTED) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert answer.params["completion_tokens"] == 4


def test_requests_spread_over_instances_and_a_killed_worker_fails_only_its_own(stack: Stack) -> None:
    workers = worker_processes(stack, "two-llm")
    assert len(workers) == 2
    streams = [Stream(stack.client(), grpc_errors=True), Stream(stack.client(), grpc_errors=True)]
    try:
        for i, stream in enumerate(streams):
            stream.send("two-llm", "x", request_id=f"r{i}", max_tokens=480, temperature=0, ignore_eos=True)
            first = stream.next()
            assert isinstance(first, Answer) and not first.final
        victim = workers[0]
        victim.kill()
        outcomes = []
        for stream in streams:
            try:
                outcomes.append(stream.until_final(120)[-1].params["finish_reason"])
            except InferenceServerException as exc:
                outcomes.append(f"{exc.status()} {exc.message()}")
    finally:
        for stream in streams:
            stream.close()
    # One generation per instance (least loaded): exactly one of them died with its worker.
    failed = [o for o in outcomes if o != "length"]
    assert len(failed) == 1, outcomes
    assert failed[0].startswith(str(grpc.StatusCode.UNAVAILABLE)) and "exited during the generation" in failed[0]
    # The worker comes back, and the version serves again on both instances.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = worker_processes(stack, "two-llm")
        if len(now) == 2 and victim.pid not in {p.pid for p in now}:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the killed worker was not restarted")
    for _ in range(4):
        assert infer(stack.client(), "two-llm", "x", max_tokens=3, temperature=0,
                     ignore_eos=True).params["completion_tokens"] == 3


def test_the_model_loads_only_in_sandboxed_workers_sharing_the_cached_weights(stack: Stack) -> None:
    assert stack.inference.proc is not None
    service = psutil.Process(stack.inference.proc.pid)
    assert not any(m.path.endswith(".safetensors") for m in service.memory_maps())
    assert not any("transformers" in m.path for m in service.memory_maps())
    workers = worker_processes(stack, "two-llm")
    assert len(workers) == 2
    mapped = [{m.path for m in w.memory_maps() if m.path.endswith(".safetensors")} for w in workers]
    assert mapped[0] == mapped[1] and len(mapped[0]) == 1, "both instances map the one cached file"
    path = Path(next(iter(mapped[0])))
    assert path.parent.name == "checkpoint" and not os.access(path, os.W_OK) or os.geteuid() == 0
    assert oct(path.stat().st_mode & 0o777) == oct(0o444)
    if os.geteuid() == 0:  # a root service runs its workers as an unprivileged user
        assert all(w.uids().real == 65534 for w in workers)
