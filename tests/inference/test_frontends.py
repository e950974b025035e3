"""Several processes accept on the inference port (docs/inference.md, "Frontends"): a real service
with `--frontends 3` (the core and two frontend processes), driven over many connections."""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from services.common.authz import TOKEN_METADATA_KEY
from tests.inference import models
from tests.inference.conftest import Registry, inference_args, start_inference
from tests.support.identity import session_identities
from tests.support.procs import ServiceProcess

# Separate TCP connections: grpc shares one connection between channels of a process otherwise.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
CONNECTIONS = 32


def frontend_pids(proc: ServiceProcess, count: int, timeout: float = 60.0) -> list[int]:
    assert proc.proc is not None
    deadline = time.monotonic() + timeout
    while True:
        pids = []
        for child in psutil.Process(proc.proc.pid).children():
            try:
                if "services.inference.frontend" in " ".join(child.cmdline()):
                    pids.append(child.pid)
            except psutil.Error:
                continue  # a frontend that just died (a zombie until the core reaps it)
        if len(pids) == count or time.monotonic() > deadline:
            return pids
        time.sleep(0.1)


def accepted_by(pid: int, port: int) -> int:
    """Connections process `pid` holds on the service's port (accepted there)."""
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> models.Artifact:
    return models.write_mlp(tmp_path_factory.mktemp("models"), "torchscript")


@pytest.fixture(scope="module")
def server(registry: Registry, mlp: models.Artifact, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServiceProcess]:
    # A long queue delay under strict timing: requests sent together wait for each other.
    registry.register("mlp", mlp, alias="production", max_batch_size=CONNECTIONS,
                      max_queue_delay_us=400_000, strict_queue_delay=True)
    proc = start_inference(inference_args(registry, tmp_path_factory.mktemp("cache"), "--frontends", "3"))
    proc.wait_ready("mlp")
    assert len(frontend_pids(proc, 2)) == 2
    yield proc
    proc.stop()


def infer(address: str, x: np.ndarray) -> np.ndarray:
    with tc.InferenceServerClient(address, channel_args=OWN_CONNECTION) as client:
        tensor = tc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("mlp", [tensor])
        return result.as_numpy("output")  # type: ignore[no-any-return]


def statistics(address: str) -> service_pb2.ModelStatisticsResponse:
    with grpc.insecure_channel(address, options=OWN_CONNECTION) as channel:
        return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            service_pb2.ModelStatisticsRequest(name="mlp"), timeout=10)


def test_connections_spread_over_processes_and_batches_form_across_them(
        server: ServiceProcess, mlp: models.Artifact) -> None:
    before = statistics(server.address).model_stats[0]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 10), dtype=np.float32) for _ in range(CONNECTIONS)]
    clients = [tc.InferenceServerClient(server.address, channel_args=OWN_CONNECTION) for _ in xs]
    try:
        for client in clients:
            assert client.is_server_live()  # each connects now, to whichever process the kernel picks
        pids = [server.proc.pid, *frontend_pids(server, 2)]  # type: ignore[union-attr]
        held = {pid: accepted_by(pid, server.port) for pid in pids}
        assert sum(held.values()) >= CONNECTIONS
        assert all(n > 0 for n in held.values()), f"connections per process: {held}"
        results: list[np.ndarray | None] = [None] * len(xs)
        barrier = threading.Barrier(len(xs))

        def call(i: int) -> None:
            tensor = tc.InferInput("input", [1, 10], "FP32")
            tensor.set_data_from_numpy(xs[i])
            barrier.wait()
            results[i] = clients[i].infer("mlp", [tensor]).as_numpy("output")

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for client in clients:
            client.close()
    expected = mlp.expected({"input": np.concatenate(xs)})["output"]
    np.testing.assert_allclose(np.concatenate(results), expected, rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]
    # Statistics are the core's own: every call counted once, whichever process accepted it.
    after = statistics(server.address).model_stats[0]
    assert after.inference_count - before.inference_count == CONNECTIONS
    # Requests accepted by three processes met in one batcher: far fewer batches than requests.
    assert after.execution_count - before.execution_count <= 3


def test_every_process_answers_every_rpc_and_errors_keep_their_status(server: ServiceProcess) -> None:
    for _ in range(12):
        with tc.InferenceServerClient(server.address, channel_args=OWN_CONNECTION) as client:
            assert client.is_server_ready()
            assert client.get_model_metadata("mlp").name == "mlp"  # proxied to the core
            with pytest.raises(InferenceServerException) as info:  # over the link, refused by the core
                client.infer("mlp", [tc.InferInput("input", [1, 3], "FP32").set_data_from_numpy(
                    np.zeros((1, 3), np.float32))])
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "input" in info.value.message()
            with pytest.raises(InferenceServerException) as missing:
                client.infer("nope", [tc.InferInput("input", [1, 10], "FP32").set_data_from_numpy(
                    np.zeros((1, 10), np.float32))])
            assert missing.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT")


