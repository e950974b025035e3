"""Build a kustomization in Python, so rendering needs no kubectl.

A subset of kustomize: `resources` (files and directories), `namespace`, `labels`,
`images` and `patches` (strategic merge or JSON 6902, inline or from a file, with or
without a target), applied in kustomize's order (patches, namespace, labels, images).
Any other field is refused rather than ignored, so the overlays stay inside what this
module renders exactly as `kubectl kustomize` does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from aiaas.k8s.patch import Manifest, PatchError, json6902, strategic_merge

SUPPORTED_FIELDS = frozenset({"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"})
_KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_CLUSTER_SCOPED = frozenset({
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
    "StorageClass", "PriorityClass", "RuntimeClass", "IngressClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
})
_TEMPLATED_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})
# kustomize's legacy output order, which is also a safe order to apply in.
_ORDER_FIRST = (
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
    "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
    "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
)
_ORDER_LAST = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")


class KustomizeError(ValueError):
    """A kustomization this renderer cannot build (or that kustomize would refuse)."""


def build(directory: Path) -> list[Manifest]:
    """Render the kustomization in `directory` to a list of objects, in kustomize's order."""
    return sorted(_build(Path(directory)), key=sort_key)


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


def _build(directory: Path) -> list[Manifest]:
    kustomization = _load_kustomization(directory)
    objects: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects.extend(_build(path) if path.is_dir() else load_documents(path))
    _check_unique(objects, directory)
    for patch in kustomization.get("patches", []):
        objects = _apply_patch(objects, patch, directory)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for labels in kustomization.get("labels", []):
        _add_labels(objects, labels)
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    return objects


def _load_kustomization(directory: Path) -> dict[str, Any]:
    for name in _KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            data = yaml.safe_load((directory / name).read_text()) or {}
            unsupported = set(data) - SUPPORTED_FIELDS
            if unsupported:
                raise KustomizeError(f"{directory}: unsupported kustomization fields {sorted(unsupported)}")
            return data
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def load_documents(path: Path) -> list[Manifest]:
    """The objects in a YAML file, skipping empty documents."""
    if not path.is_file():
        raise KustomizeError(f"resource {path} does not exist")
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= set(doc):
            raise KustomizeError(f"{path}: every document needs apiVersion, kind and metadata")
    return docs


def resource_id(obj: Manifest) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    group = obj["apiVersion"].rpartition("/")[0]
    return group, obj["kind"], meta.get("namespace", ""), meta["name"]


def _check_unique(objects: Iterable[Manifest], directory: Path) -> None:
    seen: set[tuple[str, str, str, str]] = set()
    for obj in objects:
        rid = resource_id(obj)
        if rid in seen:
            raise KustomizeError(f"{directory}: {rid[1]}/{rid[3]} is defined twice")
        seen.add(rid)


def _apply_patch(objects: list[Manifest], entry: dict[str, Any], directory: Path) -> list[Manifest]:
    if "path" in entry:
        body = yaml.safe_load((directory / entry["path"]).read_text())
    elif "patch" in entry:
        body = yaml.safe_load(entry["patch"])
    else:
        raise KustomizeError(f"{directory}: a patch needs 'path' or 'patch'")
    target = entry.get("target")
    if isinstance(body, list):
        if target is None:
            raise KustomizeError(f"{directory}: a JSON 6902 patch needs a target")
        selected = [_matches(obj, target) for obj in objects]
    elif isinstance(body, dict):
        if target is None:
            group, _, version = str(body.get("apiVersion", "")).rpartition("/")
            target = {"group": re.escape(group), "version": re.escape(version), "kind": body.get("kind"),
                      "name": re.escape(body.get("metadata", {}).get("name", ""))}
        body = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
        body["metadata"] = {k: v for k, v in body.get("metadata", {}).items() if k not in ("name", "namespace")}
        if not body["metadata"]:
            del body["metadata"]
        selected = [_matches(obj, target) for obj in objects]
    else:
        raise KustomizeError(f"{directory}: a patch must be a mapping or a list of operations")
    if not any(selected):
        raise KustomizeError(f"{directory}: patch target {target} matches no resource")
    try:
        return [(json6902(obj, body) if isinstance(body, list) else strategic_merge(obj, body)) if hit else obj
                for obj, hit in zip(objects, selected, strict=True)]
    except PatchError as exc:
        raise KustomizeError(f"{directory}: {exc}") from exc


def _matches(obj: Manifest, target: dict[str, Any]) -> bool:
    unsupported = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unsupported:
        raise KustomizeError(f"unsupported patch target fields {sorted(unsupported)}")
    group, _, version = obj["apiVersion"].rpartition("/")
    meta = obj["metadata"]
    actual = {"group": group, "version": version, "kind": obj["kind"],
              "name": meta["name"], "namespace": meta.get("namespace", "")}
    return all(re.fullmatch(str(pattern), actual[field]) for field, pattern in target.items())


def _add_labels(objects: list[Manifest], entry: dict[str, Any]) -> None:
    if entry.get("includeSelectors") or "fields" in entry:
        raise KustomizeError("labels: only includeSelectors: false without fields is supported")
    pairs = entry.get("pairs", {})
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(pairs)
        if entry.get("includeTemplates") and obj["kind"] in _TEMPLATED_KINDS:
            obj["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
            for claim in obj["spec"].get("volumeClaimTemplates", []):
                claim.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def split_image(image: str) -> tuple[str, str, str]:
    """`registry/name:tag@digest` -> (name, tag, digest); tag and digest may be empty."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1:], digest
    return rest, "", digest


def _set_image(objects: list[Manifest], entry: dict[str, Any]) -> None:
    for obj in objects:
        for container in pod_containers(obj):
            name, tag, digest = split_image(container["image"])
            if name != entry["name"]:
                continue
            name = entry.get("newName", name)
            tag = str(entry.get("newTag", tag))
            digest = entry.get("digest", digest)
            container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def pod_spec(obj: Manifest) -> dict[str, Any] | None:
    """The pod spec of a workload (Deployment, StatefulSet, Job, CronJob, Pod, ...), else None."""
    if obj["kind"] == "Pod":
        return obj.get("spec")
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in _TEMPLATED_KINDS:
        return obj["spec"]["template"]["spec"]
    return None


def pod_containers(obj: Manifest) -> list[dict[str, Any]]:
    spec = pod_spec(obj) or {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]
