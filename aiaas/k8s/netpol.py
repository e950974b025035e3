"""Which connections the rendered NetworkPolicies admit, evaluated the way Kubernetes does:
a connection must be admitted both by the source pod's egress and by the destination's ingress.

Sources are the namespace's workloads (by their `app.kubernetes.io/name`), `NEIGHBOUR` (a pod
of the namespace that is not the project's, such as a Prometheus, with no labels) and `OUTSIDE`
(anything outside the namespace: another namespace, a node, the internet). Destinations are the
workloads' container ports and `KUBE_DNS` (the cluster DNS, port 53). A pod is open in a
direction when no policy of that type selects it; otherwise a rule of one that does must admit
the peer and the port. Peers outside the namespace are judged conservatively: any
namespaceSelector or ipBlock may reach `OUTSIDE`, except the one peer that pins the cluster DNS.
"""

from __future__ import annotations

from typing import Any

from aiaas.k8s.checks import service_name, workloads
from aiaas.k8s.manifest import Manifest, pod_spec

OUTSIDE = "<outside>"
NEIGHBOUR = "<neighbour>"
KUBE_DNS = "<kube-dns>"
DNS_PORT = 53
# How a policy names the cluster DNS: CoreDNS pods keep kube-dns's label in kube-system.
DNS_NAMESPACE_LABELS = {"kubernetes.io/metadata.name": "kube-system"}
DNS_POD_LABELS = {"k8s-app": "kube-dns"}
DNS_PEER = {"namespaceSelector": {"matchLabels": DNS_NAMESPACE_LABELS},
            "podSelector": {"matchLabels": DNS_POD_LABELS}}
Path = tuple[str, str, int]  # (source, destination, port)


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


def _types(policy: Manifest) -> list[str]:
    """policyTypes, with Kubernetes' default: Ingress, plus Egress when the policy has egress rules."""
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def _port_admitted(rule: dict[str, Any], port: int, named: dict[str, int], protocol: str = "TCP") -> bool:
    if "ports" not in rule:
        return True
    for entry in rule["ports"]:
        if entry.get("protocol", "TCP") != protocol:
            continue
        value = entry.get("port")
        number = named.get(value) if isinstance(value, str) else value
        if value is None or number == port or (number is not None and number <= port <= entry.get("endPort", 0)):
            return True
    return False


class Namespace:
    """The rendered namespace: each workload's pod labels and named container ports, and its policies."""

    def __init__(self, objects: list[Manifest]) -> None:
        self.labels = {service_name(w): w["spec"]["template"]["metadata"]["labels"] for w in workloads(objects)}
        self.ports = {service_name(w): {p.get("name", ""): p["containerPort"]
                                        for c in (pod_spec(w) or {}).get("containers", []) for p in c.get("ports", [])}
                      for w in workloads(objects)}
        self.policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]

    def source_labels(self, source: str) -> dict[str, str]:
        return {} if source in (NEIGHBOUR, OUTSIDE) else self.labels[source]

    def _selecting(self, labels: dict[str, str], kind: str) -> list[Manifest]:
        return [p for p in self.policies if kind in _types(p) and selector_matches(p["spec"]["podSelector"], labels)]

    def ingress_admits(self, source: str, destination: str, port: int) -> bool:
        selecting = self._selecting(self.labels[destination], "Ingress")
        return not selecting or any(
            self._from_admits(rule, source) and _port_admitted(rule, port, self.ports[destination])
            for policy in selecting for rule in policy["spec"].get("ingress", []))

    def _from_admits(self, rule: dict[str, Any], source: str) -> bool:
        peers = rule.get("from")
        if peers is None:
            return True
        for peer in peers:
            if source == OUTSIDE:
                # A podSelector alone means this namespace; namespaceSelector or ipBlock reach outside.
                if "namespaceSelector" in peer or "ipBlock" in peer:
                    return True
            elif "ipBlock" not in peer and selector_matches(peer.get("podSelector", {}), self.source_labels(source)):
                return True
        return False

    def egress_admits(self, source: str, destination: str, port: int, protocol: str = "TCP") -> bool:
        """Whether the source's egress policies let it open this connection (OUTSIDE is not ours to limit)."""
        if source == OUTSIDE:
            return True
        selecting = self._selecting(self.source_labels(source), "Egress")
        named = self.ports.get(destination, {})
        return not selecting or any(
            self._to_admits(rule, destination) and _port_admitted(rule, port, named, protocol)
            for policy in selecting for rule in policy["spec"].get("egress", []))

    def _to_admits(self, rule: dict[str, Any], destination: str) -> bool:
        peers = rule.get("to")
        if peers is None:
            return True
        for peer in peers:
            if destination == OUTSIDE:
                if "ipBlock" in peer or ("namespaceSelector" in peer and peer != DNS_PEER):
                    return True
            elif destination == KUBE_DNS:
                if "namespaceSelector" in peer and selector_matches(peer["namespaceSelector"], DNS_NAMESPACE_LABELS) \
                        and selector_matches(peer.get("podSelector", {}), DNS_POD_LABELS):
                    return True
            elif "ipBlock" not in peer and selector_matches(peer.get("podSelector", {}), self.labels[destination]):
                return True
        return False


def allowed_paths(objects: list[Manifest]) -> set[Path]:
    """Every (source, destination, port) both sides' policies admit: to the workloads' container
    ports over TCP, and from the workloads to KUBE_DNS on port 53 (UDP and TCP both)."""
    namespace = Namespace(objects)
    paths: set[Path] = set()
    for destination, ports in namespace.ports.items():
        for port in ports.values():
            for source in [OUTSIDE, NEIGHBOUR, *namespace.labels]:
                if namespace.egress_admits(source, destination, port) and \
                        namespace.ingress_admits(source, destination, port):
                    paths.add((source, destination, port))
    for source in namespace.labels:
        if all(namespace.egress_admits(source, KUBE_DNS, DNS_PORT, protocol) for protocol in ("UDP", "TCP")):
            paths.add((source, KUBE_DNS, DNS_PORT))
    return paths


def reaching_outside(objects: list[Manifest]) -> set[str]:
    """The workloads whose egress reaches anything outside the namespace but the cluster DNS,
    on some port (an unrestricted pod, a rule without `to`, an ipBlock, another namespace)."""
    namespace = Namespace(objects)
    rules_ports = {entry.get("port") for policy in namespace.policies for rule in policy["spec"].get("egress", [])
                   for entry in rule.get("ports", [])}
    # A rule limited to some ports reaches outside on one of them; probe each, and one no rule names.
    candidates = {p for p in rules_ports if isinstance(p, int)} | {443}
    return {source for source in namespace.labels
            if any(namespace.egress_admits(source, OUTSIDE, port, protocol)
                   for port in candidates for protocol in ("TCP", "UDP"))}
