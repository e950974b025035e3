"""Talk to the cluster of the current kube context: server-side apply, rollout watch, pod list."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

from aiaas.k8s.manifest import Manifest
from aiaas.k8s.render import PART_OF
from aiaas.k8s.rollout import (
    ROLLOUT_KINDS,
    PodRow,
    apply_plan,
    generated_secret,
    missing_secrets,
    mounted_secrets,
    pod_row,
    rollout_state,
)

FIELD_MANAGER = "aiaas"
Progress = Callable[[str], None]


class ClusterUnavailable(RuntimeError):
    """No kube context to use, or its API server cannot be reached."""


class MissingKinds(RuntimeError):
    """Kinds the overlay uses (cert-manager's) that the cluster's API does not serve."""


class MissingSecrets(RuntimeError):
    """Secrets the pods mount that nothing in the overlay creates, absent from the cluster."""


def connect(context: str | None = None) -> DynamicClient:
    """A client for the given kube context (default: current), or the in-cluster account."""
    try:
        try:
            api = config.new_client_from_config(context=context)
        except config.ConfigException:
            if context:
                raise
            config.load_incluster_config()
            api = client.ApiClient()
        # DynamicClient reads the API server's discovery documents here.
        return DynamicClient(api)
    except config.ConfigException as exc:
        raise ClusterUnavailable(f"no usable kube context: {exc}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise ClusterUnavailable(f"cannot reach the API server: {exc}") from exc


def apply(dyn: DynamicClient, objects: list[Manifest], progress: Progress, *,
          generate_secrets: bool = True, dry_run: bool = False) -> None:
    """Server-side apply every object in plan order, forcing ownership of conflicting fields.

    Secrets the overlay reads but does not ship are created with random values when absent,
    after the namespace and before any workload; existing ones are never touched. Secrets the
    pods mount (certificates) are never invented: when one is absent and no cert-manager
    Certificate of the overlay issues it, nothing past the namespace is applied.
    """
    plan = apply_plan(objects)
    _require_kinds(dyn, plan)
    namespaces = [o for o in plan if o["kind"] == "Namespace"]
    for obj in namespaces:
        _apply_one(dyn, obj, progress, dry_run)
    _require_mounted_secrets(dyn, objects)
    if generate_secrets:
        for (namespace, name), keys in sorted(missing_secrets(objects).items()):
            _ensure_secret(dyn, namespace, name, keys, progress, dry_run)
    for obj in plan:
        if obj["kind"] != "Namespace":
            _apply_one(dyn, obj, progress, dry_run)


def _apply_one(dyn: DynamicClient, obj: Manifest, progress: Progress, dry_run: bool) -> None:
    resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    dyn.server_side_apply(resource, body=obj, field_manager=FIELD_MANAGER, force_conflicts=True,
                          dry_run="All" if dry_run else None)
    progress(f"applied {obj['kind'].lower()}/{obj['metadata']['name']}")


def _require_kinds(dyn: DynamicClient, plan: list[Manifest]) -> None:
    """Every kind the overlay uses is served by the cluster (prod needs cert-manager's CRDs)."""
    unknown = []
    for api_version, kind in dict.fromkeys((o["apiVersion"], o["kind"]) for o in plan):
        try:
            dyn.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            unknown.append(f"{api_version} {kind}")
    if unknown:
        hint = " (install cert-manager: https://cert-manager.io/docs/installation/)" if any(
            "cert-manager.io" in u for u in unknown) else ""
        raise MissingKinds(f"the cluster does not serve {', '.join(unknown)}{hint}")


def _require_mounted_secrets(dyn: DynamicClient, objects: list[Manifest]) -> None:
    resource = dyn.resources.get(api_version="v1", kind="Secret")
    absent: dict[str, list[str]] = {}
    for (namespace, name), user in sorted(mounted_secrets(objects).items()):
        try:
            dyn.get(resource, name=name, namespace=namespace)
        except NotFoundError:
            absent.setdefault(namespace, []).append(f"secret/{name} (mounted by {user})")
    if absent:
        namespace, secrets = min(absent.items())
        raise MissingSecrets(
            f"missing in namespace {namespace}: {', '.join(secrets)}. For development certificates run "
            f"`aiaas k8s dev-certs DIR --namespace {namespace}` and `kubectl apply -f DIR/secrets.yaml`, "
            "then apply again (docs/kubernetes.md)")


def _ensure_secret(dyn: DynamicClient, namespace: str, name: str, keys: set[str],
                   progress: Progress, dry_run: bool) -> None:
    resource = dyn.resources.get(api_version="v1", kind="Secret")
    try:
        dyn.get(resource, name=name, namespace=namespace)
        progress(f"secret/{name} exists, kept")
    except NotFoundError:
        dyn.create(resource, body=generated_secret(namespace, name, keys), namespace=namespace,
                   dry_run="All" if dry_run else None)
        progress(f"created secret/{name} with random {', '.join(sorted(keys))}")


def wait_for_rollouts(dyn: DynamicClient, objects: list[Manifest], progress: Progress,
                      timeout_s: float) -> list[str]:
    """Watch the overlay's workloads until each is rolled out; returns those that are not."""
    pending = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
               for o in objects if o["kind"] in ROLLOUT_KINDS}
    deadline = time.monotonic() + timeout_s
    for kind in ROLLOUT_KINDS:
        for namespace in sorted({ns for k, ns, _ in pending if k == kind}):
            _watch_kind(dyn, kind, namespace, pending, progress, deadline)
    return [f"{kind.lower()}/{name}" for kind, _, name in sorted(pending)]


def _watch_kind(dyn: DynamicClient, kind: str, namespace: str, pending: set[tuple[str, str, str]],
                progress: Progress, deadline: float) -> None:
    resource = dyn.resources.get(api_version="apps/v1", kind=kind)
    last: dict[str, str] = {}
    while any(k == kind and ns == namespace for k, ns, _ in pending):
        remaining = int(deadline - time.monotonic())
        if remaining <= 0:
            return
        # A watch starts with the current state of each object, then streams each change.
        for event in dyn.watch(resource, namespace=namespace, timeout=min(remaining, 60)):
            obj: dict[str, Any] = event["raw_object"]
            if event["type"] not in ("ADDED", "MODIFIED"):
                continue
            key = (kind, namespace, obj["metadata"]["name"])
            if key not in pending:
                continue
            state = rollout_state(obj)
            label = f"{kind.lower()}/{key[2]}"
            if state.failed:
                raise RuntimeError(f"{label}: {state.message}")
            if last.get(label) != state.message:
                progress(f"{label}: {state.message}")
                last[label] = state.message
            if state.done:
                pending.discard(key)
            if not any(k == kind and ns == namespace for k, ns, _ in pending):
                return


def list_pods(dyn: DynamicClient, namespace: str) -> list[PodRow]:
    """The project's pods in the namespace, by service then name."""
    resource = dyn.resources.get(api_version="v1", kind="Pod")
    selector = ",".join(f"{k}={v}" for k, v in PART_OF.items())
    pods = dyn.get(resource, namespace=namespace, label_selector=selector).to_dict()["items"]
    return sorted((pod_row(pod) for pod in pods), key=lambda row: (row.service, row.name))
