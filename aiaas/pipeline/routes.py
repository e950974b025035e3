"""Traffic weights for a rollout, through the gateway's admin API (`aiaas.gateway.v1.GatewayAdmin`).

A canary step gives an alias a share of the model's traffic and leaves the rest to `production`;
promoting to `production` ends the rollout by dropping the other splits, so the model serves its
default alias again. Shadows, stickiness and quotas on the route are kept as they are.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import grpc

from aiaas.gateway.v1 import gateway_pb2 as gw
from aiaas.gateway.v1 import gateway_pb2_grpc

DEFAULT_GATEWAY = "localhost:8001"
PRODUCTION = "production"


def _label(split: Any) -> str:
    return split.alias or f"version {split.version}"


def split_percentages(route: gw.Route) -> list[dict[str, Any]]:
    total = sum(s.weight for s in route.splits)
    return [{"target": _label(s), "weight": s.weight, "percent": 100.0 * s.weight / total if total else 0.0}
            for s in route.splits]


def with_weight(route: gw.Route, alias: str, weight: int) -> gw.Route:
    """`alias` gets `weight` percent; other non-production splits keep theirs; production the rest."""
    updated = gw.Route()
    updated.CopyFrom(route)
    others = [s for s in route.splits if s.alias not in (alias, PRODUCTION)]
    if weight > 0:
        others.append(gw.RouteSplit(alias=alias, weight=weight))
    rest = max(0, 100 - sum(s.weight for s in others))
    del updated.splits[:]
    if others:
        updated.splits.extend([gw.RouteSplit(alias=PRODUCTION, weight=rest), *others])
    return updated


class RouteEditor:
    def __init__(self, target: str | None = None, api_key: str | None = None, timeout_s: float = 10.0) -> None:
        address = target or os.environ.get("AIAAS_GATEWAY_URL") or DEFAULT_GATEWAY
        self._channel = grpc.insecure_channel(address)
        self.address = address
        self.stub = gateway_pb2_grpc.GatewayAdminStub(self._channel)
        key = api_key or os.environ.get("AIAAS_API_KEY")
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def _current(self, model: str) -> tuple[gw.Route, int]:
        try:
            reply = self.stub.GetRoute(gw.GetRouteRequest(model=model), timeout=self.timeout_s,
                                       metadata=self.metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return gw.Route(model=model), 0
            raise
        return reply.route, reply.revision

    def set_weight(self, model: str, alias: str, weight: int, reason: str = "") -> list[dict[str, Any]]:
        route, revision = self._current(model)
        updated = with_weight(route, alias, weight)
        reply = self.stub.SetRoute(
            gw.SetRouteRequest(route=updated, expected_revision=revision,
                               reason=reason or f"aiaas promote: {alias} {weight}%"),
            timeout=self.timeout_s, metadata=self.metadata,
        )
        return split_percentages(reply.route)

    def finish_rollout(self, model: str, reason: str = "") -> list[dict[str, Any]] | None:
        """Drop the canary splits once production holds the new version; None: all to production."""
        try:
            route, revision = self._current(model)
            if not any(s.alias != PRODUCTION for s in route.splits):
                return None
            updated = gw.Route()
            updated.CopyFrom(route)
            del updated.splits[:]
            self.stub.SetRoute(gw.SetRouteRequest(route=updated, expected_revision=revision,
                                                  reason=reason or "aiaas promote: rollout finished"),
                               timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                raise
            print(f"warning: gateway {self.address} unreachable; canary splits, if any, are unchanged",
                  file=sys.stderr)
        return None
