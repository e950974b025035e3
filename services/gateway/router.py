"""Version resolution and traffic splitting, from an in-memory catalog fed by the registry's feed.

What the caller names resolves to one target: an explicit version, an explicit alias, or the
model's route (weighted splits between aliases, sticky on a routing key), else its default
alias, else its latest version. Shadow targets are sampled on top of that.

A target chosen by alias is forwarded as `model:alias` (no version): each inference replica
maps the alias to the version it has loaded and warmed, and swaps only once the new one is
ready, so an alias move never sends a request to a version still loading. The response's
`model_version` says which version served it. Pinned versions are forwarded as versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable

from services.common.errors import InvalidArgument, NotFound
from services.gateway.entities import QuotaSpec, Route, RouteSplit

# A version alias may be written into the model name as `model:alias`.
ALIAS_SEPARATOR = ":"


@dataclasses.dataclass
class ModelState:
    versions: set[int] = dataclasses.field(default_factory=set)
    aliases: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def latest(self) -> int:
        return max(self.versions) if self.versions else 0


def forward_target(model: str, alias: str, version: int) -> tuple[str, str]:
    """(model_name, model_version) to forward for an alias or a pinned version."""
    return (f"{model}{ALIAS_SEPARATOR}{alias}", "") if alias else (model, str(version))


@dataclasses.dataclass(frozen=True)
class ShadowCopy:
    version: int
    alias: str

    def forward(self, model: str) -> tuple[str, str]:
        return forward_target(model, self.alias, self.version)


@dataclasses.dataclass(frozen=True)
class Resolution:
    """Where one request goes, and where copies of it go."""

    model: str
    # The version the alias points at in the registry (inference may still be swapping to it).
    version: int
    # The alias it was routed by ("" for a pinned version): telemetry groups by it.
    alias: str = ""
    shadows: tuple[ShadowCopy, ...] = ()
    quota: QuotaSpec | None = None

    def forward(self) -> tuple[str, str]:
        return forward_target(self.model, self.alias, self.version)


def split_point(model: str, routing_key: str) -> float:
    """A stable number in [0, 1) for a routing key: the same key lands on the same split."""
    digest = hashlib.blake2b(f"{model}\0{routing_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def parse_version(text: str) -> int:
    if not text:
        return 0
    if not text.isdigit() or int(text) <= 0:
        raise InvalidArgument(f"model version must be a positive decimal integer, got {text!r}")
    return int(text)


class Catalog:
    """Models, versions, aliases and routes, as last reported by the registry."""

    def __init__(self, default_alias: str = "production", rng: Callable[[], float] = random.random) -> None:
        self.default_alias = default_alias
        self.models: dict[str, ModelState] = {}
        self.routes: dict[str, Route] = {}
        self.route_revisions: dict[str, int] = {}
        self._rng = rng

    # Feed updates -------------------------------------------------------------------------

    def model(self, name: str) -> ModelState:
        return self.models.setdefault(name, ModelState())

    def add_version(self, name: str, version: int) -> None:
        self.model(name).versions.add(version)

    def remove_version(self, name: str, version: int) -> None:
        state = self.models.get(name)
        if state is not None:
            state.versions.discard(version)

    def move_alias(self, name: str, alias: str, version: int) -> None:
        state = self.model(name)
        if version:
            state.aliases[alias] = version
        else:
            state.aliases.pop(alias, None)

    def remove_model(self, name: str) -> None:
        self.models.pop(name, None)

    def put_route(self, route: Route, revision: int = 0) -> None:
        self.routes[route.model] = route
        self.route_revisions[route.model] = revision

    def remove_route(self, model: str) -> None:
        self.routes.pop(model, None)
        self.route_revisions.pop(model, None)

    # Resolution ---------------------------------------------------------------------------

    def target_version(self, model: str, alias: str, version: int) -> int:
        """What a split or shadow target points at now (0 when it resolves to nothing)."""
        state = self.models.get(model)
        if state is None:
            return 0
        if version:
            return version if version in state.versions else 0
        return state.aliases.get(alias, 0)

    def resolve(self, name: str, version_text: str = "", alias: str = "", routing_key: str = "") -> Resolution:
        model = name
        if ALIAS_SEPARATOR in name:
            model, _, named_alias = name.partition(ALIAS_SEPARATOR)
            if alias and alias != named_alias:
                raise InvalidArgument(f"alias given twice: {named_alias!r} in the name and {alias!r}")
            alias = named_alias
        state = self.models.get(model)
        if state is None:
            raise NotFound(f"Request for unknown model: '{model}' is not found")
        route = self.routes.get(model)
        version = parse_version(version_text)
        if version and alias:
            raise InvalidArgument("name a version or an alias, not both")
        if version:
            if version not in state.versions:
                raise NotFound(f"Request for unknown model: '{model}' version {version} is not found")
            chosen, label = version, ""
        elif alias:
            chosen = state.aliases.get(alias, 0)
            if not chosen:
                raise NotFound(f"model '{model}' has no alias '{alias}'")
            label = alias
        else:
            chosen, label = self._route(model, state, route, routing_key)
        return Resolution(
            model=model, version=chosen, alias=label,
            shadows=self._shadows(model, route, chosen) if route is not None and route.shadows else (),
            quota=route.quota if route is not None else None,
        )

    def _route(self, model: str, state: ModelState, route: Route | None, routing_key: str) -> tuple[int, str]:
        if route is not None and route.splits:
            live: list[tuple[RouteSplit, int]] = []
            for split in route.splits:
                target = self.target_version(model, split.alias, split.version)
                if split.weight > 0 and target:
                    live.append((split, target))
            total = sum(split.weight for split, _ in live)
            if total > 0:
                point = split_point(model, routing_key) if route.sticky and routing_key else self._rng()
                mark = point * total
                for split, target in live:
                    mark -= split.weight
                    if mark < 0:
                        return target, split.alias
                split, target = live[-1]
                return target, split.alias
        default = state.aliases.get(self.default_alias, 0)
        if default:
            return default, self.default_alias
        if state.latest:
            return state.latest, ""
        raise NotFound(f"model '{model}' has no versions to serve")

    def _shadows(self, model: str, route: Route, live_version: int) -> tuple[ShadowCopy, ...]:
        copies = []
        for shadow in route.shadows:
            if shadow.sample_rate <= 0 or self._rng() >= shadow.sample_rate:
                continue
            target = self.target_version(model, shadow.alias, shadow.version)
            if target and target != live_version:
                copies.append(ShadowCopy(version=target, alias=shadow.alias))
        return tuple(copies)
