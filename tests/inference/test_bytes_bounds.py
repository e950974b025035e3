"""Declared shapes are checked against the bytes a request carries before anything is allocated.

Rebuilds issue 10's attack against a real inference process: a 27-byte ModelInfer declaring a
BYTES input of shape [1, 67108864] made the service allocate 512 MiB and stall its event loop.
Also: large BYTES tensors are decoded off the event loop, and one ModelStreamInfer call holds a
bounded number of requests in flight.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc
import numpy as np
import psutil
import pytest
import torch
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from aiaas.tensors import TensorSpec
from services.common.datatypes import (
    MAX_BYTES_ELEMENT_BYTES,
    MAX_BYTES_ELEMENTS,
    MAX_BYTES_REQUEST_BYTES,
    MAX_RANK,
    BytesBudget,
    check_raw_size,
    deserialize_bytes_tensor,
)
from services.common.errors import InvalidArgument
from services.inference.servicer import MAX_STREAM_IN_FLIGHT
from tests.inference import models
from tests.inference.conftest import Registry, inference_args, start_inference, wait_model
from tests.support.procs import ServiceProcess

MIB = 1 << 20
LIE = [1, 67108864]


class _Busy(torch.nn.Module):
    """A fixed amount of work per batch (a few milliseconds), so a burst of requests queues up."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) / 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(100):
            x = torch.tanh(x @ self.weight)
        return x


def write_busy(directory: Path) -> models.Artifact:
    path = directory / "busy.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_Busy().eval()), str(path))
    specs = (TensorSpec("x", "FP32", (-1, 256)),), (TensorSpec("y", "FP32", (-1, 256)),)
    return models.Artifact(str(path), "torchscript", specs[0], specs[1], lambda inputs: {})


@dataclass
class Served:
    proc: ServiceProcess
    mlp: models.Artifact

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid


@pytest.fixture(scope="module")
def served(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("models")
    registry.register("words", models.write_identity(directory, "onnx", "BYTES"), alias="production",
                      max_batch_size=8)
    mlp = models.write_mlp(directory, "torchscript", sizes=(10, 50, 10))
    registry.register("mlp", mlp, alias="production", max_batch_size=8)
    # Slow enough that a burst of requests queues up; the queue holds exactly one stream's cap.
    registry.register("busy", write_busy(directory), alias="production", max_batch_size=8,
                      max_queue_size=MAX_STREAM_IN_FLIGHT)
    proc = start_inference(inference_args(registry, tmp_path_factory.mktemp("cache"), "--worker-mode", "thread"))
    for model in ("words", "mlp", "busy"):
        wait_model(proc, model)
    yield Served(proc, mlp)
    proc.stop()


def infer_raw(address: str, request: service_pb2.ModelInferRequest, timeout: float = 30.0) -> Any:
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1),
                                                 ("grpc.max_receive_message_length", -1)]) as channel:
        return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout)


def bytes_request(shape: list[int], raw: bytes, model: str = "words") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(raw)
    return request


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def timed_small_infer(client: tc.InferenceServerClient, x: np.ndarray) -> float:
    tensor = tc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    started = time.perf_counter()
    client.infer("mlp", [tensor])
    return time.perf_counter() - started


