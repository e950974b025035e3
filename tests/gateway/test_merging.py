"""Merging ModelInfer requests to a busy target into one call (services/gateway/merging.py).

The scheduling tests drive `Merger` with a gated forward (the upstream call, held until the test
lets it answer; it answers as the replica would: y = 2x + 1 per row), so every ordering is
deterministic. The last test runs a real gateway in front of a real inference replica."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from aiaas.gateway_client import GatewayClient
from services.common.errors import DeadlineExceeded, Unavailable
from services.gateway.merging import MergePlan, Merger
from services.gateway.wire import retarget
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

TARGET = ("mlp:production", "")


def config(max_batch: int = 8, dims: tuple[int, ...] = (4,), data_type: str = "TYPE_FP32", **queue: int) -> mc.ModelConfig:
    model = mc.ModelConfig(name="mlp", max_batch_size=max_batch)
    model.input.add(name="x", data_type=mc.DataType.Value(data_type), dims=dims)
    model.output.add(name="y", data_type=mc.TYPE_FP32, dims=dims)
    for key, value in queue.items():
        setattr(model.dynamic_batching.default_queue_policy, key, value)
    return model


PLAN = MergePlan.from_config(config())


def request(rows: int, seed: int, **extra: str) -> tuple[pb.ModelInferRequest, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)
    message = pb.ModelInferRequest(model_name="mlp", id=f"req-{seed}")
    message.inputs.add(name="x", datatype="FP32", shape=x.shape)
    message.raw_input_contents.append(x.tobytes())
    for key, value in extra.items():
        message.parameters[key].string_param = value
    return message, x


class GatedUpstream:
    """Records each forwarded request; answers it (y = 2x + 1) when the test releases it."""

    def __init__(self) -> None:
        self.calls: list[pb.ModelInferRequest] = []
        self.releases: list[asyncio.Future[None]] = []
        self.fail_with: Exception | None = None

    async def __call__(self, raw: bytes, timeout: float, metadata: tuple[tuple[str, str], ...]) -> bytes:
        message = pb.ModelInferRequest.FromString(raw)
        self.calls.append(message)
        release = asyncio.get_running_loop().create_future()
        self.releases.append(release)
        await release
        if self.fail_with is not None:
            raise self.fail_with
        x = np.frombuffer(message.raw_input_contents[0], np.float32).reshape(tuple(message.inputs[0].shape))
        reply = pb.ModelInferResponse(model_name=message.model_name, model_version="3", id=message.id)
        reply.outputs.add(name="y", datatype="FP32", shape=x.shape)
        reply.raw_output_contents.append((2 * x + 1).tobytes())
        return reply.SerializeToString()

    def release(self, index: int) -> None:
        self.releases[index].set_result(None)

    @property
    def rows(self) -> list[int]:
        return [m.inputs[0].shape[0] for m in self.calls]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def send(merger: Merger, message: pb.ModelInferRequest, timeout: float = 30.0) -> asyncio.Task[bytes]:
    raw = retarget(message.SerializeToString(), *TARGET)
    return asyncio.ensure_future(merger.forward(message, raw, TARGET, PLAN, timeout, (("x-request-id", message.id),)))


def answer_of(raw: bytes) -> tuple[str, str, np.ndarray]:
    reply = pb.ModelInferResponse.FromString(raw)
    y = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(tuple(reply.outputs[0].shape))
    return reply.id, reply.model_version, y


def test_plans_only_for_batching_tensor_models_with_fixed_rows_and_no_queue_policy() -> None:
    assert PLAN is not None and PLAN.max_rows == 8 and PLAN.inputs == {"x": ("FP32", (4,), 16)}
    assert MergePlan.from_config(config(dims=(2, 3), data_type="TYPE_INT64")).inputs["x"] == ("INT64", (2, 3), 48)
    assert MergePlan.from_config(config(max_batch=0)) is None  # no batch dimension
    assert MergePlan.from_config(config(max_batch=1)) is None
    assert MergePlan.from_config(config(data_type="TYPE_STRING")) is None  # BYTES rows vary in size
    assert MergePlan.from_config(config(dims=(-1,))) is None  # a variable dimension
    assert MergePlan.from_config(config(max_queue_size=4)) == MergePlan(8, {"x": ("FP32", (4,), 16)}, 4)
    assert MergePlan.from_config(config(default_timeout_microseconds=1000)) is None  # the queue times out
    decoupled = config()
    decoupled.model_transaction_policy.decoupled = True
    assert MergePlan.from_config(decoupled) is None


def test_which_requests_may_merge() -> None:
    assert PLAN is not None
    assert PLAN.rows(request(3, 0)[0]) == 3
    assert PLAN.rows(request(8, 0)[0]) == 0  # a full batch already: nothing to merge it with
    assert PLAN.rows(request(1, 0, priority="1")[0]) == 0  # parameters change how the replica runs it
    with_outputs, _ = request(1, 0)
    with_outputs.outputs.add(name="y")
    assert PLAN.rows(with_outputs) == 0
    typed = pb.ModelInferRequest(model_name="mlp")
    typed.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
    assert PLAN.rows(typed) == 0
    for change in ({"name": "z"}, {"datatype": "FP64"}, {"shape": [1, 5]}, {"shape": [4]}):
        odd, _ = request(1, 0)
        tensor = odd.inputs[0]
        for field, value in change.items():
            if field == "shape":
                del tensor.shape[:]
                tensor.shape.extend(value)  # type: ignore[arg-type]
            else:
                setattr(tensor, field, value)
        assert PLAN.rows(odd) == 0, change
    short, _ = request(2, 0)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    assert PLAN.rows(short) == 0


async def test_requests_to_a_busy_target_go_in_one_call_and_get_their_own_rows() -> None:
    upstream = GatedUpstream()
    merger = Merger(upstream, max_in_flight=1)
    first, x0 = request(1, 0)
    tasks = [send(merger, first)]
    await settle()
    assert upstream.calls == [pb.ModelInferRequest.FromString(retarget(first.SerializeToString(), *TARGET))]
    sent = [request(rows, seed) for seed, rows in enumerate((2, 1, 3), start=1)]
    tasks += [send(merger, message) for message, _ in sent]
    await settle()
    assert len(upstream.calls) == 1  # they wait while the one call runs
    upstream.release(0)
    await settle()
    assert upstream.rows == [1, 6]
    merged = upstream.calls[1]
    assert (merged.model_name, merged.model_version, merged.id) == ("mlp:production", "", "")
    assert not merged.parameters and not merged.outputs
    np.testing.assert_array_equal(
        np.frombuffer(merged.raw_input_contents[0], np.float32).reshape(6, 4), np.concatenate([x for _, x in sent]))
    upstream.release(1)
    answers = [answer_of(raw) for raw in await asyncio.gather(*tasks)]
    for (rid, version, y), (message, x) in zip(answers, [(first, x0), *sent], strict=True):
        assert (rid, version) == (message.id, "3")
        np.testing.assert_array_equal(y, 2 * x + 1)
    assert (merger.merged_calls, merger.merged_requests) == (1, 3)


async def test_a_lone_request_never_waits_and_groups_stop_at_the_max_batch() -> None:
    upstream = GatedUpstream()
    merger = Merger(upstream, max_in_flight=2)
    tasks = [send(merger, request(1, seed)[0]) for seed in range(2)]
    await settle()
    assert upstream.rows == [1, 1]  # below max_in_flight each goes at once, alone
    tasks += [send(merger, request(rows, seed)[0]) for seed, rows in enumerate((5, 2, 3, 4), start=2)]
    await settle()
    upstream.release(0)
    await settle()
    assert upstream.rows == [1, 1, 7]  # 5 + 2 fill the batch of 8 no further
    upstream.release(1)
    await settle()
    assert upstream.rows == [1, 1, 7, 7]
    upstream.release(2)
    upstream.release(3)
    await asyncio.gather(*tasks)


async def test_requests_checked_against_different_configs_never_share_a_call() -> None:
    """While an alias moves, one target takes requests checked against two versions' configs."""
    upstream = GatedUpstream()
    merger = Merger(upstream, max_in_flight=1)
    wider = MergePlan.from_config(config(max_batch=16))
    assert wider is not None and PLAN is not None and wider.key != PLAN.key
    tasks = [send(merger, request(1, 0)[0])]
    message = request(1, 1)[0]
    tasks.append(asyncio.ensure_future(merger.forward(
        message, retarget(message.SerializeToString(), *TARGET), TARGET, wider, 30.0, ())))
    await settle()
    assert upstream.rows == [1, 1]  # each the first of its own group: both go at once
    upstream.release(0)
    upstream.release(1)
    await asyncio.gather(*tasks)


