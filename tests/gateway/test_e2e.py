"""End to end through the gateway with tritonclient (sync, aio, streaming): real Redis, registry,
two inference replicas and two gateway processes, shared by the whole module.

The order matters only at the end: the replica-kill and Redis-stop tests run last.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

from aiaas.gateway_client import GatewayClient
from aiaas.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from tests.gateway.stack import (
    ADMIN_TOKEN,
    Registry,
    start_gateway,
    start_inference_replica,
    start_registry,
    wait_model,
    wait_until,
    write_versions,
)
from tests.inference import models
from tests.support.procs import ServiceProcess
from tests.support.servers import RedisServer

MODEL = "tiny"


@dataclass
class Stack:
    redis: RedisServer
    registry: Registry
    replicas: list[ServiceProcess]
    gateways: list[ServiceProcess]
    monitor: ServiceProcess
    versions: list[models.Artifact]
    admin: GatewayClient
    token: str
    cache: Path

    def headers(self, token: str | None = None, **extra: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token or self.token}", **extra}

    def client(self, index: int = 0) -> tc.InferenceServerClient:
        return tc.InferenceServerClient(self.gateways[index].address)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    redis = RedisServer().start()
    registry = Registry(start_registry(tmp_path_factory.mktemp("registry")))
    versions = write_versions(tmp_path_factory.mktemp("models"))
    for artifact, alias in zip(versions, ("production", "canary", "shadow"), strict=True):
        registry.register(MODEL, artifact, alias=alias, max_batch_size=8)
    registry.register("other", versions[0], alias="production", max_batch_size=8)
    cache = tmp_path_factory.mktemp("cache")
    replicas = [start_inference_replica(registry, cache), start_inference_replica(registry, cache)]
    for replica in replicas:
        for version in (1, 2, 3):
            wait_model(replica, MODEL, version)
        wait_model(replica, "other")
    monitor = ServiceProcess("monitor", ["--registry-url", "", "--evaluation-interval-s", "0.2",
                                         "--shadow-min-samples", "5"]).start()
    # With both cores saturated by the rest of the suite, the default 50 ms Redis timeout can expire
    # and fail-open skips quotas for a second (issue 12, item 5): these tests check sharing, not that.
    slow_redis_ok = ("--redis-timeout-ms", "500")
    gateways = [start_gateway(registry, replicas, redis, *slow_redis_ok, monitor=monitor.address),
                start_gateway(registry, replicas, redis, *slow_redis_ok, monitor=monitor.address)]
    admin = GatewayClient(gateways[0].address, api_key=ADMIN_TOKEN)
    _, token = admin.create_key("e2e", models=[MODEL], roles=["infer", "read"])
    yield Stack(redis, registry, replicas, gateways, monitor, versions, admin, token, cache)
    admin.close()
    for proc in [*gateways, *replicas, monitor]:
        proc.stop()
    registry.close()
    registry.proc.stop()
    redis.close()


def make_inputs(batch: int = 1, seed: int = 0, module: object = tc) -> tuple[list[object], np.ndarray]:
    data = np.random.default_rng(seed).standard_normal((batch, 4)).astype(np.float32)
    tensor = module.InferInput("input", [batch, 4], "FP32")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(data)
    return [tensor], data


def expected(stack: Stack, version: int, data: np.ndarray) -> np.ndarray:
    return stack.versions[version - 1].expected({"input": data})["output"]


def test_reads_through_the_gateway(stack: Stack) -> None:
    with stack.client() as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL, headers=stack.headers())
        metadata = client.get_model_metadata(MODEL, headers=stack.headers())
        assert metadata.name == MODEL and "1" in metadata.versions
        assert [i.name for i in metadata.inputs] == ["input"]
        assert client.get_model_config(MODEL, headers=stack.headers()).config.max_batch_size == 8
        index = client.get_model_repository_index(headers=stack.headers())
        # The key is scoped to `tiny`: `other` is served but not shown.
        assert {m.name for m in index.models} == {MODEL}
        admin_index = client.get_model_repository_index(headers=stack.headers(ADMIN_TOKEN))
        assert {m.name for m in admin_index.models} == {MODEL, "other"}
        client.infer(MODEL, make_inputs()[0], headers=stack.headers())
        stats = client.get_inference_statistics(MODEL, headers=stack.headers())
        assert stats.model_stats and all(s.name == MODEL for s in stats.model_stats)


def test_infer_sync_aio_and_streaming(stack: Stack) -> None:
    inputs, data = make_inputs(batch=3, seed=1)
    with stack.client() as client:
        result = client.infer(MODEL, inputs, headers=stack.headers(), request_id="sync-1")
        assert result.get_response().model_version == "1" and result.get_response().id == "sync-1"
        np.testing.assert_allclose(result.as_numpy("output"), expected(stack, 1, data), rtol=1e-5, atol=1e-5)
        pinned = client.infer(MODEL, inputs, model_version="3", headers=stack.headers())
        np.testing.assert_allclose(pinned.as_numpy("output"), expected(stack, 3, data), rtol=1e-5, atol=1e-5)
        by_alias = client.infer(MODEL, inputs, headers=stack.headers(**{"x-model-alias": "canary"}))
        assert by_alias.get_response().model_version == "2"

        answers: queue.Queue[tuple[object, object]] = queue.Queue()
        client.start_stream(lambda result, error: answers.put((result, error)), headers=stack.headers())
        for i in range(5):
            client.async_stream_infer(MODEL, inputs, request_id=f"s{i}")
        client.async_stream_infer("unknown-model", inputs, request_id="bad")
        client.stop_stream()
        got = [answers.get(timeout=10) for _ in range(6)]
        ok = [r.get_response().id for r, e in got if e is None]  # type: ignore[attr-defined]
        errors = [e for r, e in got if e is not None]
        assert ok == [f"s{i}" for i in range(5)]
        assert len(errors) == 1 and "may not use model" in errors[0].message()  # type: ignore[attr-defined]

    async def aio() -> None:
        async with tca.InferenceServerClient(stack.gateways[1].address) as client:
            aio_inputs, aio_data = make_inputs(seed=2, module=tca)
            result = await client.infer(MODEL, aio_inputs, headers=stack.headers())
            np.testing.assert_allclose(result.as_numpy("output"), expected(stack, 1, aio_data), rtol=1e-5, atol=1e-5)

            async def requests():  # type: ignore[no-untyped-def]
                for i in range(4):
                    yield {"model_name": MODEL, "inputs": aio_inputs, "request_id": str(i)}

            streamed = [item async for item in client.stream_infer(requests(), headers=stack.headers())]
            assert [r.get_response().id for r, e in streamed] == ["0", "1", "2", "3"]

    asyncio.run(aio())


def failure(call: object) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()  # type: ignore[operator]
    return str(info.value.status()).replace("StatusCode.", ""), info.value.message() or ""


def test_auth_failures_of_each_kind(stack: Stack) -> None:
    inputs, _ = make_inputs()
    _, read_only = stack.admin.create_key("reader", models=[MODEL], roles=["read"])
    _, other_model = stack.admin.create_key("other", models=["other"], roles=["infer"])
    revoked_key, revoked = stack.admin.create_key("to-revoke", models=["*"])
    expiring_key, expiring = stack.admin.create_key("to-expire", models=["*"])
    with stack.client(1) as client:
        infer = client.infer
        assert failure(lambda: infer(MODEL, inputs))[0] == "UNAUTHENTICATED"
        assert failure(lambda: infer(MODEL, inputs, headers={"authorization": "Bearer junk"}))[0] == "UNAUTHENTICATED"
        bad_secret = "_".join(stack.token.split("_")[:2]) + "_not-the-secret"
        assert failure(lambda: infer(MODEL, inputs, headers=stack.headers(bad_secret))) == (
            "UNAUTHENTICATED", "invalid API key")
        code, message = failure(lambda: infer(MODEL, inputs, headers=stack.headers(read_only)))
        assert code == "PERMISSION_DENIED" and "'infer' role" in message
        code, message = failure(lambda: infer(MODEL, inputs, headers=stack.headers(other_model)))
        assert code == "PERMISSION_DENIED" and "may not use model 'tiny'" in message
        infer("other", inputs, headers=stack.headers(other_model))
        code, _ = failure(lambda: client.get_model_metadata(MODEL, headers=stack.headers(other_model)))
        assert code == "PERMISSION_DENIED"

        # Revoked and expired through gateway 0; gateway 1 refuses them within a second.
        infer(MODEL, inputs, headers=stack.headers(revoked))
        stack.admin.revoke_key(revoked_key.key_id, reason="test")
        stack.admin.expire_key(expiring_key.key_id)

        def refused(token: str, text: str) -> bool:
            try:
                infer(MODEL, inputs, headers=stack.headers(token))
            except InferenceServerException as exc:
                return exc.status() == "StatusCode.UNAUTHENTICATED" and text in (exc.message() or "")
            return False

        assert wait_until(lambda: refused(revoked, "revoked"), timeout=5.0) < 1.0
        assert wait_until(lambda: refused(expiring, "expired"), timeout=5.0) < 1.0
    # Admin needs the admin role.
    with GatewayClient(stack.gateways[0].address, api_key=stack.token) as not_admin:
        with pytest.raises(Exception) as info:
            not_admin.list_keys()
        assert "PERMISSION_DENIED" in str(info.value)
    listed = {k.key_id for k in stack.admin.list_keys()}
    assert revoked_key.key_id not in listed and expiring_key.key_id not in listed
    assert revoked_key.key_id in {k.key_id for k in stack.admin.list_keys(include_inactive=True)}


def test_quota_is_shared_by_two_gateways_and_refills(stack: Stack) -> None:
    _, token = stack.admin.create_key("limited", models=[MODEL], roles=["infer"], rps=2, burst=4)
    inputs, _ = make_inputs()
    clients = [stack.client(0), stack.client(1)]
    outcomes = []
    for i in range(8):
        try:
            clients[i % 2].infer(MODEL, inputs, headers=stack.headers(token))
            outcomes.append("ok")
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.RESOURCE_EXHAUSTED" and "retry after" in (exc.message() or "")
            outcomes.append("limited")
    # Four from the burst (plus at most one refilled while the loop ran).
    assert outcomes[:4] == ["ok"] * 4 and outcomes.count("ok") <= 5 and outcomes[-1] == "limited"
    time.sleep(1.0)
    clients[1].infer(MODEL, inputs, headers=stack.headers(token))
    for client in clients:
        client.close()


def set_route(stack: Stack, **kwargs: object) -> None:
    stack.admin.set_route(MODEL, **kwargs)  # type: ignore[arg-type]
    time.sleep(0.3)  # the other gateway learns it from the feed


def test_a_90_10_split_within_tolerance(stack: Stack) -> None:
    set_route(stack, splits={"production": 90, "canary": 10})
    versions: Counter[str] = Counter()
    requests = 1200

    async def run(address: str) -> None:
        async with tca.InferenceServerClient(address) as client:
            aio_inputs, _ = make_inputs(module=tca)

            async def one() -> None:
                result = await client.infer(MODEL, aio_inputs, headers=stack.headers())
                versions[result.get_response().model_version] += 1

            for _ in range(requests // 2 // 20):
                await asyncio.gather(*(one() for _ in range(20)))

    async def both() -> None:
        await asyncio.gather(run(stack.gateways[0].address), run(stack.gateways[1].address))

    asyncio.run(both())
    assert set(versions) == {"1", "2"} and sum(versions.values()) == requests
    share = versions["2"] / requests
    # Binomial sd at n=1200, p=0.1 is 0.0087: 4 sd either side.
    assert 0.065 < share < 0.135, versions


def test_sticky_routing_keys(stack: Stack) -> None:
    set_route(stack, splits={"production": 50, "canary": 50}, sticky=True)
    inputs, _ = make_inputs()
    seen: dict[str, set[str]] = {}
    with stack.client(0) as first, stack.client(1) as second:
        for i in range(40):
            key = f"user-{i}"
            for client in (first, second, first):
                result = client.infer(MODEL, inputs, headers=stack.headers(**{"x-routing-key": key}))
                seen.setdefault(key, set()).add(result.get_response().model_version)
            by_parameter = first.infer(MODEL, inputs, headers=stack.headers(), parameters={"routing_key": key})
            seen[key].add(by_parameter.get_response().model_version)
    assert all(len(v) == 1 for v in seen.values())
    assert {next(iter(v)) for v in seen.values()} == {"1", "2"}


def test_an_alias_move_takes_effect_within_a_second(stack: Stack) -> None:
    set_route(stack, splits={"canary": 1})
    inputs, _ = make_inputs()
    with stack.client(1) as client:
        assert client.infer(MODEL, inputs, headers=stack.headers()).get_response().model_version == "2"
        stack.registry.set_alias(MODEL, "canary", 3)
        took = wait_until(lambda: client.infer(MODEL, inputs, headers=stack.headers())
                          .get_response().model_version == "3", timeout=5.0)
        assert took < 1.0
        stack.registry.set_alias(MODEL, "canary", 2)
        wait_until(lambda: client.infer(MODEL, inputs, headers=stack.headers())
                   .get_response().model_version == "2", timeout=5.0)


def shadow_count(stack: Stack) -> int:
    with stack.client(0) as client:
        stats = client.get_inference_statistics(MODEL, "3", headers=stack.headers(ADMIN_TOKEN))
    return sum(s.inference_stats.success.count for s in stats.model_stats)


def test_shadow_traffic_never_changes_the_answer(stack: Stack) -> None:
    set_route(stack, splits={"production": 1}, shadows={"shadow": 1.0})
    before = shadow_count(stack)
    with stack.client(0) as client:
        for seed in range(20):
            inputs, data = make_inputs(seed=seed)
            result = client.infer(MODEL, inputs, headers=stack.headers())
            assert result.get_response().model_version == "1"
            np.testing.assert_allclose(result.as_numpy("output"), expected(stack, 1, data), rtol=1e-5, atol=1e-5)
    wait_until(lambda: shadow_count(stack) - before >= 20, timeout=10.0, interval=0.1)
    route = stack.admin.get_route(MODEL)
    assert dict(route.resolved) == {"production": 1, "shadow": 3}
    # The differences reached the monitor: version 3 disagrees with version 1 on every sample.
    wait_until(lambda: any(a.kind == monitor_pb2.ALERT_KIND_SHADOW_MISMATCH and a.version == 3
                           for a in shadow_alerts(stack)), timeout=10.0, interval=0.2)


def shadow_alerts(stack: Stack) -> list[monitor_pb2.Alert]:
    with grpc.insecure_channel(stack.monitor.address) as channel:
        reply = monitor_pb2_grpc.MonitorStub(channel).ListAlerts(
            monitor_pb2.ListAlertsRequest(model=MODEL, active_only=True), timeout=5)
    return list(reply.alerts)


def test_requests_are_reported_to_the_monitor(stack: Stack) -> None:
    def gateway_counts() -> dict[str, int]:
        with grpc.insecure_channel(stack.monitor.address) as channel:
            reply = monitor_pb2_grpc.MonitorStub(channel).QueryMetrics(
                monitor_pb2.QueryMetricsRequest(model=MODEL, source="gateway"), timeout=5)
        return {f"{s.version}/{s.alias}": s.count for s in reply.series}

    wait_until(lambda: gateway_counts().get("1/production", 0) > 100, timeout=10.0, interval=0.2)
    assert gateway_counts().get("2/canary", 0) > 0


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> dict | list:  # type: ignore[type-arg]
    import json

    from aiaas.cli.main import main as cli_main

    capsys.readouterr()
    assert cli_main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_cli_keys_routes_and_predict(stack: Stack, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = ["--gateway", stack.gateways[0].address, "--api-key", ADMIN_TOKEN]
    created = run_cli(capsys, "keys", "create", *gateway, "--name", "cli", "--models", "tiny,oth*",
                      "--roles", "infer", "--rps", "50", "--burst", "10", "--expires-in", "1d")
    assert isinstance(created, dict) and created["token"].startswith("aiaas_") and created["roles"] == ["infer"]
    assert created["models"] == ["tiny", "oth*"] and created["rps"] == 50 and created["expires"]
    # Bootstrap path: straight into the registry, with the gateways' pepper.
    monkeypatch.setenv("AIAAS_GATEWAY_KEY_PEPPER", "e2e-pepper")
    direct = run_cli(capsys, "keys", "create", "--registry", stack.registry.address, "--roles", "admin")
    assert isinstance(direct, dict)
    def admin_works() -> bool:
        import grpc

        with GatewayClient(stack.gateways[1].address, api_key=direct["token"]) as client:
            try:
                return bool(client.list_keys())
            except grpc.RpcError:
                return False

    wait_until(admin_works, timeout=5.0)
    listed = run_cli(capsys, "keys", "list", *gateway)
    assert {created["key_id"], direct["key_id"]} <= {k["key_id"] for k in listed}  # type: ignore[index]
    revoked = run_cli(capsys, "keys", "revoke", *gateway, created["key_id"], "--reason", "cli test")
    assert isinstance(revoked, dict) and revoked["revoked"] is True

    route = run_cli(capsys, "route", "set", "tiny", *gateway, "--split", "production=80,canary=20", "--sticky",
                    "--shadow", "shadow=0.5", "--rps", "500", "--burst", "100", "--reason", "cli")
    assert isinstance(route, dict) and route["splits"] == {"production": 80, "canary": 20} and route["sticky"]
    shown = run_cli(capsys, "route", "show", "tiny", *gateway)
    assert isinstance(shown, dict) and shown["resolves_to"] == {"production": 1, "canary": 2, "shadow": 3}
    assert [r["model"] for r in run_cli(capsys, "route", "show", *gateway)] == ["tiny"]  # type: ignore[index]

    prediction = run_cli(capsys, "predict", "tiny", *gateway, "--input", "input=[[0.1, 0.2, 0.3, 0.4]]",
                         "--alias", "canary")
    data = np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    assert isinstance(prediction, dict) and prediction["version"] == "2"
    np.testing.assert_allclose(prediction["outputs"]["output"], expected(stack, 2, data), rtol=1e-5, atol=1e-5)

    from aiaas.cli.main import main as cli_main

    assert cli_main(["route", "delete", "tiny", *gateway]) == 0
    assert cli_main(["route", "show", "tiny", *gateway]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_admin_changes_are_audited(stack: Stack) -> None:
    from aiaas.registry.v1 import registry_pb2

    stack.admin.set_route(MODEL, {"production": 1}, reason="audit check")
    events = stack.registry.stub.ListAuditEvents(registry_pb2.ListAuditEventsRequest(page_size=200)).events
    actions = [(e.action, e.model) for e in events]
    assert ("gateway.route.set", MODEL) in actions and ("gateway.key.create", "") in actions
    route_set = next(e for e in events if e.action == "gateway.route.set")
    assert route_set.actor.startswith("gateway/gateway-key:") and route_set.details["reason"] == "audit check"


def test_route_writes_are_compare_and_set(stack: Stack) -> None:
    import grpc

    _, revision = stack.admin.set_route(MODEL, {"production": 1})
    assert stack.admin.get_route(MODEL).revision == revision
    with pytest.raises(grpc.RpcError) as info:
        stack.admin.set_route(MODEL, {"canary": 1}, expected_revision=revision + 1000)
    assert info.value.code() == grpc.StatusCode.ABORTED  # type: ignore[attr-defined]
    _, newer = stack.admin.set_route(MODEL, {"production": 1}, expected_revision=revision)
    assert newer > revision
    with pytest.raises(grpc.RpcError) as info:
        stack.admin.set_route("no-such-model", {"production": 1})
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_a_replica_killed_under_load_fails_no_request(stack: Stack) -> None:
    set_route(stack, splits={"production": 1})
    failures: list[str] = []
    done = 0

    async def load(stop_at: float) -> None:
        nonlocal done
        async with tca.InferenceServerClient(stack.gateways[0].address) as client:
            aio_inputs, _ = make_inputs(module=tca)
            while time.monotonic() < stop_at:
                try:
                    await client.infer(MODEL, aio_inputs, headers=stack.headers(), client_timeout=10.0)
                    done += 1
                except InferenceServerException as exc:
                    failures.append(f"{exc.status()}: {exc.message()}")

    async def scenario() -> None:
        stop_at = time.monotonic() + 4.0
        workers = [asyncio.create_task(load(stop_at)) for _ in range(8)]
        await asyncio.sleep(1.5)
        stack.replicas[0].kill()
        await asyncio.gather(*workers)

    asyncio.run(scenario())
    assert failures == [] and done > 100


def test_redis_stopped_mid_test_serving_goes_on(stack: Stack) -> None:
    _, token = stack.admin.create_key("quota-while-redis-down", models=[MODEL], rps=1000, burst=1000)
    inputs, _ = make_inputs()
    with stack.client(1) as client:
        client.infer(MODEL, inputs, headers=stack.headers(token))
        stack.redis.stop()
        started = time.monotonic()
        for _ in range(50):
            client.infer(MODEL, inputs, headers=stack.headers(token))
        assert time.monotonic() - started < 10.0
    assert f"quota store (Redis) at 127.0.0.1:{stack.redis.port} unreachable: " in stack.gateways[1].log()


def test_the_openai_door_of_a_gateway_process(stack: Stack) -> None:
    """The door listens beside gRPC with the same keys; tensor models are not offered on it."""
    import openai

    api = openai.OpenAI(base_url=stack.gateways[0].openai_url, api_key=stack.token, max_retries=0, timeout=30)
    try:
        assert api.models.list().data == []  # `tiny` takes tensors
        with pytest.raises(openai.BadRequestError, match="'tiny' .* is not a generative model"):
            api.completions.create(model=MODEL, prompt="hello")
        with pytest.raises(openai.PermissionDeniedError, match="may not use model 'other'"):
            api.completions.create(model="other", prompt="hello")
    finally:
        api.close()
    with openai.OpenAI(base_url=stack.gateways[1].openai_url, api_key="aiaas_abcd1234_wrong", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        bad.models.list()
