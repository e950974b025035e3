"""The API-key attacks of issue 13, replayed against real processes: a registry, an inference
replica, a monitor and gateway processes, driven with tritonclient, raw gRPC and the SDK.

Each test is one attack and the status it now meets: a scoped admin minting a `*` key
(PERMISSION_DENIED), a revoked or expired key used on an open stream (UNAUTHENTICATED, the stream
ends), the bootstrap key that could not be revoked (revoked, and still refused after a restart),
a caller choosing its own priority (PERMISSION_DENIED), and made-up model names becoming metric
series (all counted as `_unknown`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from aiaas.api_keys import parse_token
from aiaas.gateway_client import GatewayClient
from aiaas.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from aiaas.records import API_KEY
from aiaas.registry.v1 import registry_pb2
from aiaas.up import KeyRefused, wait_model_ready
from services.common.reporting import UNKNOWN_MODEL
from tests.gateway.stack import (
    ADMIN_TOKEN,
    PEPPER,
    Registry,
    start_gateway,
    start_inference_replica,
    start_registry,
    wait_model,
    wait_until,
)
from tests.inference import models
from tests.support.procs import ServiceProcess
from tests.support.servers import free_port

MODEL = "tiny"
# Seconds a gateway may take to see a change made through another one (the registry's feed).
FEED_S = 15.0


@dataclass
class Stack:
    registry: Registry
    replica: ServiceProcess
    monitor: ServiceProcess
    gateways: list[ServiceProcess]
    metrics_port: int
    admin: GatewayClient

    def client(self, index: int = 0) -> tc.InferenceServerClient:
        return tc.InferenceServerClient(self.gateways[index].address)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    registry = Registry(start_registry(tmp_path_factory.mktemp("registry")))
    artifact = models.write_mlp(tmp_path_factory.mktemp("models"), "torchscript", sizes=(4, 8, 3), seed=1)
    registry.register(MODEL, artifact, alias="production", max_batch_size=8)
    registry.register("other", artifact, alias="production", max_batch_size=8)
    replica = start_inference_replica(registry, tmp_path_factory.mktemp("cache"))
    wait_model(replica, MODEL)
    wait_model(replica, "other")
    monitor = ServiceProcess("monitor", ["--registry-url", ""]).start()
    metrics_port = free_port()
    gateways = [start_gateway(registry, [replica], None, "--metrics-port", str(metrics_port), monitor=monitor.address),
                start_gateway(registry, [replica], None, monitor=monitor.address)]
    admin = GatewayClient(gateways[0].address, api_key=ADMIN_TOKEN)
    yield Stack(registry, replica, monitor, gateways, metrics_port, admin)
    admin.close()
    for proc in [*gateways, replica, monitor]:
        proc.stop()
    registry.close()
    registry.proc.stop()


def headers(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def inputs() -> list[tc.InferInput]:
    tensor = tc.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    return [tensor]


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def infer_error(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# 1. A key scoped to one model minted an unscoped `*` admin key -------------------------------

def test_a_scoped_admin_cannot_grant_or_touch_what_is_beyond_its_models(stack: Stack) -> None:
    _, scoped = stack.admin.create_key("team-admin", models=[MODEL], roles=["admin"])
    bootstrap_id, _ = parse_token(ADMIN_TOKEN)
    with GatewayClient(stack.gateways[0].address, api_key=scoped) as team:
        error = rpc_error(lambda: team.create_key("escalate", models=["*"], roles=["admin"]))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert "may not create a key with more than it holds: models '*' (outside its scope 'tiny')" in (
            error.details() or "")  # type: ignore[attr-defined]
        error = rpc_error(lambda: team.create_key("sideways", models=[MODEL, "oth*"]))
        assert "models 'oth*'" in (error.details() or "")  # type: ignore[attr-defined]
        # Unset models are the creator's own, not `*`.
        worker, _ = team.create_key("worker", roles=["infer"])
        assert list(worker.models) == [MODEL]
        # Nor may it revoke, expire or even see a broader key, or manage another model's route.
        for attempt in (lambda: team.revoke_key(bootstrap_id, "takeover"), lambda: team.expire_key(bootstrap_id),
                        lambda: team.get_route("other"), lambda: team.set_route("other", {"production": 100})):
            error = rpc_error(attempt)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error  # type: ignore[attr-defined]
        listed = {k.key_id for k in team.list_keys(include_inactive=True)}
        assert worker.key_id in listed and bootstrap_id not in listed
    assert bootstrap_id in {k.key_id for k in stack.admin.list_keys()}


def test_a_key_cannot_mint_one_that_outlives_it(stack: Stack) -> None:
    admin_key, temporary = stack.admin.create_key("temp-admin", roles=["admin"], expires_in_s=3600)
    ends = admin_key.expire_time.ToNanoseconds() / 1e9
    with GatewayClient(stack.gateways[0].address, api_key=temporary) as temp:
        error = rpc_error(lambda: temp.create_key("forever", roles=["infer"], expires_in_s=7 * 86400))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert "after its own" in (error.details() or "")  # type: ignore[attr-defined]
        inherited, _ = temp.create_key("inherits", roles=["infer"])
        assert inherited.expire_time.ToNanoseconds() / 1e9 == pytest.approx(ends, abs=1e-3)


# 2. A revoked key kept working on an already open ModelStreamInfer ---------------------------

def stream_request(index: int) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=MODEL, id=str(index),
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[np.full((1, 4), index, np.float32).tobytes()],
    )


async def stream_until_refused(gateway: str, token: str, change: Callable[[], object]) -> tuple[grpc.aio.AioRpcError, int]:
    """Open a stream, see 3 answers, make `change`, then send on the same stream until it is refused.

    Returns the error and how many requests were still answered after `change` returned."""
    async with grpc.aio.insecure_channel(gateway) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(metadata=tuple(headers(token).items()),
                                                                           timeout=120)
        for index in range(3):
            await call.write(stream_request(index))
            reply = await call.read()
            assert not reply.error_message and reply.infer_response.id == str(index)
        await asyncio.to_thread(change)
        deadline = time.monotonic() + FEED_S
        answered = 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while time.monotonic() < deadline:
                await call.write(stream_request(100 + answered))
                reply = await call.read()
                assert not reply.error_message, reply.error_message
                answered += 1
                await asyncio.sleep(0.05)
        assert await call.code() == grpc.StatusCode.UNAUTHENTICATED  # the stream itself ended
        return caught.value, answered


async def test_revoking_a_key_ends_its_open_stream_on_another_gateway(stack: Stack) -> None:
    """Revoked through gateway 0; the stream is on gateway 1, which learns it from the registry's feed."""
    _, token = stack.admin.create_key("streamer", models=[MODEL], roles=["infer"])
    key_id, _ = parse_token(token)
    error, answered = await stream_until_refused(stack.gateways[1].address, token,
                                                 lambda: stack.admin.revoke_key(key_id, "stolen"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "API key revoked"
    print(f"requests answered on gateway 1 after the revocation returned on gateway 0: {answered}")


async def test_expiring_a_key_ends_its_open_stream(stack: Stack) -> None:
    _, token = stack.admin.create_key("streamer-2", models=[MODEL], roles=["infer"])
    key_id, _ = parse_token(token)
    error, answered = await stream_until_refused(stack.gateways[0].address, token,
                                                 lambda: stack.admin.expire_key(key_id))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and error.details() == "API key expired"
    assert answered == 0  # the gateway that made the change refuses the very next request


# 3. The bootstrap admin key of `aiaas up` could not be revoked -----------------------------

BOOTSTRAP = "aiaas_b00752b0_a-second-bootstrap-secret-for-tests"


def start_bootstrapped_gateway(stack: Stack) -> ServiceProcess:
    return ServiceProcess("gateway", [
        "--registry-url", stack.registry.address, "--inference-targets", stack.replica.address,
        "--key-pepper", PEPPER, "--bootstrap-admin-key", BOOTSTRAP, "--grace-period-s", "1",
    ]).start(timeout=60)


def refused(gateway: str, token: str) -> grpc.RpcError | None:
    with GatewayClient(gateway, api_key=token, timeout=10) as client:
        try:
            client.list_keys()
        except grpc.RpcError as exc:
            return exc
    return None


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    from aiaas.cli.main import main as cli_main

    capsys.readouterr()
    assert cli_main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_the_bootstrap_key_is_a_stored_key_that_revocation_turns_off_for_good(
        stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    bootstrap_id, secret = parse_token(BOOTSTRAP)
    gateway = start_bootstrapped_gateway(stack)
    try:
        # Stored in the registry like any key: hashed, listed, known to every gateway.
        record = stack.registry.stub.GetRecord(registry_pb2.GetRecordRequest(kind=API_KEY.kind, name=bootstrap_id),
                                               timeout=10).record
        assert secret.encode() not in record.data
        with GatewayClient(gateway.address, api_key=BOOTSTRAP) as boot:
            assert {k.key_id: k.created_by for k in boot.list_keys()}[bootstrap_id] == "bootstrap"
        wait_until(lambda: refused(stack.gateways[1].address, BOOTSTRAP) is None, timeout=FEED_S)
        # Rotation as docs/gateway.md tells it: a new admin key like it, then the bootstrap key revoked.
        rotated = run_cli(capsys, "keys", "rotate", bootstrap_id, "--gateway", gateway.address,
                          "--api-key", BOOTSTRAP)
        assert rotated["replaces"] == bootstrap_id and rotated["roles"] == ["admin"] and rotated["models"] == ["*"]
        own = rotated["token"]
        error = refused(gateway.address, BOOTSTRAP)
        assert error is not None and error.details() == "API key revoked"  # type: ignore[attr-defined]
        wait_until(lambda: refused(stack.gateways[1].address, BOOTSTRAP) is not None, timeout=FEED_S)
        # `aiaas up` checks its demo with the key it kept: it now says so instead of waiting for nothing.
        with pytest.raises(KeyRefused, match="API key revoked"):
            wait_model_ready(gateway.address, MODEL, time.monotonic() + 30, threading.Event(), BOOTSTRAP)
    finally:
        gateway.stop()
    restarted = start_bootstrapped_gateway(stack)
    try:
        # Started again with the same token: the revocation record wins, from the first call.
        for address in (restarted.address, stack.gateways[0].address):
            error = refused(address, BOOTSTRAP)
            assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            assert error.details() == "API key revoked"  # type: ignore[attr-defined]
        assert refused(restarted.address, own) is None
    finally:
        restarted.stop()


# 4. Callers could set their own priority ------------------------------------------------------

def test_only_keys_with_the_priority_role_choose_a_priority(stack: Stack) -> None:
    _, plain = stack.admin.create_key("plain", models=[MODEL], roles=["infer"])
    _, urgent = stack.admin.create_key("urgent", models=[MODEL], roles=["infer", "priority"])
    with stack.client() as client:
        error = infer_error(lambda: client.infer(MODEL, inputs(), headers=headers(plain), priority=1))
        assert error.status() == "StatusCode.PERMISSION_DENIED"
        assert "lacks the 'priority' role: it may not set the request's 'priority' parameter" in error.message()
        # The default level stays open to every key; the priority role may choose another.
        assert client.infer(MODEL, inputs(), headers=headers(plain)).as_numpy("output").shape == (1, 3)
        assert client.infer(MODEL, inputs(), headers=headers(urgent), priority=1).as_numpy("output").shape == (1, 3)
        client.infer(MODEL, inputs(), headers=headers(ADMIN_TOKEN), priority=1)


# 5. Model names chosen by a caller became metric series ---------------------------------------

async def test_made_up_model_names_are_one_metrics_label(stack: Stack) -> None:
    _, scoped = stack.admin.create_key("prober", models=[MODEL], roles=["infer"])
    with stack.client() as client:
        for name, token, status in ([(f"junk-{i}", scoped, "PERMISSION_DENIED") for i in range(300)]
                                    + [(f"nothing-{i}", ADMIN_TOKEN, "NOT_FOUND") for i in range(20)]):
            error = infer_error(functools.partial(client.infer, name, inputs(), headers=headers(token)))
            assert error.status() == f"StatusCode.{status}"

    async def unknown_count() -> tuple[int, set[str]]:
        async with grpc.aio.insecure_channel(stack.monitor.address) as channel:
            reply = await monitor_pb2_grpc.MonitorStub(channel).QueryMetrics(
                monitor_pb2.QueryMetricsRequest(source="gateway", window_seconds=600), timeout=10)
        names = {s.model for s in reply.series}
        return sum(s.count for s in reply.series if s.model == UNKNOWN_MODEL), names

    deadline = time.monotonic() + FEED_S
    while (found := await unknown_count())[0] < 320 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    count, names = found
    assert count >= 320 and not {n for n in names if n.startswith(("junk-", "nothing-"))}, names
    url = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    labels = set(re.findall(r'model="([^"]*)"', text))
    assert UNKNOWN_MODEL in labels and not {n for n in labels if n.startswith(("junk-", "nothing-"))}, labels
