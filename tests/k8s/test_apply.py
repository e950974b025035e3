"""`aiaas k8s apply` against a recording stand-in for the dynamic client (no cluster here):
what is applied, in which order, with which options, which Secrets are created, and what is
refused before anything changes (certificates nobody issues, kinds the cluster does not serve)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

from aiaas.k8s import cluster
from aiaas.k8s.render import render
from aiaas.k8s.rollout import mounted_secrets


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
    # cert-manager makes the TLS Secrets in prod, so none of those has to exist beforehand.
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


DEV_TLS_SECRETS = {"registry-tls", "inference-tls", "monitor-tls", "gateway-client-tls", "gateway-tls"}


def test_dev_generates_only_the_pepper_and_dry_run_is_passed_through() -> None:
    client = RecordingClient(existing=DEV_TLS_SECRETS)
    messages: list[str] = []
    cluster.apply(client, render("dev"), messages.append, dry_run=True)  # type: ignore[arg-type]
    assert client.calls[1] == ("create", "Secret", "aiaas-secrets", {"keys": {"gateway-key-pepper"}})
    assert "created secret/aiaas-secrets with random gateway-key-pepper" in messages
    assert all(options["dry_run"] == "All" for verb, _, _, options in client.calls if verb == "apply")


def test_dev_without_its_certificates_stops_after_the_namespace() -> None:
    client = RecordingClient(existing=DEV_TLS_SECRETS - {"inference-tls", "gateway-tls"})
    with pytest.raises(cluster.MissingSecrets) as caught:
        cluster.apply(client, render("dev"), lambda _: None)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "secret/gateway-tls (mounted by deployment/gateway), secret/inference-tls (mounted by " \
           "deployment/inference)" in message
    assert "registry-tls" not in message
    assert "aiaas k8s dev-certs DIR --namespace aiaas" in message
    assert [call[:3] for call in client.calls] == [("apply", "Namespace", "aiaas")]


def test_prod_certificates_come_from_cert_manager_so_none_is_required() -> None:
    objects = render("prod")
    assert mounted_secrets(objects) == {}
    assert mounted_secrets([o for o in objects if o["kind"] != "Certificate"]) == {
        ("aiaas", name): user for name, user in (
            ("registry-tls", "statefulset/registry"), ("inference-tls", "deployment/inference"),
            ("monitor-tls", "deployment/monitor"), ("gateway-client-tls", "deployment/gateway"),
            ("gateway-tls", "deployment/gateway"), ("postgres-tls", "statefulset/postgres"))}


class ResourcesWithoutCertManager(Resources):
    """The discovery of a cluster where cert-manager's CRDs are not installed."""

    def get(self, api_version: str, kind: str) -> Resource:
        if api_version.startswith("cert-manager.io/"):
            raise ResourceNotFoundError(f"No matches found for {{'api_version': '{api_version}', 'kind': '{kind}'}}")
        return super().get(api_version, kind)


def test_a_cluster_without_cert_manager_is_refused_before_anything_is_applied() -> None:
    client = RecordingClient(existing=set())
    client.resources = ResourcesWithoutCertManager()
    with pytest.raises(cluster.MissingKinds, match=r"does not serve cert-manager.io/v1 (Certificate|Issuer), "
                                                  r"cert-manager.io/v1 (Certificate|Issuer) \(install cert-manager"):
        cluster.apply(client, render("prod"), lambda _: None)  # type: ignore[arg-type]
    assert client.calls == []
