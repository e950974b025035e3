"""Raw forwarding helpers, request limits, shadow comparison, statistics merging, conversions."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from aiaas.api_keys import make_key, stored_key_from_bytes, stored_key_to_bytes
from aiaas.gateway.v1 import gateway_pb2 as gw
from services.common.errors import InvalidArgument, ResourceExhausted
from services.gateway import convert
from services.gateway.entities import QuotaSpec, Role, Route, RouteSplit, ShadowTarget
from services.gateway.limits import RequestLimits, Signature, TensorSpec, check_request
from services.gateway.shadow import compare_responses
from services.gateway.stats import merge_index, merge_statistics
from services.gateway.wire import response_version, retarget, varint, wrap_stream_response


def request(shape: list[int], data: bytes | None = None, datatype: str = "FP32", name: str = "x") -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", model_version="", id="r1")
    tensor = message.inputs.add(name=name, datatype=datatype)
    tensor.shape.extend(shape)
    message.raw_input_contents.append(
        data if data is not None else np.zeros(int(np.prod(shape)), np.float32).tobytes())
    return message


def test_varint() -> None:
    assert [varint(v) for v in (0, 1, 127, 128, 300)] == [b"\0", b"\1", b"\x7f", b"\x80\x01", b"\xac\x02"]


def test_retarget_overrides_version_and_name_without_touching_tensors() -> None:
    original = request([1, 3])
    original.model_version = "7"
    original.model_name = "m:canary"
    raw = original.SerializeToString()
    parsed = pb.ModelInferRequest.FromString(retarget(raw, "m", "12"))
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("m", "12", "r1")
    assert parsed.raw_input_contents == original.raw_input_contents
    parsed = pb.ModelInferRequest.FromString(retarget(raw, "m:production", ""))
    assert (parsed.model_name, parsed.model_version) == ("m:production", "")


def test_response_version_reads_the_leading_fields() -> None:
    response = pb.ModelInferResponse(model_name="m" * 200, model_version="17", id="x",
                                     raw_output_contents=[b"\0" * 1000])
    response.parameters["p"].int64_param = 5
    assert response_version(response.SerializeToString()) == "17"
    assert response_version(pb.ModelInferResponse(id="x").SerializeToString()) == ""


def test_stream_wrapping() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="2", id="a", raw_output_contents=[b"x" * 300])
    wrapped = pb.ModelStreamInferResponse.FromString(wrap_stream_response(response.SerializeToString()))
    assert wrapped.infer_response == response and wrapped.error_message == ""


def test_limits_accept_a_good_request() -> None:
    message = request([2, 3])
    check_request(message, message.ByteSize(), RequestLimits(),
                  Signature(inputs=(TensorSpec("x", "FP32", (-1, 3)),)))
    check_request(message, message.ByteSize(), RequestLimits(),
                  Signature(inputs=(TensorSpec("x", "FP32", (3,)),), batched=True))


@pytest.mark.parametrize("message, limits, signature, error, text", [
    (request([1, 3]), RequestLimits(max_request_bytes=10), None, ResourceExhausted, "over the gateway's limit"),
    (request([1, 1, 1]), RequestLimits(max_rank=2), None, InvalidArgument, "3 dimensions"),
    (request([1, 3], b"\0" * 8), RequestLimits(), None, InvalidArgument, "8 bytes of data"),
    (request([1, 3], datatype="FLOAT32"), RequestLimits(), None, InvalidArgument, "unknown datatype"),
    (request([1, 3]), RequestLimits(max_elements=2), None, InvalidArgument, "3 elements"),
    (request([1, 3]), RequestLimits(), Signature((TensorSpec("y", "FP32", (-1, 3)),)), InvalidArgument,
     "unexpected inference input 'x'"),
    (request([1, 3]), RequestLimits(), Signature((TensorSpec("x", "FP64", (-1, 3)),)), InvalidArgument,
     "expects 'FP64'"),
    (request([1, 3]), RequestLimits(), Signature((TensorSpec("x", "FP32", (-1, 4)),)), InvalidArgument,
     "unexpected shape for input 'x'"),
])
def test_limits_reject(message: pb.ModelInferRequest, limits: RequestLimits, signature: Signature | None,
                       error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        check_request(message, message.ByteSize(), limits, signature)


def test_extra_raw_contents_are_rejected() -> None:
    message = request([1, 3])
    message.raw_input_contents.append(b"\0" * 12)
    with pytest.raises(InvalidArgument, match="2 raw input contents for 1 inputs"):
        check_request(message, message.ByteSize(), RequestLimits())


def response(values: list[float], datatype: str = "FP32") -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(model_name="m")
    out = message.outputs.add(name="y", datatype=datatype)
    out.shape.extend([len(values)])
    message.raw_output_contents.append(np.array(values, dtype=np.float32).tobytes())
    return message


def test_shadow_comparison() -> None:
    same = compare_responses(response([1, 2]), response([1, 2]), 1e-4)
    assert (same.max_abs_diff, same.mismatched) == (0.0, False)
    near = compare_responses(response([1, 2]), response([1, 2.00001]), 1e-3)
    assert not near.mismatched and near.max_abs_diff > 0
    far = compare_responses(response([1, 2]), response([1, 2.5]), 1e-3)
    assert far.mismatched and far.max_abs_diff == pytest.approx(0.5)
    shape = compare_responses(response([1, 2]), response([1, 2, 3]), 1e-3)
    assert shape.mismatched


def test_statistics_merge_sums_replicas_and_hides_models() -> None:
    def stats(name: str, count: int) -> pb.ModelStatisticsResponse:
        entry = pb.ModelStatistics(name=name, version="1", inference_count=count, execution_count=count,
                                   last_inference=count)
        entry.inference_stats.success.count = count
        entry.inference_stats.success.ns = count * 10
        entry.batch_stats.add(batch_size=1).compute_infer.count = count
        return pb.ModelStatisticsResponse(model_stats=[entry])

    merged = merge_statistics([stats("a", 2), stats("a", 3), stats("secret", 9)], lambda n: n != "secret")
    assert len(merged.model_stats) == 1
    entry = merged.model_stats[0]
    assert (entry.inference_count, entry.last_inference, entry.inference_stats.success.ns) == (5, 3, 50)
    assert entry.batch_stats[0].compute_infer.count == 5


def test_index_merge() -> None:
    one = pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(name="a", version="1",
                                                                                  state="LOADING")])
    two = pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(name="a", version="1",
                                                                                  state="READY")])
    merged = merge_index([one, two], lambda n: True, ready_only=False)
    assert [(m.name, m.state) for m in merged.models] == [("a", "READY")]
    assert not merge_index([one], lambda n: True, ready_only=True).models


def test_key_and_route_records_round_trip() -> None:
    entry, _ = make_key(b"p", name="n", models=("a*",), roles=frozenset({Role.INFER}), quota=QuotaSpec(5, 10),
                        expire_time=2e9)
    back = stored_key_from_bytes(stored_key_to_bytes(entry))
    assert back == entry
    route = Route("m", splits=(RouteSplit(alias="production", weight=90), RouteSplit(version=3, weight=10)),
                  sticky=True, shadows=(ShadowTarget(alias="shadow", sample_rate=0.5),), quota=QuotaSpec(100, 20))
    assert convert.route_from_pb(gw.Route.FromString(convert.route_to_pb(route).SerializeToString())) == route


@pytest.mark.parametrize("bad", [
    gw.Route(model=""),
    gw.Route(model="m", splits=[gw.RouteSplit(alias="a", version=1, weight=1)]),
    gw.Route(model="m", splits=[gw.RouteSplit(weight=1)]),
    gw.Route(model="m", shadows=[gw.ShadowTarget(alias="a", sample_rate=1.5)]),
])
def test_bad_routes_are_invalid(bad: gw.Route) -> None:
    with pytest.raises(InvalidArgument):
        convert.route_from_pb(bad)
