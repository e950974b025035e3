"""Pure conversions between protobuf messages (gateway, registry) and the gateway's entities."""

from __future__ import annotations

from aiaas.api_keys import key_to_pb, quota_from_pb, quota_to_pb, roles_from_pb, time_from_pb
from aiaas.gateway.v1 import gateway_pb2 as gw
from services.common.errors import InvalidArgument
from services.gateway.entities import Route, RouteSplit, ShadowTarget
from services.gateway.limits import Signature, TensorSpec

# The key, quota, role and time codecs are the client vocabulary's (aiaas.api_keys); named here so the
# servicer finds every conversion it needs in one module.
__all__ = [
    "key_to_pb", "quota_from_pb", "quota_to_pb", "roles_from_pb", "route_from_pb", "route_to_pb",
    "signature_from_pb", "time_from_pb",
]


def route_from_pb(route: gw.Route) -> Route:
    if not route.model:
        raise InvalidArgument("route.model is required")
    splits = tuple(RouteSplit(alias=s.alias, version=s.version, weight=s.weight) for s in route.splits)
    shadows = tuple(ShadowTarget(alias=s.alias, version=s.version, sample_rate=s.sample_rate) for s in route.shadows)
    targets: list[RouteSplit | ShadowTarget] = [*splits, *shadows]
    for target in targets:
        if bool(target.alias) == bool(target.version):
            raise InvalidArgument(f"route for {route.model!r}: each split and shadow names an alias or a version")
        if target.version < 0:
            raise InvalidArgument(f"route for {route.model!r}: versions are positive")
    for shadow in shadows:
        if not 0.0 <= shadow.sample_rate <= 1.0:
            raise InvalidArgument(f"route for {route.model!r}: shadow sample_rate must be within 0..1")
    return Route(model=route.model, splits=splits, sticky=route.sticky, shadows=shadows, quota=quota_from_pb(route))


def route_to_pb(route: Route) -> gw.Route:
    message = gw.Route(
        model=route.model, sticky=route.sticky,
        splits=[gw.RouteSplit(alias=s.alias, version=s.version, weight=s.weight) for s in route.splits],
        shadows=[gw.ShadowTarget(alias=s.alias, version=s.version, sample_rate=s.sample_rate) for s in route.shadows],
    )
    if route.quota is not None:
        message.quota.CopyFrom(quota_to_pb(route.quota))
    return message


def signature_from_pb(version: object) -> Signature:
    """The input signature of a registry ModelVersion."""
    return Signature(
        inputs=tuple(
            TensorSpec(name=t.name, datatype=t.datatype, shape=tuple(t.shape))
            for t in version.signature.inputs  # type: ignore[attr-defined]
        ),
        batched=version.serving_config.max_batch_size > 0,  # type: ignore[attr-defined]
    )
