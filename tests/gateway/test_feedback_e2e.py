"""Feedback end to end: real Redis, registry, inference, gateway and monitor processes. Requests
with ids go through the gateway (every one sampled), labels come back through the SDK and the
CLI, and the monitor's online accuracy is exactly the share of labels the served version had
right, computed here from the model's own reference outputs.

One stack for the module; the SLO test judges the labels the accuracy test sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from aiaas.cli.main import main
from aiaas.gateway.v1 import gateway_pb2 as gw
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
)
from tests.inference import models
from tests.support.procs import ServiceProcess
from tests.support.servers import RedisServer

MODEL = "mlp"


@dataclass
class Stack:
    gateway: ServiceProcess
    monitor: ServiceProcess
    artifact: models.Artifact
    alice: str
    bob: str
    carol: str

    def client(self, token: str | None) -> GatewayClient:
        return GatewayClient(self.gateway.address, api_key=token)

    def monitor_stub(self, channel: grpc.Channel) -> monitor_pb2_grpc.MonitorStub:
        return monitor_pb2_grpc.MonitorStub(channel)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    redis = RedisServer().start()
    registry = Registry(start_registry(tmp_path_factory.mktemp("registry")))
    procs: list[ServiceProcess] = []
    try:
        artifact = models.write_mlp(tmp_path_factory.mktemp("models"), "torchscript", sizes=(4, 8, 3), seed=5)
        registry.register(MODEL, artifact, alias="production", max_batch_size=8)
        replica = start_inference_replica(registry, tmp_path_factory.mktemp("cache"))
        procs.append(replica)
        wait_model(replica, MODEL)
        monitor = ServiceProcess("monitor", ["--registry-url", "", "--evaluation-interval-s", "0.2"]).start()
        procs.append(monitor)
        gateway = start_gateway(registry, [replica], redis, "--feedback-sample-rate", "1",
                                "--redis-timeout-ms", "500", monitor=monitor.address)
        procs.append(gateway)
        with GatewayClient(gateway.address, api_key=ADMIN_TOKEN) as admin:
            tokens = [admin.create_key(name, models=[model], roles=["infer"])[1]
                      for name, model in (("alice", MODEL), ("bob", MODEL), ("carol", "other"))]
        yield Stack(gateway, monitor, artifact, *tokens)
    finally:
        for proc in reversed(procs):
            proc.stop()
        registry.close()
        registry.proc.stop()
        redis.close()


def give(client: GatewayClient, request_id: str, labels: list[int]) -> gw.SendFeedbackResponse:
    """Feedback, once the gateway has written the prediction (it does so after answering)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return client.feedback(MODEL, request_id, labels)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:  # type: ignore[attr-defined]
                raise
            time.sleep(0.05)


def quality(stack: Stack) -> monitor_pb2.SeriesMetrics:
    with grpc.insecure_channel(stack.monitor.address) as channel:
        reply = stack.monitor_stub(channel).QueryMetrics(monitor_pb2.QueryMetricsRequest(
            model=MODEL, source="gateway", window_seconds=600, merge=True), timeout=5)
    (series,) = reply.series
    return series