async def test_the_next_group_goes_before_the_answered_group_resumes() -> None:
    events: list[str] = []

    class Recording(GatedUpstream):
        async def __call__(self, raw: bytes, timeout: float, metadata: tuple[tuple[str, str], ...]) -> bytes:
            events.append(f"call of {pb.ModelInferRequest.FromString(raw).inputs[0].shape[0]}")
            return await super().__call__(raw, timeout, metadata)

    upstream = Recording()
    merger = Merger(upstream, max_in_flight=1)

    async def caller(rows: int, seed: int) -> None:
        # As a gateway handler does: awaits the merger in its own task, then answers.
        message = request(rows, seed)[0]
        await merger.forward(message, retarget(message.SerializeToString(), *TARGET), TARGET, PLAN, 30.0, ())
        events.append(f"answered {seed}")

    tasks = [asyncio.ensure_future(caller(1, 0))]
    await settle()
    tasks += [asyncio.ensure_future(caller(2, seed)) for seed in (1, 2)]
    await settle()
    upstream.release(0)
    await settle()
    tasks += [asyncio.ensure_future(caller(3, seed)) for seed in (3, 4)]
    await settle()
    events.clear()
    upstream.release(1)  # the group of 1 and 2 is answered while 3 and 4 wait
    await settle()
    assert events[:3] == ["call of 6", "answered 1", "answered 2"], events
    upstream.release(2)
    await asyncio.gather(*tasks)


