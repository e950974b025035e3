"""NetworkPolicies admit exactly the paths the services use, in both directions (the caller's
egress and the callee's ingress), the cluster DNS, and nothing else."""

from __future__ import annotations

import copy

import pytest

from aiaas.k8s.manifest import Manifest
from aiaas.k8s.netpol import (
    DNS_PEER,
    DNS_PORT,
    KUBE_DNS,
    NEIGHBOUR,
    OUTSIDE,
    allowed_paths,
    reaching_outside,
    selector_matches,
)
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
    # The gateway is public, to every source but our own pods, whose egress is limited to what
    # they call; a neighbour in the namespace (Prometheus) may scrape each aiaas service's metrics
    # port, nobody outside it may, and the data stores have none. Every pod resolves names.
    # Both doors: gRPC on 8001 and the OpenAI-compatible HTTP API on 8000.
    public = {(source, "gateway", port) for source in (OUTSIDE, NEIGHBOUR) for port in (8001, 8000)}
    scrape = {(NEIGHBOUR, service, METRICS_PORT) for service in SERVICE_PORTS}
    dns = {(pod, KUBE_DNS, DNS_PORT) for pod in pods}
    return SERVICE_PATHS | extra | public | scrape | dns


def test_dev_admits_exactly_the_service_paths() -> None:
    pods = {"gateway", "registry", "inference", "monitor"}
    assert allowed_paths(render("dev")) == expected_paths(pods, set())


@pytest.mark.parametrize("overlay", ["prod", "gpu"])
def test_prod_admits_the_data_stores_only_to_their_users(overlay: str) -> None:
    pods = {"gateway", "registry", "inference", "monitor", "postgres", "redis"}
    assert allowed_paths(render(overlay)) == expected_paths(pods, STORE_PATHS)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_no_pod_reaches_outside_the_namespace_but_the_cluster_dns(overlay: str) -> None:
    assert reaching_outside(render(overlay)) == set()


def test_only_the_gateway_is_reachable_from_outside() -> None:
    paths = allowed_paths(render("prod"))
    assert {(dst, port) for src, dst, port in paths if src == OUTSIDE} == {("gateway", 8001), ("gateway", 8000)}


def test_metrics_ports_are_scrapable_only_from_the_namespace() -> None:
    paths = allowed_paths(render("prod"))
    scraped = {dst for src, dst, port in paths if port == METRICS_PORT}
    assert scraped == set(SERVICE_PORTS)
    assert not any(src == OUTSIDE and port == METRICS_PORT for src, _, port in paths)


def without(objects: list[Manifest], *names: str) -> list[Manifest]:
    return [o for o in objects if not (o["kind"] == "NetworkPolicy" and o["metadata"]["name"] in names)]


def test_a_pod_no_policy_selects_is_open_to_all() -> None:
    objects = render("dev")
    assert not any(src == OUTSIDE and dst == "inference" for src, dst, _ in allowed_paths(objects))
    open_ingress = without(objects, "inference-ingress", "default-deny-ingress")
    assert (OUTSIDE, "inference", 50052) in allowed_paths(open_ingress)
    # The monitor's own egress still keeps it from inference.
    assert ("monitor", "inference", 50052) not in allowed_paths(open_ingress)
    # Any egress policy that selects the monitor (dns-egress too) limits it; with none it is open.
    open_both = without(open_ingress, "default-deny-egress", "dns-egress", "monitor-egress")
    assert ("monitor", "inference", 50052) in allowed_paths(open_both)
    # In dev the registry calls nothing, so only those two policies held it in as well.
    assert reaching_outside(open_both) == {"monitor", "registry"}


def test_a_taken_over_inference_pod_cannot_reach_the_data_stores_or_the_internet() -> None:
    objects = render("prod")
    reachable = {(dst, port) for src, dst, port in allowed_paths(objects) if src == "inference"}
    assert reachable == {("registry", 50051), ("monitor", 50053), (KUBE_DNS, DNS_PORT)}
    # Without the egress policies, ingress alone would still let it scrape and resolve, not more.
    ingress_only = without(objects, "default-deny-egress", "inference-egress", "dns-egress")
    assert "inference" in reaching_outside(ingress_only)


def test_egress_to_an_ip_block_or_another_namespace_reaches_outside() -> None:
    objects = copy.deepcopy(render("dev"))
    policy = next(o for o in objects if o["metadata"]["name"] == "monitor-egress")
    policy["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 4317}]})
    assert reaching_outside(objects) == {"monitor"}
    policy["spec"]["egress"][-1] = {"to": [{"namespaceSelector": {}}]}
    assert reaching_outside(objects) == {"monitor"}


def test_the_dns_peer_is_not_outside_and_needs_udp_and_tcp() -> None:
    objects = copy.deepcopy(render("dev"))
    dns = next(o for o in objects if o["metadata"]["name"] == "dns-egress")
    assert dns["spec"]["egress"][0]["to"] == [DNS_PEER]
    assert reaching_outside(objects) == set()
    dns["spec"]["egress"][0]["ports"] = [{"protocol": "UDP", "port": 53}]
    assert not any(dst == KUBE_DNS for _, dst, _ in allowed_paths(objects))


def test_egress_and_ingress_must_both_admit_a_path() -> None:
    objects = copy.deepcopy(render("dev"))
    egress = next(o for o in objects if o["metadata"]["name"] == "monitor-egress")
    egress["spec"]["egress"].append({"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "inference"}}}],
                                     "ports": [{"port": "grpc"}]})
    # The named port resolves on the destination; inference's ingress still refuses the monitor.
    assert ("monitor", "inference", 50052) not in allowed_paths(objects)
    ingress = next(o for o in objects if o["metadata"]["name"] == "inference-ingress")
    ingress["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {"app.kubernetes.io/name": "monitor"}}})
    assert ("monitor", "inference", 50052) in allowed_paths(objects)


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
