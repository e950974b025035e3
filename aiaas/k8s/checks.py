"""What every rendered workload and Service must satisfy; each check returns readable problems.

`audit(objects)` is what `aiaas k8s render --check` and the tests run: probes, resources,
security, drain timing and spreading for every workload, the Prometheus port and scrape
annotations and TLS (`aiaas.k8s.tls`) of every aiaas service, a verified PostgreSQL connection,
and Services that select a pod template and name its ports.
"""

from __future__ import annotations

from typing import Any

from aiaas.k8s.manifest import Manifest, pod_spec
from aiaas.k8s.render import METRICS_PORT, NAME_LABEL, SERVICE_PORTS
from aiaas.k8s.tls import check_database_url, check_service_tls, env_values

WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet"})
# The slack for the process to exit after the drain, beyond preStop + AIAAS_GRACE_PERIOD_S.
EXIT_SLACK_S = 5
# The pod annotations a Prometheus kubernetes_sd `pod` job keys on; every aiaas pod carries them.
SCRAPE_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(METRICS_PORT),
    "prometheus.io/path": "/metrics",
}


def workloads(objects: list[Manifest]) -> list[Manifest]:
    return [obj for obj in objects if obj["kind"] in WORKLOAD_KINDS]


def service_name(workload: Manifest) -> str:
    return str(workload["spec"]["template"]["metadata"]["labels"][NAME_LABEL])


def grace_period_s(objects: list[Manifest]) -> float:
    """AIAAS_GRACE_PERIOD_S from the aiaas-config ConfigMap (the services' drain budget)."""
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "aiaas-config":
            return float(obj["data"]["AIAAS_GRACE_PERIOD_S"])
    raise ValueError("no aiaas-config ConfigMap with AIAAS_GRACE_PERIOD_S")


def audit(objects: list[Manifest]) -> list[str]:
    """Every problem found in the rendered objects; empty when all is well."""
    problems: list[str] = []
    drain_s = grace_period_s(objects)
    services = [obj for obj in objects if obj["kind"] == "Service"]
    for workload in workloads(objects):
        selecting = [s["metadata"]["name"] for s in services if workload in selected_templates(s, objects)]
        problems += [f"{workload['kind']}/{workload['metadata']['name']}: {p}"
                     for p in check_workload(workload, drain_s, selecting)]
    for service in services:
        problems += [f"Service/{service['metadata']['name']}: {p}" for p in check_service(service, objects)]
    return problems


def check_workload(workload: Manifest, drain_s: float, service_names: list[str] | None = None) -> list[str]:
    """Problems of one workload; `service_names` are the Services that select it (its TLS
    certificate must answer to each), by default its own name."""
    spec = pod_spec(workload) or {}
    name = service_name(workload)
    problems = _check_pod_security(spec) + _check_spread(spec, name)
    prestop_s = 0.0
    for container in spec.get("containers", []):
        problems += [f"container {container['name']}: {p}" for p in _check_container(container, spec)]
        prestop_s = max(prestop_s, _prestop_sleep_s(container))
    if name in SERVICE_PORTS:
        problems += _check_aiaas_container(spec, name, [name] if service_names is None else service_names)
        problems += _check_scrape_annotations(workload)
        budget = prestop_s + drain_s + EXIT_SLACK_S
        if spec.get("terminationGracePeriodSeconds", 30) < budget:
            problems.append(f"terminationGracePeriodSeconds below preStop + drain + exit ({budget:g} s)")
    elif "terminationGracePeriodSeconds" not in spec:
        problems.append("no terminationGracePeriodSeconds")
    return problems


def _check_pod_security(spec: dict[str, Any]) -> list[str]:
    problems = []
    context = spec.get("securityContext", {})
    if context.get("runAsNonRoot") is not True:
        problems.append("pod securityContext.runAsNonRoot is not true")
    if context.get("runAsUser", 1) == 0:
        problems.append("pod runs as uid 0")
    if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod seccompProfile is not RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("service account token is mounted")
    return problems


def _check_spread(spec: dict[str, Any], name: str) -> list[str]:
    for constraint in spec.get("topologySpreadConstraints", []):
        selects_self = constraint.get("labelSelector", {}).get("matchLabels", {}).get(NAME_LABEL) == name
        if constraint.get("topologyKey") == "kubernetes.io/hostname" and selects_self:
            return []
    return ["no topology spread across nodes (kubernetes.io/hostname) over its own pods"]


def _check_container(container: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    problems = []
    for setting, value in env_values(container).items():
        if setting.endswith("DATABASE_URL"):
            problems += check_database_url(spec, container, value)
    resources = container.get("resources", {})
    for bound in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(resources.get(bound, {}))
        if missing:
            problems.append(f"no {bound} for {', '.join(sorted(missing))}")
    context = container.get("securityContext", {})
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append("root filesystem is not read-only")
    if context.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("capabilities are not all dropped")
    if context.get("privileged"):
        problems.append("privileged")
    for probe in ("readinessProbe", "livenessProbe"):
        if probe not in container:
            problems.append(f"no {probe}")
    if "preStop" not in container.get("lifecycle", {}):
        problems.append("no preStop hook")
    return problems


def _check_aiaas_container(spec: dict[str, Any], name: str, service_names: list[str]) -> list[str]:
    container = next((c for c in spec.get("containers", []) if c["name"] == name), None)
    if container is None:
        return [f"no container named {name}"]
    problems = []
    port = SERVICE_PORTS[name]
    if container.get("command") != ["python", "-m", f"services.{name}"]:
        problems.append(f"command is not python -m services.{name}")
    if port not in {p["containerPort"] for p in container.get("ports", [])}:
        problems.append(f"does not expose its default port {port}")
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if named.get("metrics") != METRICS_PORT:
        problems.append(f"does not expose its Prometheus port {METRICS_PORT} as 'metrics'")
    problems += check_service_tls(spec, container, name, port, service_names)
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    if mounts.get("/tmp") not in empty_dirs:
        problems.append("/tmp is not an emptyDir (the root filesystem is read-only)")
    return problems


def _check_scrape_annotations(workload: Manifest) -> list[str]:
    annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
    return [f"pod annotation {key} is not {value!r}" for key, value in SCRAPE_ANNOTATIONS.items()
            if annotations.get(key) != value]


def _prestop_sleep_s(container: dict[str, Any]) -> float:
    return float(container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0))


def selected_templates(service: Manifest, objects: list[Manifest]) -> list[Manifest]:
    """The workloads whose pod template the Service's selector matches."""
    selector = service["spec"].get("selector") or {}
    return [w for w in workloads(objects)
            if selector and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]


def check_service(service: Manifest, objects: list[Manifest]) -> list[str]:
    selected = selected_templates(service, objects)
    if not selected:
        return ["selects no pod template"]
    problems = []
    for workload in selected:
        ports = [p for c in (pod_spec(workload) or {}).get("containers", []) for p in c.get("ports", [])]
        by_name = {p.get("name"): p["containerPort"] for p in ports}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            number = by_name.get(target) if isinstance(target, str) else target
            if number is None or number not in by_name.values():
                problems.append(f"port {port['port']} targets {target!r}, not a port of {service_name(workload)}")
            elif number != port["port"]:
                problems.append(f"port {port['port']} forwards to container port {number}")
    return problems
