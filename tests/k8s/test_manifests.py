"""The kustomize overlays in deploy/k8s: they render, validate against the Kubernetes schemas,
and every workload, Service and setting agrees with what the services expect."""

from __future__ import annotations

import copy
from importlib.metadata import version

import kubernetes_validate
import pytest

from aiaas.k8s.checks import (
    SCRAPE_ANNOTATIONS,
    audit,
    check_service,
    check_workload,
    grace_period_s,
    workloads,
)
from aiaas.k8s.manifest import Manifest, split_image
from aiaas.k8s.render import METRICS_PORT, OPENAI_PORT, OVERLAYS, SERVICE_PORTS, render
from aiaas.k8s.rollout import missing_secrets
from tests.k8s.specs import spec_of

# The oldest Kubernetes release supported, and the newest the schemas know.
SCHEMA_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
AIAAS_IMAGE = "ghcr.io/aiaas/aiaas"
CERT_MANAGER_API = "cert-manager.io/v1"


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Manifest]]:
    return request.param, render(request.param)


def by_kind(objects: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(objects: list[Manifest], name: str) -> dict:
    workload = next(w for w in workloads(objects) if w["metadata"]["name"] == name)
    return next(c for c in spec_of(workload)["containers"] if c["name"] == name)


def config(objects: list[Manifest]) -> dict[str, str]:
    return by_kind(objects, "ConfigMap")["aiaas-config"]["data"]


def test_latest_schema_is_at_least_1_37() -> None:
    assert tuple(int(p) for p in SCHEMA_VERSIONS[1].split(".")[:2]) >= (1, 37)


@pytest.mark.parametrize("schema_version", SCHEMA_VERSIONS)
def test_every_object_validates_strictly(overlay: tuple[str, list[Manifest]], schema_version: str) -> None:
    _, objects = overlay
    for obj in objects:
        # cert-manager's kinds are not in the Kubernetes schemas; tests/k8s/test_tls.py checks them.
        if obj["apiVersion"] != CERT_MANAGER_API:
            kubernetes_validate.validate(obj, schema_version, strict=True)


def test_only_cert_manager_kinds_are_beyond_the_kubernetes_schemas(overlay: tuple[str, list[Manifest]]) -> None:
    name, objects = overlay
    outside = {(o["apiVersion"], o["kind"]) for o in objects if o["apiVersion"] == CERT_MANAGER_API}
    assert outside == (set() if name == "dev" else {(CERT_MANAGER_API, "Certificate"), (CERT_MANAGER_API, "Issuer")})
    for obj in objects:
        if obj["apiVersion"] != CERT_MANAGER_API:
            kubernetes_validate.validate(obj, SCHEMA_VERSIONS[1], strict=True)


def test_every_object_is_namespaced_and_labelled(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "aiaas"
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "aiaas", obj["metadata"]["name"]
    for workload in workloads(objects):
        assert workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "aiaas"


def test_audit_finds_no_problem(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    assert audit(objects) == []


def test_services_are_the_four_plus_state_stores(overlay: tuple[str, list[Manifest]]) -> None:
    name, objects = overlay
    stores = set() if name == "dev" else {"postgres", "redis"}
    assert {w["metadata"]["name"] for w in workloads(objects)} == set(SERVICE_PORTS) | stores
    assert by_kind(objects, "StatefulSet").keys() == {"registry"} | ({"postgres"} & stores)


def test_every_workload_has_probes_limits_and_security(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    for workload in workloads(objects):
        spec = spec_of(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert any(c["topologyKey"] == "kubernetes.io/hostname" for c in spec["topologySpreadConstraints"])
        for c in spec["containers"]:
            assert {"cpu", "memory"} <= c["resources"]["requests"].keys() & c["resources"]["limits"].keys()
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert "readinessProbe" in c and "livenessProbe" in c and "preStop" in c["lifecycle"]


def test_aiaas_services_are_probed_over_tls_on_their_ports(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    for service, port in SERVICE_PORTS.items():
        c = container(objects, service)
        assert c["command"] == ["python", "-m", f"services.{service}"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # A kubelet grpc probe cannot do TLS; the exec probe runs in the container.
            assert "grpc" not in c[probe], (service, probe)
            assert c[probe]["exec"]["command"] == ["python", "-m", "aiaas.k8s.probe", "--port", str(port)]
            assert c[probe]["timeoutSeconds"] >= 5, (service, probe)


def test_aiaas_services_expose_grpc_and_metrics_and_ask_to_be_scraped(
        overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    assert SCRAPE_ANNOTATIONS == {"prometheus.io/scrape": "true", "prometheus.io/port": "9464",
                                  "prometheus.io/path": "/metrics"}
    for service, port in SERVICE_PORTS.items():
        ports = {p["name"]: p["containerPort"] for p in container(objects, service)["ports"]}
        openai = {"openai": OPENAI_PORT} if service == "gateway" else {}
        assert ports == {"grpc": port, "metrics": METRICS_PORT, **openai}, service
        workload = next(w for w in workloads(objects) if w["metadata"]["name"] == service)
        assert workload["spec"]["template"]["metadata"]["annotations"] == SCRAPE_ANNOTATIONS, service


def test_grace_period_covers_prestop_and_drain(overlay: tuple[str, list[Manifest]]) -> None:
    from services.common.settings import ServerSettings

    _, objects = overlay
    drain = grace_period_s(objects)
    assert drain == ServerSettings().grace_period_s
    for service in SERVICE_PORTS:
        workload = next(w for w in workloads(objects) if w["metadata"]["name"] == service)
        prestop = container(objects, service)["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert spec_of(workload)["terminationGracePeriodSeconds"] >= prestop + drain + 5


def test_audit_reports_each_missing_setting() -> None:
    objects = render("dev")
    gateway = copy.deepcopy(next(w for w in workloads(objects) if w["metadata"]["name"] == "gateway"))
    spec = spec_of(gateway)
    c = spec["containers"][0]
    del c["readinessProbe"]
    del c["resources"]["limits"]["memory"]
    c["securityContext"]["readOnlyRootFilesystem"] = False
    c["livenessProbe"] = {"tcpSocket": {"port": 8001}}
    spec["terminationGracePeriodSeconds"] = 10
    spec["topologySpreadConstraints"] = []
    c["ports"] = [p for p in c["ports"] if p["name"] != "metrics"]
    del gateway["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"]
    problems = "\n".join(check_workload(gateway, 20))
    for expected in ("no readinessProbe", "no limits for memory", "root filesystem is not read-only",
                     "livenessProbe is not `python -m aiaas.k8s.probe --port 8001`", "terminationGracePeriodSeconds",
                     "no topology spread", "does not expose its Prometheus port 9464",
                     "pod annotation prometheus.io/scrape"):
        assert expected in problems


def test_every_service_selects_a_pod_template_and_its_ports(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    services = by_kind(objects, "Service")
    for name, service in services.items():
        assert check_service(service, objects) == [], name
    for name, port in SERVICE_PORTS.items():
        assert services[name]["spec"]["ports"][0]["port"] == port
    assert services["inference-headless"]["spec"]["clusterIP"] == "None"
    # Only the monitor's Service carries its metrics port; Prometheus scrapes the other pods
    # directly, and the gateway's (a LoadBalancer in prod) must not publish 9464.
    assert {p["port"] for p in services["monitor"]["spec"]["ports"]} == {50053, 9464}
    for name in ("registry", "inference", "inference-headless"):
        assert {p["port"] for p in services[name]["spec"]["ports"]} == {SERVICE_PORTS[name.split("-")[0]]}, name
    assert {p["port"] for p in services["gateway"]["spec"]["ports"]} == {SERVICE_PORTS["gateway"], OPENAI_PORT}


def test_a_service_that_selects_nothing_is_reported() -> None:
    objects = render("dev")
    service = copy.deepcopy(by_kind(objects, "Service")["registry"])
    service["spec"]["selector"] = {"app.kubernetes.io/name": "registri"}
    assert check_service(service, objects) == ["selects no pod template"]
    service["spec"]["selector"] = {"app.kubernetes.io/name": "registry"}
    service["spec"]["ports"][0]["targetPort"] = "http"
    assert "not a port of registry" in check_service(service, objects)[0]


def test_configured_addresses_match_the_services(overlay: tuple[str, list[Manifest]]) -> None:
    name, objects = overlay
    data = config(objects)
    services = by_kind(objects, "Service")
    ports = {svc: {p["port"] for p in s["spec"]["ports"]} for svc, s in services.items()}
    for key, service in (("AIAAS_REGISTRY_URL", "registry"), ("AIAAS_MONITOR_URL", "monitor")):
        host, _, port = data[key].partition(":")
        assert host == service and int(port) == SERVICE_PORTS[service]
    assert data["AIAAS_INFERENCE_TARGETS"] == f"dns:///inference-headless:{SERVICE_PORTS['inference']}"
    assert int(data["AIAAS_METRICS_PORT"]) == METRICS_PORT and METRICS_PORT in ports["monitor"]
    if name == "dev":
        assert data["AIAAS_REGISTRY_DATABASE_URL"] == "sqlite:////data/registry.db"
        assert "AIAAS_REDIS_URL" not in data
    else:
        assert data["AIAAS_REDIS_URL"] == "redis://redis:6379/0" and 6379 in ports["redis"]
        assert "AIAAS_REGISTRY_DATABASE_URL" not in data
        env = {e["name"]: e for e in container(objects, "registry")["env"]}
        assert env["AIAAS_REGISTRY_DATABASE_URL"]["value"] == (
            "postgresql+psycopg://aiaas:$(POSTGRES_PASSWORD)@postgres:5432/aiaas"
            "?sslmode=verify-full&sslrootcert=/etc/aiaas/tls/ca.crt")
        # $(VAR) only expands variables defined earlier in the list.
        assert list(env).index("POSTGRES_PASSWORD") < list(env).index("AIAAS_REGISTRY_DATABASE_URL")
        assert 5432 in ports["postgres"]


def test_registry_keeps_its_data_on_a_persistent_volume(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    registry = by_kind(objects, "StatefulSet")["registry"]
    assert registry["spec"]["replicas"] == 1
    assert [t["metadata"]["name"] for t in registry["spec"]["volumeClaimTemplates"]] == ["data"]
    mounts = {m["mountPath"]: m["name"] for m in container(objects, "registry")["volumeMounts"]}
    assert mounts["/data"] == "data"
    assert config(objects)["AIAAS_REGISTRY_ARTIFACT_DIR"].startswith("/data/")


def test_writable_paths_are_empty_dirs(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    inference = next(w for w in workloads(objects) if w["metadata"]["name"] == "inference")
    volumes = {v["name"]: v for v in spec_of(inference)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(objects, "inference")["volumeMounts"]}
    for path in ("/tmp", "/var/cache/aiaas", "/dev/shm"):
        assert "emptyDir" in volumes[mounts[path]], path
    assert config(objects)["AIAAS_INFERENCE_MODEL_CACHE_DIR"].startswith("/var/cache/aiaas/")


def test_image_tags_match_the_package_version(overlay: tuple[str, list[Manifest]]) -> None:
    name, objects = overlay
    for service in SERVICE_PORTS:
        image, tag, _ = split_image(container(objects, service)["image"])
        assert image == AIAAS_IMAGE
        cuda = name == "gpu" and service == "inference"
        assert tag == version("aiaas") + ("-cuda" if cuda else "")
    for store in set(by_kind(objects, "Deployment")) | set(by_kind(objects, "StatefulSet")) - set(SERVICE_PORTS):
        assert split_image(container(objects, store)["image"])[1], f"{store} image is not pinned"


def test_dev_runs_one_replica_of_everything() -> None:
    objects = render("dev")
    assert {w["metadata"]["name"]: w["spec"]["replicas"] for w in workloads(objects)} == dict.fromkeys(
        SERVICE_PORTS, 1)
    assert not by_kind(objects, "HorizontalPodAutoscaler") and not by_kind(objects, "PodDisruptionBudget")


@pytest.mark.parametrize("name", ["prod", "gpu"])
def test_prod_autoscales_the_stateless_services(name: str) -> None:
    objects = render(name)
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    assert set(hpas) == {"gateway", "inference"}
    deployments = by_kind(objects, "Deployment")
    for target, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": target}
        # The autoscaler owns the replica count; a fixed one would fight it on every apply.
        assert "replicas" not in deployments[target]["spec"]
    assert hpas["gateway"]["spec"]["minReplicas"] >= 2
    assert hpas["inference"]["spec"]["minReplicas"] >= (1 if name == "gpu" else 2)
    assert deployments["monitor"]["spec"]["replicas"] >= 2
    pdbs = by_kind(objects, "PodDisruptionBudget")
    assert set(pdbs) == {"gateway", "inference", "monitor"}
    for target, pdb in pdbs.items():
        assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": target}


def test_gpu_puts_inference_on_gpu_nodes() -> None:
    objects = render("gpu")
    spec = spec_of(by_kind(objects, "Deployment")["inference"])
    assert container(objects, "inference")["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert config(objects)["AIAAS_INFERENCE_DEVICE"] == "cuda:0"
    for other in ("gateway", "monitor"):
        assert "nvidia.com/gpu" not in container(objects, other)["resources"]["limits"]
        assert "tolerations" not in spec_of(by_kind(objects, "Deployment")[other])


def test_secrets_come_from_secret_objects_never_from_the_config(overlay: tuple[str, list[Manifest]]) -> None:
    name, objects = overlay
    pepper = next(e for e in container(objects, "gateway")["env"] if e["name"] == "AIAAS_GATEWAY_KEY_PEPPER")
    assert pepper["valueFrom"]["secretKeyRef"] == {"name": "aiaas-secrets", "key": "gateway-key-pepper"}
    assert not any("PEPPER" in key or "PASSWORD" in key for key in config(objects))
    # No overlay ships secret values (a fixed pepper would let anyone who can write registry
    # records mint API keys): `aiaas k8s apply` generates what is missing.
    assert not by_kind(objects, "Secret")
    expected = {("aiaas", "aiaas-secrets"): {"gateway-key-pepper"}}
    if name != "dev":
        expected[("aiaas", "aiaas-postgres")] = {"password"}
    assert missing_secrets(objects) == expected


def test_pods_listen_on_the_pod_network_and_require_identities(overlay: tuple[str, list[Manifest]]) -> None:
    # Services bind loopback by default (a bare process is never exposed by accident); in a pod
    # they must listen on the pod's network, guarded by mTLS and the NetworkPolicies.
    settings = config(overlay[1])
    assert settings["AIAAS_HOST"] == "0.0.0.0"
    assert settings["AIAAS_REQUIRE_IDENTITY"] == "true"


def test_gateways_share_quotas_by_the_autoscalers_minimum() -> None:
    objects = render("prod")
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["gateway"]
    assert int(config(objects)["AIAAS_GATEWAY_GATEWAY_REPLICAS"]) == hpa["spec"]["minReplicas"]
