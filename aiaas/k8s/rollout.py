"""Pure decisions for `aiaas k8s apply` and `status`: the order to apply in, the Secrets an
overlay needs but does not ship, whether a rollout is done, and a pod's readiness."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from aiaas.k8s.manifest import Manifest, pod_containers, pod_spec, sort_key

ROLLOUT_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


def apply_plan(objects: list[Manifest]) -> list[Manifest]:
    """Objects in the order to apply them: namespaces, accounts and config before the
    workloads that use them, workloads before autoscalers, budgets and policies."""
    return sorted(objects, key=sort_key)


def missing_secrets(objects: list[Manifest]) -> dict[tuple[str, str], set[str]]:
    """(namespace, Secret name) -> keys, for Secrets the workloads read that are not rendered."""
    rendered = {(o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects if o["kind"] == "Secret"}
    needed: dict[tuple[str, str], set[str]] = {}
    for obj in objects:
        namespace = obj["metadata"].get("namespace", "")
        for container in pod_containers(obj):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and (namespace, ref["name"]) not in rendered:
                    needed.setdefault((namespace, ref["name"]), set()).add(ref["key"])
    return needed


def mounted_secrets(objects: list[Manifest]) -> dict[tuple[str, str], str]:
    """(namespace, Secret name) -> the workload that mounts it, for Secret volumes that the
    overlay neither renders nor has cert-manager issue (a Certificate's secretName): they
    must exist before the pods can start (development TLS: `aiaas k8s dev-certs`)."""
    provided = {(o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects if o["kind"] == "Secret"}
    provided |= {(o["metadata"].get("namespace", ""), o["spec"]["secretName"]) for o in objects
                 if o["kind"] == "Certificate" and o["apiVersion"].startswith("cert-manager.io/")}
    needed: dict[tuple[str, str], str] = {}
    for obj in objects:
        namespace = obj["metadata"].get("namespace", "")
        for volume in (pod_spec(obj) or {}).get("volumes", []):
            name = volume.get("secret", {}).get("secretName")
            if name and (namespace, name) not in provided:
                needed.setdefault((namespace, name), f"{obj['kind'].lower()}/{obj['metadata']['name']}")
    return needed


def generated_secret(namespace: str, name: str, keys: set[str]) -> Manifest:
    """A Secret with a fresh random URL-safe value per key (safe inside a database URL)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "aiaas"},
                     "annotations": {"aiaas.dev/generated-by": "aiaas k8s apply"}},
        "type": "Opaque",
        "stringData": {key: secrets.token_urlsafe(32) for key in sorted(keys)},
    }


@dataclass(frozen=True)
class RolloutState:
    done: bool
    message: str
    failed: bool = False


def rollout_state(obj: dict[str, Any]) -> RolloutState:
    """What `kubectl rollout status` would say about a Deployment, StatefulSet or DaemonSet."""
    kind = obj["kind"]
    meta, spec, status = obj["metadata"], obj.get("spec", {}), obj.get("status") or {}
    if meta.get("generation", 0) > status.get("observedGeneration", 0):
        return RolloutState(False, "waiting for the spec update to be observed")
    if kind == "Deployment":
        return _deployment_state(spec, status)
    if kind == "StatefulSet":
        return _statefulset_state(spec, status)
    if kind == "DaemonSet":
        desired = status.get("desiredNumberScheduled", 0)
        updated, available = status.get("updatedNumberScheduled", 0), status.get("numberAvailable", 0)
        if updated < desired:
            return RolloutState(False, f"{updated} of {desired} updated pods scheduled")
        if available < desired:
            return RolloutState(False, f"{available} of {desired} updated pods available")
        return RolloutState(True, f"{available} pods available")
    raise ValueError(f"{kind} has no rollout")


def _deployment_state(spec: dict[str, Any], status: dict[str, Any]) -> RolloutState:
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return RolloutState(False, "exceeded its progress deadline", failed=True)
    replicas = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    total = status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < replicas:
        return RolloutState(False, f"{updated} of {replicas} new replicas updated")
    if total > updated:
        return RolloutState(False, f"{total - updated} old replicas pending termination")
    if available < updated:
        return RolloutState(False, f"{available} of {updated} updated replicas available")
    return RolloutState(True, f"{available} of {replicas} replicas available")


def _statefulset_state(spec: dict[str, Any], status: dict[str, Any]) -> RolloutState:
    replicas = spec.get("replicas", 1)
    ready = status.get("readyReplicas", 0)
    if ready < replicas:
        return RolloutState(False, f"{ready} of {replicas} pods ready")
    strategy = spec.get("updateStrategy", {})
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        return RolloutState(True, f"{ready} pods ready")
    partition = strategy.get("rollingUpdate", {}).get("partition", 0)
    updated = status.get("updatedReplicas", 0)
    if updated < replicas - partition:
        return RolloutState(False, f"{updated} of {replicas - partition} pods updated")
    if partition == 0 and status.get("updateRevision") != status.get("currentRevision"):
        return RolloutState(False, "waiting for the last pods to reach the update revision")
    return RolloutState(True, f"{ready} of {replicas} pods ready at revision {status.get('updateRevision', '?')}")


@dataclass(frozen=True)
class PodRow:
    name: str
    service: str
    phase: str
    ready: str
    restarts: int
    node: str

    @property
    def is_ready(self) -> bool:
        left, _, right = self.ready.partition("/")
        return self.phase == "Running" and left == right


def pod_row(pod: dict[str, Any]) -> PodRow:
    """One line of `aiaas k8s status` from a Pod object (as a dict)."""
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for s in statuses if s.get("ready"))
    phase = status.get("phase", "Unknown")
    if meta.get("deletionTimestamp"):
        phase = "Terminating"
    return PodRow(
        name=meta["name"],
        service=(meta.get("labels") or {}).get("app.kubernetes.io/name", "?"),
        phase=phase,
        ready=f"{ready}/{len(spec.get('containers', statuses))}",
        restarts=sum(s.get("restartCount", 0) for s in statuses),
        node=spec.get("nodeName") or "-",
    )
