"""NetworkPolicies admit exactly the paths the services use, and nothing else."""

from __future__ import annotations

import copy

import pytest

from aiaas.k8s.netpol import OUTSIDE, allowed_paths, selector_matches
from aiaas.k8s.render import METRICS_PORT, SERVICE_PORTS, render

SERVICE_PATHS = {
    ("gateway", "registry", 50051),
    ("inference", "registry", 50051),
    ("monitor", "registry", 50051),
    ("gateway", "inference", 50052),
    ("gateway", "monitor", 50053),
    ("inference", "monitor", 50053),
}
STORE_PATHS = {
    ("registry", "postgres", 5432),
    ("gateway", "redis", 6379),
    ("monitor", "redis", 6379),
}


def expected_paths(pods: set[str], extra: set[tuple[str, str, int]]) -> set[tuple[str, str, int]]:
    # The gateway is public, to every source; Prometheus may scrape each aiaas service's metrics
    # port from any pod in the namespace (never from outside it, and never the data stores).
    public = {(source, "gateway", 8001) for source in pods | {OUTSIDE}}
    scrape = {(source, service, METRICS_PORT) for source in pods for service in SERVICE_PORTS}
    return SERVICE_PATHS | extra | public | scrape


def test_dev_admits_exactly_the_service_paths() -> None:
    pods = {"gateway", "registry", "inference", "monitor"}
    assert allowed_paths(render("dev")) == expected_paths(pods, set())


@pytest.mark.parametrize("overlay", ["prod", "gpu"])
def test_prod_admits_the_data_stores_only_to_their_users(overlay: str) -> None:
    pods = {"gateway", "registry", "inference", "monitor", "postgres", "redis"}
    assert allowed_paths(render(overlay)) == expected_paths(pods, STORE_PATHS)


def test_only_the_gateway_is_reachable_from_outside() -> None:
    paths = allowed_paths(render("prod"))
    assert {(dst, port) for src, dst, port in paths if src == OUTSIDE} == {("gateway", 8001)}


def test_metrics_ports_are_scrapable_only_from_the_namespace() -> None:
    paths = allowed_paths(render("prod"))
    scraped = {dst for src, dst, port in paths if port == METRICS_PORT}
    assert scraped == set(SERVICE_PORTS)
    assert not any(src == OUTSIDE and port == METRICS_PORT for src, _, port in paths)


def test_a_pod_no_policy_selects_is_open_to_all() -> None:
    objects = render("dev")
    assert not any(src == OUTSIDE and dst == "inference" for src, dst, _ in allowed_paths(objects))
    without = [o for o in objects if o["metadata"]["name"] not in ("inference-ingress", "default-deny-ingress")]
    assert (OUTSIDE, "inference", 50052) in allowed_paths(without)
    assert ("monitor", "inference", 50052) in allowed_paths(without)


def test_a_namespace_selector_opens_a_path_from_outside() -> None:
    objects = copy.deepcopy(render("dev"))
    policy = next(o for o in objects if o["metadata"]["name"] == "registry-ingress")
    policy["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
    assert (OUTSIDE, "registry", 50051) in allowed_paths(objects)


def test_selector_matches_labels_and_expressions() -> None:
    labels = {"app.kubernetes.io/name": "gateway", "tier": "edge"}
    assert selector_matches({}, labels)
    assert selector_matches({"matchLabels": {"tier": "edge"}}, labels)
    assert not selector_matches({"matchLabels": {"tier": "core"}}, labels)
    expression = {"key": "tier", "operator": "In", "values": ["edge", "core"]}
    assert selector_matches({"matchExpressions": [expression]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["edge"]}]},
                                labels)
    assert selector_matches({"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "zone", "operator": "Exists"}]}, labels)