def test_streams_cross_every_process(server: ServiceProcess, mlp: models.Artifact) -> None:
    x = np.arange(10, dtype=np.float32).reshape(1, 10)
    expected = mlp.expected({"input": x})["output"]
    for _ in range(8):  # eight connections: streams accepted by the core and by frontends
        answers: queue.Queue[Any] = queue.Queue()
        with tc.InferenceServerClient(server.address, channel_args=OWN_CONNECTION) as client:
            client.start_stream(callback=lambda result, error, answers=answers: answers.put(error or result))
            for request_id in ("a", "b", "c"):
                tensor = tc.InferInput("input", [1, 10], "FP32").set_data_from_numpy(x)
                client.async_stream_infer("mlp", [tensor], request_id=request_id)
            bad = tc.InferInput("input", [1, 3], "FP32").set_data_from_numpy(np.zeros((1, 3), np.float32))
            client.async_stream_infer("mlp", [bad], request_id="bad")
            got = [answers.get(timeout=30) for _ in range(4)]
            client.stop_stream()
        results = [g for g in got if not isinstance(g, InferenceServerException)]
        errors = [g for g in got if isinstance(g, InferenceServerException)]
        assert sorted(r.get_response().id for r in results) == ["a", "b", "c"]
        for result in results:
            np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)
        assert len(errors) == 1 and "input" in errors[0].message()  # in-band, the stream went on


def test_a_killed_frontend_is_replaced_and_the_port_keeps_answering(server: ServiceProcess) -> None:
    old = frontend_pids(server, 2)
    psutil.Process(old[0]).send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        now = frontend_pids(server, 2, timeout=0)
        if len(now) == 2 and old[0] not in now:
            break
        assert time.monotonic() < deadline, f"frontend not replaced: {now}"
        time.sleep(0.2)
    x = np.ones((1, 10), np.float32)
    for _ in range(8):
        assert infer(server.address, x).shape == (1, 10)


def test_frontends_demand_the_same_identity_as_the_core(
        registry: Registry, mlp: models.Artifact, tmp_path: Path) -> None:
    ids = session_identities()
    registry.register("mlp-id", mlp, alias="production")
    proc = start_inference(inference_args(registry, tmp_path / "cache", "--frontends", "2"),
                           env=ids.service_env("inference"))
    try:
        proc.wait_ready("mlp-id")
        assert len(frontend_pids(proc, 1)) == 1
        good = ((TOKEN_METADATA_KEY, ids.token("gateway")),)
        x = np.ones((1, 10), np.float32)
        statuses = set()
        for _ in range(16):
            with tc.InferenceServerClient(proc.address, channel_args=OWN_CONNECTION) as client:
                tensor = tc.InferInput("input", [1, 10], "FP32").set_data_from_numpy(x)
                with pytest.raises(InferenceServerException) as info:
                    client.infer("mlp-id", [tensor])
                statuses.add(info.value.status())
                assert client.infer("mlp-id", [tensor], headers=dict(good)).as_numpy("output").shape == (1, 10)
                assert client.get_model_metadata("mlp-id", headers=dict(good)).name == "mlp-id"
                with pytest.raises(InferenceServerException) as meta:
                    client.get_model_metadata("mlp-id")
                statuses.add(meta.value.status())
        assert statuses == {"StatusCode.UNAUTHENTICATED"}
    finally:
        proc.stop()


def test_sigterm_drains_calls_in_flight_on_every_process(
        registry: Registry, mlp: models.Artifact, tmp_path: Path) -> None:
    registry.register("slow", mlp, alias="production", max_batch_size=64, max_queue_delay_us=1_500_000,
                      strict_queue_delay=True)
    proc = start_inference(inference_args(registry, tmp_path / "cache", "--frontends", "3"))
    proc.wait_ready("slow")
    frontend_pids(proc, 2)
    clients = [tc.InferenceServerClient(proc.address, channel_args=OWN_CONNECTION) for _ in range(16)]
    outcomes: list[str] = []

    def call(client: tc.InferenceServerClient) -> None:
        tensor = tc.InferInput("input", [1, 10], "FP32").set_data_from_numpy(np.ones((1, 10), np.float32))
        try:
            client.infer("slow", [tensor], client_timeout=30)
            outcomes.append("ok")
        except InferenceServerException as exc:
            outcomes.append(str(exc.status()))

    try:
        for client in clients:
            client.is_server_live()
        threads = [threading.Thread(target=call, args=(c,)) for c in clients]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # every call is waiting in the batcher's 1.5 s window
        proc.signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert outcomes == ["ok"] * len(clients)
        assert proc.proc is not None and proc.proc.wait(30) == 0
    finally:
        for client in clients:
            client.close()
        proc.stop()


def test_the_frontend_proxies_only_the_core_s_methods_with_their_streaming_shapes() -> None:
    from services.inference.frontend import method_shape

    assert method_shape("/inference.GRPCInferenceService/ModelMetadata") == (False, False)
    assert method_shape("/inference.GRPCInferenceService/ModelStreamInfer") == (True, True)
    assert method_shape("/grpc.health.v1.Health/Watch") == (False, True)
    assert method_shape("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == (True, True)
    assert method_shape("/aiaas.registry.v1.ModelRegistry/PutRecord") is None  # not the core's
    assert method_shape("/inference.GRPCInferenceService/a/b") is None


@pytest.mark.parametrize(("cores", "setting", "processes"), [(1, 0, 1), (2, 0, 1), (3, 0, 1), (4, 0, 4), (16, 0, 16),
                                                            (2, 3, 3), (64, 1, 1)])
def test_frontends_default_to_one_per_core_from_four_cores(monkeypatch: pytest.MonkeyPatch, cores: int,
                                                           setting: int, processes: int) -> None:
    from services.common import cpus
    from services.inference.settings import InferenceSettings

    monkeypatch.setattr(cpus, "available_cores", lambda: cores)
    assert InferenceSettings(frontends=setting).frontend_count == processes