async def test_the_limit_is_per_replica_taking_traffic() -> None:
    upstream = GatedUpstream()
    replicas = [3]
    merger = Merger(upstream, max_in_flight=1, replicas=lambda: replicas[0])
    tasks = [send(merger, request(1, seed)[0]) for seed in range(5)]
    await settle()
    assert upstream.rows == [1, 1, 1]  # one call per replica at once; the other two wait
    replicas[0] = 1  # two replicas ejected: their calls finish, and the waiting go as one
    upstream.release(0)
    await settle()
    assert upstream.rows == [1, 1, 1]  # still 2 running against a limit of 1
    upstream.release(1)
    upstream.release(2)
    await settle()
    assert upstream.rows == [1, 1, 1, 2]
    upstream.release(3)
    await asyncio.gather(*tasks)


async def test_an_error_of_a_merged_call_is_each_of_its_requests_error() -> None:
    upstream = GatedUpstream()
    merger = Merger(upstream, max_in_flight=1)
    tasks = [send(merger, request(1, seed)[0]) for seed in range(4)]
    await settle()
    upstream.release(0)
    await settle()
    upstream.fail_with = Unavailable("replica went away")
    upstream.release(1)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], bytes)
    assert all(isinstance(r, Unavailable) for r in results[1:])


async def test_a_waiting_request_ends_at_its_deadline_and_a_cancelled_one_is_left_out() -> None:
    upstream = GatedUpstream()
    merger = Merger(upstream, max_in_flight=1)
    running = send(merger, request(1, 0)[0])
    await settle()
    hurried = send(merger, request(1, 1)[0], timeout=0.05)
    gone = send(merger, request(1, 2)[0])
    patient = send(merger, request(2, 3)[0])
    await settle()
    gone.cancel()
    with pytest.raises(DeadlineExceeded):
        await hurried
    upstream.release(0)
    await settle()
    assert upstream.rows == [1, 2]  # only the patient one went: alone, as it came
    assert upstream.calls[1].id == "req-3"
    upstream.release(1)
    assert answer_of(await patient)[0] == "req-3"
    await running