def test_online_accuracy_is_exactly_the_labels_the_version_had_right(
        stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(11)
    total = correct = 0
    with stack.client(stack.alice) as alice:
        for i in range(24):
            batch = 1 + i % 2
            data = rng.standard_normal((batch, 4)).astype(np.float32)
            prediction = alice.predict(MODEL, {"input": data}, request_id=f"req-{i}")
            predicted = stack.artifact.expected({"input": data})["output"].argmax(axis=1)
            np.testing.assert_array_equal(prediction.outputs["output"].argmax(axis=1), predicted)
            # A quarter of the rows get a label the model did not predict.
            labels = [int(p) if (i + row) % 4 else int(p + 1) % 3 for row, p in enumerate(predicted)]
            right = sum(int(p) == label for p, label in zip(predicted, labels, strict=True))
            if i == 23:  # the last one through the CLI
                wait_until(lambda: _kept(alice, "req-23"), timeout=10)
                assert main(["feedback", MODEL, f"req-{i}", *[f"--label={v}" for v in labels],
                             "--gateway", stack.gateway.address, "--api-key", stack.alice, "--json"]) == 0
                reply = json.loads(capsys.readouterr().out)
                assert reply["predicted"] == [str(int(p)) for p in predicted] and reply["alias"] == "production"
                assert int(reply["correct"]) == right and int(reply["class_labels"]) == batch
            else:
                reply = give(alice, f"req-{i}", labels)
                assert list(reply.predicted) == [str(int(p)) for p in predicted]
                assert (reply.version, reply.alias, reply.class_labels, reply.correct) == (1, "production", batch, right)
            total += batch
            correct += right
    assert 0 < correct < total
    wait_until(lambda: quality(stack).class_labels == total, timeout=10)
    series = quality(stack)
    assert (series.class_labels, series.correct) == (total, correct)
    assert series.accuracy == correct / total and series.count >= 24


def _kept(client: GatewayClient, request_id: str) -> bool:
    """Whether the gateway holds the prediction: asking with no labels is INVALID_ARGUMENT either way,
    so ask with a label count no prediction has, which is checked only once it is found."""
    try:
        client.feedback(MODEL, request_id, [0] * 64)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined,no-any-return]
    return False


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code(), caught.value.details()  # type: ignore[attr-defined]


def test_feedback_is_refused_clearly(stack: Stack) -> None:
    data = np.ones((1, 4), np.float32)
    with stack.client(stack.alice) as alice, stack.client(stack.bob) as bob, stack.client(stack.carol) as carol, \
            stack.client(None) as nobody:
        alice.predict(MODEL, {"input": data}, request_id="mine")
        give(alice, "mine", [1])
        code, details = _code(lambda: alice.feedback(MODEL, "mine", [1]))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "labeled already" in details
        alice.predict(MODEL, {"input": data}, request_id="alices")
        wait_until(lambda: _kept(alice, "alices"), timeout=10)
        code, details = _code(lambda: bob.feedback(MODEL, "alices", [1]))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "another API key" in details
        code, details = _code(lambda: carol.feedback(MODEL, "alices", [1]))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "may not use model 'mlp'" in details
        code, _ = _code(lambda: nobody.feedback(MODEL, "alices", [1]))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, details = _code(lambda: alice.feedback(MODEL, "never-sent", [1]))
        assert code == grpc.StatusCode.NOT_FOUND and "'never-sent'" in details and "window" in details
        for labels, score, message in [([], None, "labels"), ([1, 2], None, "1 row(s)"), ([0.5], None, "class_id"),
                                       ([], 1.5, "score"), ([1] * 65, None, "at most 64")]:
            code, details = _code(lambda labels=labels, score=score: alice.feedback(MODEL, "alices", labels,
                                                                                   score=score))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
        # The refusals took nothing: the prediction still takes its one label.
        assert give(alice, "alices", [0]).class_labels == 1


def test_an_accuracy_slo_fires_on_the_labels_sent_back(stack: Stack) -> None:
    with grpc.insecure_channel(stack.monitor.address) as channel:
        stub = stack.monitor_stub(channel)
        accuracy = quality(stack).accuracy
        stub.SetSLO(monitor_pb2.SetSLORequest(slo=monitor_pb2.SLO(
            model=MODEL, min_accuracy=0.95, window_seconds=600, min_labels=20), actor="test"), timeout=5)

        def firing() -> list[monitor_pb2.Alert]:
            return [a for a in stub.ListAlerts(monitor_pb2.ListAlertsRequest(model=MODEL, active_only=True),
                                               timeout=5).alerts if a.kind == monitor_pb2.ALERT_KIND_SLO_ACCURACY]

        wait_until(lambda: bool(firing()), timeout=10)
        # The alert carries the accuracy of the window it was judged on; a label still on its way
        # from the gateway's reporter when it first fired moves both, so compare once they agree.

        def agrees() -> bool:
            alerts = firing()
            return len(alerts) == 1 and alerts[0].value == pytest.approx(quality(stack).accuracy)

        wait_until(agrees, timeout=10)
        (alert,) = firing()
        assert alert.threshold == 0.95 and alert.value < 0.95
        assert alert.value == pytest.approx(accuracy, abs=0.1)  # the labels the earlier tests sent back
