"""A busy replica is not a dead one (issue 12, item 1), with real processes: one inference replica
whose queue times requests out (the `timeout` parameter: Triton's UNAVAILABLE "Request timeout
expired") or is full
(RESOURCE_EXHAUSTED). The gateway passes those answers through, stays ready, and keeps the
replica in the pool: the next good request is served at once."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from aiaas.gateway_client import GatewayClient
from tests.gateway.stack import (
    ADMIN_TOKEN,
    Registry,
    start_gateway,
    start_inference_replica,
    start_registry,
    wait_model,
)
from tests.inference import models
from tests.support.procs import ServiceProcess

HOLD_US = 3_000_000  # the held models wait this long for a full batch: requests sit in the queue


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, str]]:
    registry = Registry(start_registry(tmp_path_factory.mktemp("registry")))
    mlp = models.write_mlp(tmp_path_factory.mktemp("models"), "torchscript", sizes=(4, 8, 3))
    registry.register("mlp", mlp, alias="production", max_batch_size=8)
    registry.register("held-timeout", mlp, alias="production", max_batch_size=64, max_queue_delay_us=HOLD_US, strict_queue_delay=True)
    registry.register("held", mlp, alias="production", max_batch_size=64, max_queue_delay_us=HOLD_US,
                      strict_queue_delay=True,
                      max_queue_size=2)
    registry.register("held-config-timeout", mlp, alias="production", max_batch_size=64,
                      max_queue_delay_us=HOLD_US,
                      strict_queue_delay=True, default_timeout_us=200_000)
    replica = start_inference_replica(registry, tmp_path_factory.mktemp("cache"))
    models_ = ["mlp", "held-timeout", "held", "held-config-timeout"]
    for model in models_:
        wait_model(replica, model)
    proc = start_gateway(registry, [replica], None)
    admin = GatewayClient(proc.address, api_key=ADMIN_TOKEN)
    _, token = admin.create_key("busy", models=models_, roles=["infer", "read"])
    yield proc, token
    admin.close()
    proc.stop()
    replica.stop()
    registry.close()
    registry.proc.stop()


def _inputs() -> list[tc.InferInput]:
    tensor = tc.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    return [tensor]


def _served_at_once(client: tc.InferenceServerClient, headers: dict[str, str]) -> None:
    started = time.monotonic()
    result = client.infer("mlp", _inputs(), headers=headers)
    assert result.as_numpy("output").shape == (1, 3)
    assert time.monotonic() - started < 1.0


def test_a_queue_timeout_is_passed_through_and_the_gateway_stays_ready(gateway: tuple[ServiceProcess, str]) -> None:
    proc, token = gateway
    headers = {"authorization": f"Bearer {token}"}
    with tc.InferenceServerClient(proc.address) as client:
        for _ in range(5):  # more than --eject-after-failures (3)
            with pytest.raises(InferenceServerException) as info:
                client.infer("held-timeout", _inputs(), headers=headers, timeout=200_000)
            assert client.is_server_ready()  # an answer, even UNAVAILABLE, shows the replica is up
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            assert info.value.message() == "Request timeout expired"  # the replica's answer, as it came
        _served_at_once(client, headers)
        assert client.is_server_ready()


@pytest.mark.parametrize("client_timeout", [None, 5.0])
def test_a_serving_config_queue_timeout_is_unavailable_whatever_the_callers_deadline(
    gateway: tuple[ServiceProcess, str], client_timeout: float | None
) -> None:
    # The gateway always forwards a deadline (the caller's, or --default-timeout-s): the replica's
    # queue timeout must still answer UNAVAILABLE, as Triton does, not DEADLINE_EXCEEDED.
    proc, token = gateway
    headers = {"authorization": f"Bearer {token}"}
    with tc.InferenceServerClient(proc.address) as client:
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            client.infer("held-config-timeout", _inputs(), headers=headers, client_timeout=client_timeout)
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert info.value.message() == "Request timeout expired"
        assert time.monotonic() - started < HOLD_US / 1e6  # the 200 ms queue timeout, not the held batch
        _served_at_once(client, headers)


def test_a_full_queue_is_passed_through_and_the_gateway_stays_ready(gateway: tuple[ServiceProcess, str]) -> None:
    proc, token = gateway
    headers = {"authorization": f"Bearer {token}"}
    answers: queue.Queue[Any] = queue.Queue()
    with tc.InferenceServerClient(proc.address) as client:
        for _ in range(2):
            client.async_infer("held", _inputs(), headers=headers, callback=lambda result, error: answers.put(error))
        time.sleep(0.5)  # the two are queued on the replica for HOLD_US
        for _ in range(5):
            with pytest.raises(InferenceServerException) as info:
                client.infer("held", _inputs(), headers=headers)
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "queue" in info.value.message()
        assert client.is_server_ready()
        _served_at_once(client, headers)
        assert [answers.get(timeout=HOLD_US / 1e6 + 10) for _ in range(2)] == [None, None]
