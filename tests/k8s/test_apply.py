"""`aiaas k8s apply` against a recording stand-in for the dynamic client (no cluster here):
what is applied, in which order, with which options, and which Secrets are created."""

from __future__ import annotations

from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import NotFoundError

from aiaas.k8s import cluster
from aiaas.k8s.render import render


class Resource:
    def __init__(self, api_version: str, kind: str) -> None:
        self.api_version, self.kind = api_version, kind


class Resources:
    def get(self, api_version: str, kind: str) -> Resource:
        return Resource(api_version, kind)


class RecordingClient:
    """Records server-side applies and creates; `existing` names the Secrets already there."""

    def __init__(self, existing: set[str]) -> None:
        self.resources = Resources()
        self.existing = existing
        self.calls: list[tuple[str, str, str, dict[str, Any]]] = []

    def server_side_apply(self, resource: Resource, body: dict, **options: Any) -> None:
        self.calls.append(("apply", resource.kind, body["metadata"]["name"], options))

    def get(self, resource: Resource, name: str, namespace: str) -> dict:
        if name not in self.existing:
            raise NotFoundError(ApiException(status=404, reason="Not Found"))
        return {}

    def create(self, resource: Resource, body: dict, namespace: str, **options: Any) -> None:
        self.calls.append(("create", resource.kind, body["metadata"]["name"], {"keys": set(body["stringData"])}))


def test_apply_creates_missing_secrets_after_the_namespace_and_before_workloads() -> None:
    client = RecordingClient(existing={"aiaas-secrets"})
    messages: list[str] = []
    cluster.apply(client, render("prod"), messages.append)  # type: ignore[arg-type]
    assert client.calls[0][:3] == ("apply", "Namespace", "aiaas")
    assert client.calls[1] == ("create", "Secret", "aiaas-postgres", {"keys": {"password"}})
    applied = [(kind, name) for verb, kind, name, _ in client.calls if verb == "apply"]
    assert len(applied) == len(render("prod"))
    assert applied.index(("ConfigMap", "aiaas-config")) < applied.index(("StatefulSet", "registry"))
    for verb, _, _, options in client.calls:
        if verb == "apply":
            assert options == {"field_manager": "aiaas", "force_conflicts": True, "dry_run": None}
    assert "secret/aiaas-secrets exists, kept" in messages
    assert "created secret/aiaas-postgres with random password" in messages


def test_dev_needs_no_generated_secret_and_dry_run_is_passed_through() -> None:
    client = RecordingClient(existing=set())
    cluster.apply(client, render("dev"), lambda _: None, dry_run=True)  # type: ignore[arg-type]
    assert all(verb == "apply" and options["dry_run"] == "All" for verb, _, _, options in client.calls)
