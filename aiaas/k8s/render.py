"""Find the kustomize tree in `deploy/k8s` and render an overlay of it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import yaml

from aiaas.k8s.kustomize import KustomizeError, build
from aiaas.k8s.patch import Manifest

OVERLAYS = ("dev", "prod", "gpu")
NAMESPACE = "aiaas"
# The pod label that names the service, and the label every object of the project carries.
NAME_LABEL = "app.kubernetes.io/name"
PART_OF = {"app.kubernetes.io/part-of": "aiaas"}
# Default ports of the services (docs/CONVENTIONS.md): the manifests must agree.
SERVICE_PORTS = {"gateway": 8001, "registry": 50051, "inference": 50052, "monitor": 50053}
METRICS_PORT = 9464


def manifests_root() -> Path:
    """`deploy/k8s`: from $AIAAS_K8S_DIR, else the checkout this package runs from, else the cwd's."""
    override = os.environ.get("AIAAS_K8S_DIR")
    if override:
        return Path(override)
    candidates = [Path(__file__).resolve().parents[2], *Path.cwd().resolve().parents, Path.cwd()]
    for root in candidates:
        if (root / "deploy" / "k8s" / "base").is_dir():
            return root / "deploy" / "k8s"
    raise KustomizeError("no deploy/k8s found: run from a checkout of aiaas or set AIAAS_K8S_DIR")


def overlay_dir(overlay: str) -> Path:
    """An overlay by name (dev, prod, gpu) or a path to any kustomization directory."""
    path = Path(overlay)
    if path.is_dir():
        return path
    candidate = manifests_root() / "overlays" / overlay
    if not candidate.is_dir():
        raise KustomizeError(f"unknown overlay {overlay!r}: expected one of {', '.join(OVERLAYS)} or a directory")
    return candidate


def render(overlay: str) -> list[Manifest]:
    """The objects `kubectl kustomize` would produce for the overlay."""
    return build(overlay_dir(overlay))


def to_yaml(objects: Iterable[Manifest]) -> str:
    """Objects as one multi-document YAML stream, keys sorted like kustomize's output."""
    return "---\n".join(yaml.safe_dump(obj, sort_keys=True, default_flow_style=False) for obj in objects)
