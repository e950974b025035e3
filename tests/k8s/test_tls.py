"""TLS in the rendered overlays: every service serves and dials TLS with the certificate of its
identity, mounted from a Secret; the public gateway serves its public certificate; the registry
verifies PostgreSQL (verify-full) in prod, and PostgreSQL takes nothing but TLS; no overlay
carries a pepper; and the audit names each of these when it is broken."""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from aiaas.k8s.checks import audit, workloads
from aiaas.k8s.manifest import Manifest
from aiaas.k8s.render import OPENAI_PORT, OVERLAYS, SERVICE_PORTS, manifests_root, render
from aiaas.k8s.tls import env_values, secret_file
from tests.k8s.specs import spec_of

SERVED_SECRET = {"gateway": "gateway-tls", "registry": "registry-tls", "inference": "inference-tls",
                 "monitor": "monitor-tls"}
IDENTITY_SECRET = {**SERVED_SECRET, "gateway": "gateway-client-tls"}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Manifest]]:
    return request.param, render(request.param)


def workload(objects: list[Manifest], name: str) -> Manifest:
    return next(w for w in workloads(objects) if w["metadata"]["name"] == name)


def container(objects: list[Manifest], name: str) -> dict[str, Any]:
    return next(c for c in spec_of(workload(objects, name))["containers"] if c["name"] == name)


def mounted(objects: list[Manifest], name: str, setting: str) -> tuple[str, str] | None:
    c = container(objects, name)
    return secret_file(spec_of(workload(objects, name)), c, env_values(c)[setting])


