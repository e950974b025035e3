"""Version resolution: explicit versions and aliases, weighted splits, sticky keys, shadows."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.gateway.entities import Route, RouteSplit, ShadowTarget
from services.gateway.router import Catalog


def catalog(rng: random.Random | None = None) -> Catalog:
    cat = Catalog(rng=(rng or random.Random(7)).random)
    for version in (1, 2, 3):
        cat.add_version("m", version)
    cat.move_alias("m", "production", 1)
    cat.move_alias("m", "canary", 2)
    return cat


def test_default_is_the_production_alias_then_the_latest_version() -> None:
    cat = catalog()
    assert (cat.resolve("m").version, cat.resolve("m").alias) == (1, "production")
    cat.move_alias("m", "production", 0)
    assert (cat.resolve("m").version, cat.resolve("m").alias) == (3, "")


def test_explicit_version_and_alias() -> None:
    cat = catalog()
    assert cat.resolve("m", "3").version == 3
    assert cat.resolve("m", alias="canary").version == 2
    assert cat.resolve("m:canary").version == 2
    assert cat.resolve("m:canary").model == "m"


@pytest.mark.parametrize("name, version, alias, error, message", [
    ("nope", "", "", NotFound, "unknown model: 'nope'"),
    ("m", "9", "", NotFound, "version 9"),
    ("m", "x", "", InvalidArgument, "positive decimal"),
    ("m", "-1", "", InvalidArgument, "positive decimal"),
    ("m", "", "staging", NotFound, "no alias 'staging'"),
    ("m", "1", "canary", InvalidArgument, "not both"),
    ("m:canary", "", "production", InvalidArgument, "alias given twice"),
])
def test_bad_names(name: str, version: str, alias: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        catalog().resolve(name, version, alias)


def test_weighted_split_follows_the_weights() -> None:
    cat = catalog()
    cat.put_route(Route("m", splits=(RouteSplit(alias="production", weight=90), RouteSplit(alias="canary", weight=10))))
    counts = Counter(cat.resolve("m").version for _ in range(20_000))
    assert 0.085 < counts[2] / 20_000 < 0.115
    assert set(counts) == {1, 2}


def test_splits_to_missing_aliases_or_zero_weight_are_skipped() -> None:
    cat = catalog()
    cat.put_route(Route("m", splits=(RouteSplit(alias="production", weight=0), RouteSplit(alias="gone", weight=50),
                                      RouteSplit(alias="canary", weight=1))))
    assert {cat.resolve("m").version for _ in range(100)} == {2}
    cat.put_route(Route("m", splits=(RouteSplit(alias="gone", weight=5),)))
    assert cat.resolve("m").version == 1


def test_alias_move_changes_routing_at_once() -> None:
    cat = catalog()
    cat.put_route(Route("m", splits=(RouteSplit(alias="canary", weight=1),)))
    assert cat.resolve("m").version == 2
    cat.move_alias("m", "canary", 3)
    assert cat.resolve("m").version == 3


def test_sticky_keys_land_on_the_same_version() -> None:
    cat = catalog()
    cat.put_route(Route("m", sticky=True, splits=(RouteSplit(alias="production", weight=50),
                                                   RouteSplit(alias="canary", weight=50))))
    for key in (f"user-{i}" for i in range(200)):
        assert len({cat.resolve("m", routing_key=key).version for _ in range(5)}) == 1
    spread = Counter(cat.resolve("m", routing_key=f"user-{i}").version for i in range(2000))
    assert 0.4 < spread[1] / 2000 < 0.6


def test_explicit_alias_bypasses_the_split() -> None:
    cat = catalog()
    cat.put_route(Route("m", splits=(RouteSplit(alias="canary", weight=1),)))
    assert cat.resolve("m", alias="production").version == 1


def test_shadows_are_sampled_and_never_the_live_version() -> None:
    cat = catalog()
    cat.put_route(Route("m", shadows=(ShadowTarget(version=3, sample_rate=0.25),
                                      ShadowTarget(alias="production", sample_rate=1.0))))
    copies = [cat.resolve("m").shadows for _ in range(4000)]
    assert all(all(c.version == 3 for c in s) for s in copies)
    assert 0.2 < sum(1 for s in copies if s) / 4000 < 0.3


def test_alias_targets_forward_the_alias_and_pinned_ones_the_version() -> None:
    cat = catalog()
    assert cat.resolve("m").forward() == ("m:production", "")
    assert cat.resolve("m:canary").forward() == ("m:canary", "")
    assert cat.resolve("m", "3").forward() == ("m", "3")
    cat.put_route(Route("m", splits=(RouteSplit(version=2, weight=1),)))
    assert cat.resolve("m").forward() == ("m", "2")
    cat.remove_route("m")
    cat.move_alias("m", "production", 0)
    assert cat.resolve("m").forward() == ("m", "3")
