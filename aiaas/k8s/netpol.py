"""Which connections the rendered NetworkPolicies admit, evaluated the way Kubernetes does.

Sources are the namespace's workloads (by their `app.kubernetes.io/name`) and `OUTSIDE`,
anything outside the namespace (another namespace, a node, the internet). A destination
pod is reachable on a port when no ingress policy selects it, or when a rule of one that
does admits the source on that port.
"""

from __future__ import annotations

from typing import Any

from aiaas.k8s.checks import service_name, workloads
from aiaas.k8s.manifest import Manifest, pod_spec

OUTSIDE = "<outside>"
Path = tuple[str, str, int]  # (source, destination service, port)


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a label set."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def _peer_admits(peer: dict[str, Any], source: str, pods: dict[str, dict[str, str]]) -> bool:
    if source == OUTSIDE:
        # A podSelector alone means this namespace; namespaceSelector or ipBlock reach outside.
        return "namespaceSelector" in peer or "ipBlock" in peer
    if "ipBlock" in peer:
        return False
    return selector_matches(peer.get("podSelector", {}), pods[source])


def _port_admitted(rule: dict[str, Any], port: int, named: dict[str, int]) -> bool:
    if "ports" not in rule:
        return True
    for entry in rule["ports"]:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        value = entry.get("port")
        number = named.get(value) if isinstance(value, str) else value
        if value is None or number == port or (number is not None and number <= port <= entry.get("endPort", 0)):
            return True
    return False


def allowed_paths(objects: list[Manifest]) -> set[Path]:
    """Every (source, destination, port) the NetworkPolicies admit, over all container ports."""
    pods = {service_name(w): w["spec"]["template"]["metadata"]["labels"] for w in workloads(objects)}
    ports = {service_name(w): {p.get("name", ""): p["containerPort"]
                               for c in (pod_spec(w) or {}).get("containers", []) for p in c.get("ports", [])}
             for w in workloads(objects)}
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"
                and "Ingress" in obj["spec"].get("policyTypes", ["Ingress"])]
    paths: set[Path] = set()
    for destination, labels in pods.items():
        selecting = [p for p in policies if selector_matches(p["spec"]["podSelector"], labels)]
        for port in ports[destination].values():
            for source in [OUTSIDE, *pods]:
                if not selecting or any(
                    _rule_admits(rule, source, port, pods, ports[destination])
                    for policy in selecting for rule in policy["spec"].get("ingress", [])
                ):
                    paths.add((source, destination, port))
    return paths


def _rule_admits(rule: dict[str, Any], source: str, port: int,
                 pods: dict[str, dict[str, str]], named: dict[str, int]) -> bool:
    peers = rule.get("from")
    admitted = peers is None or any(_peer_admits(peer, source, pods) for peer in peers)
    return admitted and _port_admitted(rule, port, named)