def test_every_service_serves_and_dials_with_its_own_certificate(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    for service in SERVICE_PORTS:
        served, identity = SERVED_SECRET[service], IDENTITY_SECRET[service]
        assert mounted(objects, service, "AIAAS_TLS_CERT") == (served, "tls.crt"), service
        assert mounted(objects, service, "AIAAS_TLS_KEY") == (served, "tls.key"), service
        assert mounted(objects, service, "AIAAS_CLIENT_TLS_CERT") == (identity, "tls.crt"), service
        assert mounted(objects, service, "AIAAS_CLIENT_TLS_KEY") == (identity, "tls.key"), service
        assert mounted(objects, service, "AIAAS_CLIENT_TLS_CA") == (identity, "ca.crt"), service
        env = env_values(container(objects, service))
        # Callers must present a certificate everywhere but at the public door (API keys there).
        if service == "gateway":
            assert "AIAAS_TLS_CLIENT_CA" not in env
        else:
            assert mounted(objects, service, "AIAAS_TLS_CLIENT_CA") == (identity, "ca.crt"), service
        assert "AIAAS_CLIENT_TLS_SERVER_NAME" not in env
        for volume in spec_of(workload(objects, service))["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] == 0o440, (service, volume["name"])
        for mount in container(objects, service)["volumeMounts"]:
            if mount["mountPath"].startswith("/etc/aiaas/"):
                assert mount["readOnly"] is True


def test_identity_is_required_on_every_rpc(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "aiaas-config")
    assert config["data"]["AIAAS_REQUIRE_IDENTITY"] == "true"
    assert not any(key.startswith("AIAAS_IDENTITY_TOKEN") for key in config["data"])


@pytest.mark.parametrize("name", ["prod", "gpu"])
def test_prod_gateway_service_carries_tls_from_a_public_certificate(name: str) -> None:
    objects = render(name)
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "gateway")
    assert service["spec"]["type"] == "LoadBalancer"
    grpc_port, openai_port = service["spec"]["ports"]
    for port, expected in ((grpc_port, SERVICE_PORTS["gateway"]), (openai_port, OPENAI_PORT)):
        target = next(p for p in container(objects, "gateway")["ports"] if p["name"] == port["targetPort"])
        assert target["containerPort"] == expected
    # What listens there (gRPC and the OpenAI door alike) serves gateway-tls, which cert-manager
    # gets from the public issuer.
    assert mounted(objects, "gateway", "AIAAS_TLS_CERT") == ("gateway-tls", "tls.crt")
    certificate = next(o for o in objects if o["kind"] == "Certificate" and o["spec"]["secretName"] == "gateway-tls")
    assert certificate["spec"]["issuerRef"]["kind"] == "ClusterIssuer"


@pytest.mark.parametrize("name", ["prod", "gpu"])
def test_prod_registry_verifies_postgres_which_serves_only_tls(name: str) -> None:
    objects = render(name)
    env = {e["name"]: e for e in container(objects, "registry")["env"]}
    url = urlsplit(env["AIAAS_REGISTRY_DATABASE_URL"]["value"])
    query = {key: values[0] for key, values in parse_qs(url.query).items()}
    assert query == {"sslmode": "verify-full", "sslrootcert": "/etc/aiaas/tls/ca.crt"}
    assert url.hostname == "postgres"
    registry = container(objects, "registry")
    assert secret_file(spec_of(workload(objects, "registry")), registry, query["sslrootcert"]) == (
        "registry-tls", "ca.crt")
    certificates = {o["spec"]["secretName"]: o["spec"] for o in objects if o["kind"] == "Certificate"}
    # The CA in registry-tls is the one that issues postgres-tls, for the name the URL dials.
    assert certificates["postgres-tls"]["issuerRef"] == certificates["registry-tls"]["issuerRef"]
    assert "postgres" in certificates["postgres-tls"]["dnsNames"]
    postgres = container(objects, "postgres")
    settings = dict(arg.split("=", 1) for arg in postgres["args"] if arg != "-c")
    assert settings["ssl"] == "on"
    mounts = {m["mountPath"]: m["name"] for m in postgres["volumeMounts"]}
    volumes = {v["name"]: v for v in spec_of(workload(objects, "postgres"))["volumes"]}
    assert volumes[mounts["/etc/postgres/tls"]]["secret"] == {"secretName": "postgres-tls", "defaultMode": 0o640}
    for key in ("ssl_cert_file", "ssl_key_file"):
        assert settings[key].startswith("/etc/postgres/tls/")
    hba_config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "postgres-config")
    assert volumes[mounts["/etc/postgres/config"]]["configMap"]["name"] == "postgres-config"
    assert settings["hba_file"] == "/etc/postgres/config/pg_hba.conf"
    rules = [line.split() for line in hba_config["data"]["pg_hba.conf"].splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    # Over the network: TLS and a password, or nothing; the socket stays for initdb and probes.
    assert {rule[0] for rule in rules} == {"local", "hostssl"}
    assert all(rule[-1] == "scram-sha-256" for rule in rules if rule[0] == "hostssl")


def pepper_literals(node: Any, where: str) -> list[str]:
    """Places a pepper value is written down: a Secret's or ConfigMap's data key, an env `value`,
    a secretGenerator literal. References to the Secret (secretKeyRef) are not values."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if "pepper" in str(key).lower() and isinstance(value, str | int):
                found.append(f"{where}: {key}")
            found += pepper_literals(value, where)
        if "pepper" in str(node.get("name", "")).lower() and "value" in node:
            found.append(f"{where}: env {node['name']}")
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, str) and "pepper" in item.lower() and "=" in item:
                found.append(f"{where}: literal {item.split('=')[0]}")
            found += pepper_literals(item, where)
    return found


def test_no_overlay_or_manifest_carries_a_pepper() -> None:
    files = sorted(manifests_root().rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert pepper_literals(doc, str(path)) == []
    for name in OVERLAYS:
        assert pepper_literals(render(name), name) == []


def test_the_pepper_finder_finds_every_way_of_writing_one() -> None:
    secret = {"kind": "Secret", "stringData": {"gateway-key-pepper": "dev-only"}}
    env = {"env": [{"name": "AIAAS_GATEWAY_KEY_PEPPER", "value": "x"}]}
    generator = {"secretGenerator": [{"name": "aiaas-secrets", "literals": ["gateway-key-pepper=x"]}]}
    reference = {"env": [{"name": "AIAAS_GATEWAY_KEY_PEPPER",
                          "valueFrom": {"secretKeyRef": {"name": "aiaas-secrets", "key": "gateway-key-pepper"}}}]}
    assert pepper_literals(secret, "s") == ["s: gateway-key-pepper"]
    assert pepper_literals(env, "e") == ["e: env AIAAS_GATEWAY_KEY_PEPPER"]
    assert pepper_literals(generator, "g") == ["g: literal gateway-key-pepper"]
    assert pepper_literals(reference, "r") == []


def test_dev_overlay_lists_no_secret_file() -> None:
    kustomization = yaml.safe_load((manifests_root() / "overlays" / "dev" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../../base"]
    assert "secretGenerator" not in kustomization
    assert not (manifests_root() / "overlays" / "dev" / "secrets.yaml").exists()


# The audit names each broken piece ------------------------------------------------------------------

def broken(overlay: str, service: str, change: Any) -> list[str]:
    objects = copy.deepcopy(render(overlay))
    change(spec_of(workload(objects, service)), container(objects, service))
    return [p for p in audit(objects) if service in p]


def set_env(c: dict[str, Any], name: str, value: str) -> None:
    c["env"] = [e for e in c["env"] if e["name"] != name] + [{"name": name, "value": value}]


def test_audit_reports_a_certificate_that_is_not_mounted() -> None:
    def drop_volume(spec: dict[str, Any], c: dict[str, Any]) -> None:
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "tls"]
    problems = broken("dev", "registry", drop_volume)
    assert "StatefulSet/registry: AIAAS_TLS_CERT (/etc/aiaas/tls/tls.crt) is not a file of a mounted Secret" in problems
    assert any("AIAAS_CLIENT_TLS_KEY (/etc/aiaas/tls/tls.key) is not a file" in p for p in problems)


def test_audit_reports_missing_settings_and_plaintext_probes() -> None:
    def plaintext(spec: dict[str, Any], c: dict[str, Any]) -> None:
        c["env"] = [e for e in c["env"] if e["name"] not in ("AIAAS_TLS_CLIENT_CA", "AIAAS_CLIENT_TLS_CA")]
        c["readinessProbe"] = {"grpc": {"port": 50052}}
    problems = "\n".join(broken("dev", "inference", plaintext))
    assert "AIAAS_TLS_CLIENT_CA is not set" in problems
    assert "AIAAS_CLIENT_TLS_CA is not set" in problems
    assert "readinessProbe is not `python -m aiaas.k8s.probe --port 50052` (kubelet gRPC probes cannot do TLS)" \
        in problems


def test_audit_reports_the_wrong_identity_and_a_certificate_without_the_service_names() -> None:
    def swap(spec: dict[str, Any], c: dict[str, Any]) -> None:
        next(v for v in spec["volumes"] if v["name"] == "tls")["secret"]["secretName"] = "monitor-tls"
        set_env(c, "AIAAS_CLIENT_TLS_SERVER_NAME", "inference")
    problems = "\n".join(broken("dev", "inference", swap))
    assert "serves monitor-tls, which is not issued for Service inference, inference-headless" in problems
    assert "AIAAS_CLIENT_TLS_CERT comes from monitor-tls, not inference's identity (inference-tls)" in problems
    assert "AIAAS_CLIENT_TLS_SERVER_NAME would expect one server name on every channel" in problems


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql+psycopg://aiaas:pw@postgres:5432/aiaas", "sslmode=prefer (unset), not verify-full"),
    ("postgresql+psycopg://aiaas:pw@postgres:5432/aiaas?sslmode=require&sslrootcert=/etc/aiaas/tls/ca.crt",
     "sslmode=require, not verify-full"),
    ("postgresql+psycopg://aiaas:pw@postgres:5432/aiaas?sslmode=verify-full&sslrootcert=/etc/ssl/ca.crt",
     "sslrootcert (/etc/ssl/ca.crt) is not a file of a mounted Secret"),
])
def test_audit_reports_an_unverified_database_connection(url: str, expected: str) -> None:
    problems = "\n".join(broken("prod", "registry", lambda spec, c: set_env(c, "AIAAS_REGISTRY_DATABASE_URL", url)))
    assert f"container registry: database URL has {expected}" in problems or \
        f"container registry: database URL's {expected}" in problems


def test_audit_accepts_sqlite_and_the_rendered_overlays() -> None:
    assert broken("prod", "registry", lambda spec, c: set_env(
        c, "AIAAS_REGISTRY_DATABASE_URL", "sqlite:////data/registry.db")) == []
    for name in OVERLAYS:
        assert audit(render(name)) == []
