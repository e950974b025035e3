"""Rendered Kubernetes objects as plain dicts, and what the checks, the netpol evaluator and
`apply` read from them: a workload's pod spec and containers, an image's parts, apply order."""

from __future__ import annotations

from typing import Any

Manifest = dict[str, Any]

TEMPLATED_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})
# kustomize's legacy output order (what `kubectl kustomize` prints), which is also a safe
# order to apply in: namespaces, accounts and config before workloads, budgets after them.
_ORDER_FIRST = (
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
    "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
    "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
)
_ORDER_LAST = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")


def sort_key(obj: Manifest) -> tuple[int, str, str, str]:
    kind = obj.get("kind", "")
    if kind in _ORDER_FIRST:
        rank = _ORDER_FIRST.index(kind)
    elif kind in _ORDER_LAST:
        rank = len(_ORDER_FIRST) + 1 + _ORDER_LAST.index(kind)
    else:
        rank = len(_ORDER_FIRST)
    meta = obj.get("metadata", {})
    return rank, kind, meta.get("namespace", ""), meta.get("name", "")


def pod_spec(obj: Manifest) -> dict[str, Any] | None:
    """The pod spec of a workload (Deployment, StatefulSet, Job, CronJob, Pod, ...), else None."""
    if obj["kind"] == "Pod":
        return obj.get("spec")
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in TEMPLATED_KINDS:
        return obj["spec"]["template"]["spec"]
    return None


def pod_containers(obj: Manifest) -> list[dict[str, Any]]:
    spec = pod_spec(obj) or {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def split_image(image: str) -> tuple[str, str, str]:
    """`registry/name:tag@digest` -> (name, tag, digest); tag and digest may be empty."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1:], digest
    return rest, "", digest
