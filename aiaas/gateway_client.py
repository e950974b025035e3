"""Python SDK for the gateway: API keys and routes (`GatewayAdmin`), quick predictions, and feedback.

    from aiaas import GatewayClient

    with GatewayClient("localhost:8001", api_key="aiaas_...") as gw:
        key, token = gw.create_key("ci", models=["fraud*"], roles=["infer"], rps=50, burst=100)
        gw.set_route("fraud", splits={"production": 90, "canary": 10}, sticky=True,
                     shadows={"shadow": 0.05})
        prediction = gw.predict("fraud", {"input": np.zeros((1, 10), np.float32)}, request_id="tx-42")
        gw.feedback("fraud", "tx-42", labels=[1])   # hours later: the truth for each row

Inference itself is the standard KServe v2 protocol: any `tritonclient.grpc` client pointed at
the gateway works, with `headers={"authorization": "Bearer <token>"}`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from typing import Any, Self

import grpc
from google.protobuf import timestamp_pb2

from aiaas.api_keys import ROLE_NAMES as API_ROLE_NAMES
from aiaas.api_keys import ROLE_TO_PB
from aiaas.gateway.v1 import gateway_pb2 as gw
from aiaas.gateway.v1 import gateway_pb2_grpc as gw_grpc

ROLE_BY_NAME = {name: ROLE_TO_PB[role] for name, role in API_ROLE_NAMES.items()}
ROLE_NAMES = {v: k for k, v in ROLE_BY_NAME.items()}
DEFAULT_URL = "localhost:8001"


def _target(name: str) -> dict[str, Any]:
    """"production" -> alias; "3" -> version 3."""
    return {"version": int(name)} if name.isdigit() else {"alias": name}


def build_route(model: str, splits: Mapping[str, int] | None = None, *, sticky: bool = False,
                shadows: Mapping[str, float] | None = None, rps: float = 0.0, burst: int = 0,
                tokens_per_minute: float = 0.0) -> gw.Route:
    """A Route from plain values: split and shadow targets are alias names, or version numbers as text."""
    route = gw.Route(
        model=model, sticky=sticky,
        splits=[gw.RouteSplit(weight=int(w), **_target(t)) for t, w in (splits or {}).items()],
        shadows=[gw.ShadowTarget(sample_rate=float(r), **_target(t)) for t, r in (shadows or {}).items()],
    )
    if rps or tokens_per_minute:
        route.quota.CopyFrom(gw.Quota(requests_per_second=rps, burst=burst, tokens_per_minute=tokens_per_minute))
    return route


def key_to_dict(key: gw.ApiKey) -> dict[str, Any]:
    return {
        "key_id": key.key_id, "name": key.name, "models": list(key.models),
        "roles": [ROLE_NAMES.get(r, str(r)) for r in key.roles],
        "rps": key.quota.requests_per_second if key.HasField("quota") else 0.0,
        "burst": key.quota.burst if key.HasField("quota") else 0,
        "tokens_per_minute": key.quota.tokens_per_minute if key.HasField("quota") else 0.0,
        "created": key.create_time.ToJsonString() if key.HasField("create_time") else "",
        "expires": key.expire_time.ToJsonString() if key.HasField("expire_time") else "",
        "revoked": key.revoked, "created_by": key.created_by,
    }


def route_to_dict(route: gw.Route) -> dict[str, Any]:
    def name(target: Any) -> str:
        return target.alias or str(target.version)

    return {
        "model": route.model, "sticky": route.sticky,
        "splits": {name(s): s.weight for s in route.splits},
        "shadows": {name(s): s.sample_rate for s in route.shadows},
        "rps": route.quota.requests_per_second if route.HasField("quota") else 0.0,
        "burst": route.quota.burst if route.HasField("quota") else 0,
        "tokens_per_minute": route.quota.tokens_per_minute if route.HasField("quota") else 0.0,
    }


@dataclasses.dataclass(frozen=True)
class Prediction:
    outputs: dict[str, Any]
    # The version that served the request.
    model_version: str


class GatewayClient:
    def __init__(self, url: str = DEFAULT_URL, *, api_key: str | None = None, timeout: float = 30.0,
                 channel_credentials: grpc.ChannelCredentials | None = None) -> None:
        self.url = url
        self.api_key = api_key
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", 2**31 - 1), ("grpc.max_send_message_length", 2**31 - 1)]
        self._channel = (grpc.secure_channel(url, channel_credentials, options=options) if channel_credentials
                         else grpc.insecure_channel(url, options=options))
        self.admin = gw_grpc.GatewayAdminStub(self._channel)
        self.feedback_stub = gw_grpc.FeedbackStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def _call(self, method: Any, request: Any) -> Any:
        return method(request, timeout=self.timeout, metadata=self.metadata)

    # API keys -----------------------------------------------------------------------------

    def create_key(self, name: str = "", *, models: Iterable[str] = (), roles: Iterable[str] = ("infer", "read"),
                   rps: float = 0.0, burst: int = 0, expires_in_s: float | None = None,
                   tokens_per_minute: float = 0.0) -> tuple[gw.ApiKey, str]:
        """Returns (key, token); the token is shown this once and never again. No models: those of the
        key that creates it; no expiry: its expiry. A key never grants more than it holds."""
        request = gw.CreateApiKeyRequest(name=name, models=list(models), roles=[ROLE_BY_NAME[r] for r in roles])
        if rps or tokens_per_minute:
            request.quota.CopyFrom(gw.Quota(requests_per_second=rps, burst=burst,
                                            tokens_per_minute=tokens_per_minute))
        if expires_in_s is not None:
            request.expire_time.FromNanoseconds(int((time.time() + expires_in_s) * 1e9))
        reply = self._call(self.admin.CreateApiKey, request)
        return reply.key, reply.token

    def list_keys(self, include_inactive: bool = False) -> list[gw.ApiKey]:
        return list(self._call(self.admin.ListApiKeys, gw.ListApiKeysRequest(include_inactive=include_inactive)).keys)

    def revoke_key(self, key_id: str, reason: str = "") -> gw.ApiKey:
        return self._call(self.admin.RevokeApiKey, gw.RevokeApiKeyRequest(key_id=key_id, reason=reason)).key

    def expire_key(self, key_id: str, at: float | None = None) -> gw.ApiKey:
        request = gw.ExpireApiKeyRequest(key_id=key_id)
        if at is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromNanoseconds(int(at * 1e9))
            request.expire_time.CopyFrom(stamp)
        return self._call(self.admin.ExpireApiKey, request).key

    # Routes -------------------------------------------------------------------------------

    def set_route(self, model: str, splits: Mapping[str, int] | None = None, *, sticky: bool = False,
                  shadows: Mapping[str, float] | None = None, rps: float = 0.0, burst: int = 0,
                  expected_revision: int = 0, reason: str = "", tokens_per_minute: float = 0.0) -> tuple[gw.Route, int]:
        route = build_route(model, splits, sticky=sticky, shadows=shadows, rps=rps, burst=burst,
                            tokens_per_minute=tokens_per_minute)
        reply = self._call(self.admin.SetRoute, gw.SetRouteRequest(
            route=route, expected_revision=expected_revision, reason=reason))
        return reply.route, reply.revision

    def get_route(self, model: str) -> gw.GetRouteResponse:
        return self._call(self.admin.GetRoute, gw.GetRouteRequest(model=model))

    def list_routes(self) -> list[gw.Route]:
        return list(self._call(self.admin.ListRoutes, gw.ListRoutesRequest()).routes)

    def delete_route(self, model: str, reason: str = "") -> None:
        self._call(self.admin.DeleteRoute, gw.DeleteRouteRequest(model=model, reason=reason))

    # Inference ----------------------------------------------------------------------------

    def predict(self, model: str, inputs: Mapping[str, Any], *, version: str = "", alias: str = "",
                routing_key: str = "", request_id: str = "") -> Prediction:
        """One ModelInfer through the gateway with tritonclient: outputs by name, and the version.
        A `request_id` lets `feedback` label the prediction later (if the gateway sampled it)."""
        import numpy as np
        import tritonclient.grpc as tc
        from tritonclient.utils import np_to_triton_dtype

        headers = dict(self.metadata)
        if alias:
            headers["x-model-alias"] = alias
        if routing_key:
            headers["x-routing-key"] = routing_key
        client = tc.InferenceServerClient(self.url)
        try:
            tensors = []
            for name, value in inputs.items():
                array = np.asarray(value)
                tensor = tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
                tensor.set_data_from_numpy(array)
                tensors.append(tensor)
            result = client.infer(model, tensors, model_version=version, headers=headers,
                                  client_timeout=self.timeout, request_id=request_id)
            response = result.get_response()
            return Prediction({o.name: result.as_numpy(o.name) for o in response.outputs}, response.model_version)
        finally:
            client.close()

    # Feedback -----------------------------------------------------------------------------

    def feedback(self, model: str, request_id: str, labels: Iterable[float | str] = (), *,
                 score: float | None = None) -> gw.SendFeedbackResponse:
        """Label an earlier request (one label per row of its prediction: an int is a class id, a float a
        number, a str a text), or score it (0..1). NOT_FOUND when the gateway kept no prediction under
        that id; ALREADY_EXISTS when it was labeled before."""
        request = gw.SendFeedbackRequest(model=model, request_id=request_id, labels=[to_label(v) for v in labels])
        if score is not None:
            request.score = score
        return self._call(self.feedback_stub.SendFeedback, request)


def to_label(value: float | str) -> gw.Label:
    if isinstance(value, bool):
        return gw.Label(class_id=int(value))
    if isinstance(value, int):
        return gw.Label(class_id=value)
    if isinstance(value, float):
        return gw.Label(number=value)
    if isinstance(value, str):
        return gw.Label(text=value)
    # numpy scalars and the like
    import numbers

    if isinstance(value, numbers.Integral):
        return gw.Label(class_id=int(value))
    if isinstance(value, numbers.Real):
        return gw.Label(number=float(value))
    raise TypeError(f"a label is an int (class id), a float (number) or a str (text), got {type(value).__name__}")