class PeakRss:
    """Samples a process's RSS every few milliseconds while in use; `grown` is peak minus start."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.start = self.peak = int(self.process.memory_info().rss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, int(self.process.memory_info().rss))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, int(self.process.memory_info().rss))

    @property
    def grown(self) -> int:
        return self.peak - self.start


def test_the_shape_lie_is_refused_before_any_allocation(served: Served) -> None:
    lie = bytes_request(LIE, b"")
    assert lie.ByteSize() < 40  # the attack: a few bytes on the wire
    errors: list[grpc.RpcError] = []

    def send() -> None:
        for _ in range(2):
            try:
                infer_raw(served.proc.address, lie)
            except grpc.RpcError as exc:
                errors.append(exc)

    with tc.InferenceServerClient(served.proc.address) as client:
        x = np.ones((1, 10), np.float32)
        timed_small_infer(client, x)  # warm: the baseline includes the model's first run
        with PeakRss(served.pid) as memory:
            senders = [threading.Thread(target=send) for _ in range(4)]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
        assert memory.grown < 50 * MIB, f"inference RSS peaked {memory.grown / MIB:.0f} MiB up under 8 shape lies"
        assert len(errors) == 8
        for error in errors:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = error.details() or ""
            assert "input 'INPUT0' for model 'words'" in details
            assert "[1,67108864] declares 67108864 BYTES elements" in details
            assert "need at least 268435456 bytes" in details and "holds 0 bytes" in details
        # Answered promptly and correctly right after.
        assert timed_small_infer(client, x) < 5.0
        tensor = tc.InferInput("input", [1, 10], "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_allclose(client.infer("mlp", [tensor]).as_numpy("output"),
                                   served.mlp.expected({"input": x})["output"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model, datatype, shape, raw, fragment", [
    ("words", "BYTES", [1 << 62, 1 << 62], b"\0" * 8, "declares 21267647932558653966460912964485513216 BYTES"),
    ("words", "BYTES", [1, -3], b"", "negative dimension in shape [1,-3]"),
    ("words", "BYTES", [1] * (MAX_RANK + 1), b"\0\0\0\0", f"{MAX_RANK + 1} dimensions, more than {MAX_RANK}"),
    ("words", "BYTES", [1, MAX_BYTES_ELEMENTS + 1], b"\0" * 4 * (MAX_BYTES_ELEMENTS + 1),
     f"over the limit of {MAX_BYTES_ELEMENTS} per request"),
    ("mlp", "FP32", [2, 10], b"\0" * 40, "expected 80 bytes for shape [2,10] of FP32, got 40 bytes"),
])
def test_impossible_shapes_are_invalid_argument(served: Served, model: str, datatype: str, shape: list[int],
                                                raw: bytes, fragment: str) -> None:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0" if model == "words" else "input", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    with pytest.raises(grpc.RpcError) as info:
        infer_raw(served.proc.address, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (info.value.details() or "")


def test_a_large_bytes_tensor_is_decoded_off_the_event_loop(served: Served) -> None:
    # A million short strings that decode element by element, then turn out to carry one
    # trailing byte: all the decoding work, none of the model's. Small requests run meanwhile.
    count = 2_000_000
    element = b"\x04\x00\x00\x00word"
    big = bytes_request([1, count], element * count + b"!")
    outcome: dict[str, Any] = {}

    def send_big() -> None:
        started = time.perf_counter()
        try:
            infer_raw(served.proc.address, big, timeout=120)
        except grpc.RpcError as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.perf_counter() - started

    with tc.InferenceServerClient(served.proc.address) as client:
        x = np.ones((1, 10), np.float32)
        quiet = min(timed_small_infer(client, x) for _ in range(5))
        sender = threading.Thread(target=send_big)
        sender.start()
        latencies = []
        while sender.is_alive():
            latencies.append(timed_small_infer(client, x))
        sender.join()
    error = outcome["error"]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "1 trailing bytes" in error.details()
    # On the event loop the decode held every other request for its whole length (about a
    # second here); off it, a small request waits a few GIL switches at most. Generous bounds:
    # the machine is shared.
    assert len(latencies) >= 3, f"only {len(latencies)} small requests answered during {outcome['seconds']:.2f} s"
    print(f"decode {outcome['seconds']:.2f} s, small requests meanwhile: "
          f"{', '.join(f'{t * 1e3:.0f}' for t in latencies)} ms (quiet {quiet * 1e3:.1f} ms)")
    assert max(latencies) < max(0.3, outcome["seconds"] / 3), (
        f"small request took {max(latencies) * 1e3:.0f} ms while a {outcome['seconds']:.2f} s decode ran "
        f"(quiet: {quiet * 1e3:.1f} ms)")


def test_a_legit_bytes_tensor_round_trips(served: Served) -> None:
    words = np.array([[f"w{i}".encode() for i in range(20_000)]], dtype=object)
    tensor = tc.InferInput("INPUT0", list(words.shape), "BYTES")
    tensor.set_data_from_numpy(words)
    with tc.InferenceServerClient(served.proc.address) as client:
        assert client.infer("words", [tensor]).as_numpy("OUTPUT0").tolist() == words.tolist()


def test_one_stream_holds_at_most_its_cap_in_flight(served: Served) -> None:
    # `busy` queues at most MAX_STREAM_IN_FLIGHT requests and refuses more (RESOURCE_EXHAUSTED,
    # in-band on a stream). A burst several times that size on one stream is all answered: the
    # server never took more than the cap off the stream at once.
    total = 5 * MAX_STREAM_IN_FLIGHT
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    x = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
    tensor = tc.InferInput("x", [1, 256], "FP32")
    tensor.set_data_from_numpy(x)
    with tc.InferenceServerClient(served.proc.address) as client:
        before = rss(served.pid)
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for index in range(total):
            client.async_stream_infer("busy", [tensor], request_id=str(index))
        client.stop_stream()
        answers = [results.get(timeout=60) for _ in range(total)]
    errors = [str(error) for _, error in answers if error is not None]
    assert not errors, f"{len(errors)} of {total} refused, e.g. {errors[0]}"
    assert sorted(int(result.get_response().id) for result, _ in answers) == list(range(total))
    assert rss(served.pid) - before < 50 * MIB


# In-process checks of the bounds themselves (each needs a buffer over a limit to build).

def test_a_bytes_element_over_its_cap_is_refused() -> None:
    length = MAX_BYTES_ELEMENT_BYTES + 1
    raw = length.to_bytes(4, "little") + bytes(length)
    with pytest.raises(InvalidArgument, match=f"over the limit of {MAX_BYTES_ELEMENT_BYTES} per element"):
        deserialize_bytes_tensor(raw, 1)


def test_the_bytes_budget_adds_up_a_requests_inputs() -> None:
    budget = BytesBudget()
    half = MAX_BYTES_ELEMENTS // 2
    check_raw_size("a", "BYTES", [half], 4 * half, budget)
    check_raw_size("b", "BYTES", [half], 4 * half, budget)
    with pytest.raises(InvalidArgument, match="input 'c': the request's BYTES inputs declare"):
        check_raw_size("c", "BYTES", [1], 4, budget)
    with pytest.raises(InvalidArgument, match=f"over the limit of {MAX_BYTES_REQUEST_BYTES} per request"):
        BytesBudget().charge("d", 1, MAX_BYTES_REQUEST_BYTES + 1)


def test_the_lie_fails_in_the_decoder_too() -> None:
    with pytest.raises(InvalidArgument, match="67108864 elements need at least 268435456 bytes"):
        deserialize_bytes_tensor(b"", LIE[1])