async def test_a_queue_bound_is_left_to_the_replica() -> None:
    """With max_queue_size 3, once 3 requests run or wait here a further one goes as it came (the
    replica's queue takes or refuses it), so the gateway never holds more than the bound."""
    upstream = GatedUpstream()
    merger = Merger(upstream, max_in_flight=1)
    plan = MergePlan.from_config(config(max_queue_size=3))

    def go(seed: int) -> asyncio.Task[bytes]:
        message = request(1, seed)[0]
        return asyncio.ensure_future(merger.forward(message, retarget(message.SerializeToString(), *TARGET),
                                                    TARGET, plan, 30.0, ()))

    tasks = [go(seed) for seed in range(5)]
    await settle()
    assert [m.id for m in upstream.calls] == ["req-0", "req-3", "req-4"]  # 1 running + 2 waiting = 3
    for index in range(3):
        upstream.release(index)
    await settle()
    assert upstream.rows == [1, 1, 1, 2]  # the two that waited, merged
    upstream.release(3)
    await asyncio.gather(*tasks)


async def test_requests_that_may_not_merge_are_forwarded_as_they_came() -> None:
    upstream = GatedUpstream()
    merger = Merger(upstream, max_in_flight=1)
    tasks = [send(merger, request(1, 0)[0]), send(merger, request(1, 1, priority="2")[0])]
    await settle()
    assert len(upstream.calls) == 2 and upstream.calls[1].parameters["priority"].string_param == "2"
    off = Merger(upstream, max_in_flight=0)
    tasks.append(send(off, request(1, 2)[0]))
    await settle()
    assert len(upstream.calls) == 3
    for index in range(3):
        upstream.release(index)
    await asyncio.gather(*tasks)


# --- the real thing ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merging_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, ServiceProcess, str,
                                                                                 models.Artifact]]:
    registry = Registry(start_registry(tmp_path_factory.mktemp("registry")))
    mlp = models.write_mlp(tmp_path_factory.mktemp("models"), "torchscript", sizes=(4, 8, 3))
    # A long queue delay: requests the replica holds make the gateway's calls to it run long.
    registry.register("mlp", mlp, alias="production", max_batch_size=8, max_queue_delay_us=20_000,
                      strict_queue_delay=True)
    replica = start_inference_replica(registry, tmp_path_factory.mktemp("cache"))
    wait_model(replica, "mlp")
    proc = start_gateway(registry, [replica], None, "--merge-max-in-flight", "1")
    with GatewayClient(proc.address, api_key=ADMIN_TOKEN) as admin:
        _, token = admin.create_key("merging", models=["mlp"], roles=["infer"])
    yield proc, replica, token, mlp
    proc.stop()
    replica.stop()
    registry.close()
    registry.proc.stop()


def test_concurrent_requests_through_a_real_gateway_are_merged_and_answered_exactly(
    merging_gateway: tuple[ServiceProcess, ServiceProcess, str, models.Artifact],
) -> None:
    proc, replica, token, mlp = merging_gateway
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32) for _ in range(48)]

    async def run() -> list[tuple[str, np.ndarray]]:
        async with tca.InferenceServerClient(proc.address) as client:
            async def one(index: int, x: np.ndarray) -> tuple[str, np.ndarray]:
                tensor = tca.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = await client.infer("mlp", [tensor], request_id=f"r{index}",
                                            headers={"authorization": f"Bearer {token}"})
                return result.get_response().id, result.as_numpy("output")

            await one(-1, inputs[0])  # the gateway learns the version's config on the first request
            await asyncio.sleep(0.5)
            return await asyncio.gather(*(one(i, x) for i, x in enumerate(inputs)))

    with tc.InferenceServerClient(replica.address) as direct:
        before = direct.get_inference_statistics("mlp", as_json=True)["model_stats"][0]["inference_stats"]
        answers = asyncio.run(run())
        after = direct.get_inference_statistics("mlp", as_json=True)["model_stats"][0]["inference_stats"]
    for index, ((rid, y), x) in enumerate(zip(answers, inputs, strict=True)):
        assert rid == f"r{index}"
        np.testing.assert_allclose(y, mlp.expected({"input": x})["output"], rtol=1e-5, atol=1e-6)
    calls = int(after["success"].get("count", 0)) - int(before["success"].get("count", 0))
    assert calls < len(inputs) // 2, f"{calls} calls reached the replica for {len(inputs)} requests"
