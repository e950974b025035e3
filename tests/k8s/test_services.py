"""The manifests against the services' own settings: default ports, and the environment each
container gets loads into that service's settings."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from aiaas.k8s.checks import workloads
from aiaas.k8s.render import METRICS_PORT, OVERLAYS, SERVICE_PORTS, render
from services.common.settings import ServerSettings, load_settings
from tests.k8s.specs import spec_of


def settings_class(service: str) -> type[ServerSettings]:
    module = importlib.import_module(f"services.{service}.settings")
    classes = [value for value in vars(module).values()
               if isinstance(value, type) and issubclass(value, ServerSettings) and value is not ServerSettings
               and value.__module__ == module.__name__]
    assert len(classes) == 1, f"services.{service}.settings should define one ServerSettings subclass"
    return classes[0]


def container_environment(overlay: str, service: str) -> dict[str, str]:
    """The variables the service's container sees; Secret values become placeholders and
    $(VAR) references are expanded as the kubelet does."""
    objects = render(overlay)
    data = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
    workload = next(w for w in workloads(objects) if w["metadata"]["name"] == service)
    container = next(c for c in spec_of(workload)["containers"] if c["name"] == service)
    env = dict(data)
    for entry in container.get("env", []):
        value = entry.get("value", "secret-placeholder")
        for name, known in env.items():
            value = value.replace(f"$({name})", known)
        env[entry["name"]] = value
    return env


@pytest.mark.parametrize("service", sorted(SERVICE_PORTS))
def test_manifest_port_is_the_service_default(service: str) -> None:
    assert settings_class(service)().port == SERVICE_PORTS[service]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", sorted(SERVICE_PORTS))
def test_container_environment_loads_into_the_service_settings(overlay: str, service: str) -> None:
    env = container_environment(overlay, service)
    settings = load_settings(settings_class(service), [], service=service, environ=env)
    assert settings.port == SERVICE_PORTS[service]
    assert settings.grace_period_s == float(env["AIAAS_GRACE_PERIOD_S"])
    assert settings.metrics_port == METRICS_PORT
    fields = {f.name for f in dataclasses.fields(settings)}
    if "registry_url" in fields and service != "registry":
        assert settings.registry_url == "registry:50051"  # type: ignore[attr-defined]
    if service == "registry":
        database = "sqlite:////data/registry.db" if overlay == "dev" else (
            "postgresql+psycopg://aiaas:secret-placeholder@postgres:5432/aiaas"
            "?sslmode=verify-full&sslrootcert=/etc/aiaas/tls/ca.crt")
        assert settings.database_url == database  # type: ignore[attr-defined]
        assert str(settings.artifact_dir) == "/data/artifacts"  # type: ignore[attr-defined]
    # Every service serves TLS; all but the public gateway ask callers for a certificate.
    served = "/etc/aiaas/public-tls" if service == "gateway" else "/etc/aiaas/tls"
    assert (settings.tls_cert, settings.tls_key) == (f"{served}/tls.crt", f"{served}/tls.key")
    assert settings.tls_client_ca == (None if service == "gateway" else "/etc/aiaas/tls/ca.crt")
    if service == "gateway":
        assert settings.inference_targets == ("dns:///inference-headless:50052",)  # type: ignore[attr-defined]
        assert settings.key_pepper  # type: ignore[attr-defined]
        assert settings.redis_url == (None if overlay == "dev" else "redis://redis:6379/0")  # type: ignore[attr-defined]
    if service == "inference":
        assert settings.device == ("cuda:0" if overlay == "gpu" else "cpu")  # type: ignore[attr-defined]
        assert settings.follow_aliases == ("production", "canary")  # type: ignore[attr-defined]
