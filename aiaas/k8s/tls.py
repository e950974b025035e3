"""What a rendered aiaas workload must say about TLS: the server and client TLS settings point
at files of mounted Secrets, the right certificate for the pod's identity and Services, probes
that can speak TLS, and a PostgreSQL URL that verifies the server (sslmode=verify-full).

The settings are the services' own (`AIAAS_TLS_*` serve, `AIAAS_CLIENT_TLS_*` dial the other
services); each check returns readable problems, like those in `aiaas.k8s.checks`.
"""

from __future__ import annotations

import posixpath
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiaas.k8s.certs import POD_CERTIFICATES, POSTGRES_CERTIFICATE

PROBE_MODULE = "aiaas.k8s.probe"
# Where each pod mounts its own certificate (tls.crt, tls.key, ca.crt), and the gateway its public one.
TLS_DIR = "/etc/aiaas/tls"
PUBLIC_TLS_DIR = "/etc/aiaas/public-tls"
SERVER_ENV = ("AIAAS_TLS_CERT", "AIAAS_TLS_KEY")
MTLS_ENV = "AIAAS_TLS_CLIENT_CA"
CLIENT_ENV = ("AIAAS_CLIENT_TLS_CA", "AIAAS_CLIENT_TLS_CERT", "AIAAS_CLIENT_TLS_KEY")
SERVER_NAME_ENV = "AIAAS_CLIENT_TLS_SERVER_NAME"
# Public services serve clients that bring API keys, not certificates: no client CA there.
PUBLIC_SERVICES = frozenset({"gateway"})
IDENTITY_SECRET = {spec.identity: spec.secret for spec in POD_CERTIFICATES if spec.identity}
SERVING_SECRETS = {spec.secret: spec.services for spec in (*POD_CERTIFICATES, POSTGRES_CERTIFICATE)
                   if spec.secret and spec.services}


def probe_command(port: int) -> list[str]:
    return ["python", "-m", PROBE_MODULE, "--port", str(port)]


def env_values(container: dict[str, Any]) -> dict[str, str]:
    """The container's literal `env` values (Secret and field references left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def secret_file(spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str] | None:
    """(Secret name, key) of the file at `path` in the container, when a Secret volume provides it."""
    secrets = {v["name"]: v["secret"] for v in spec.get("volumes", []) if "secret" in v}
    for mount in container.get("volumeMounts", []):
        volume = secrets.get(mount["name"])
        if volume is None or posixpath.dirname(path) != mount["mountPath"].rstrip("/") or "subPath" in mount:
            continue
        filename = posixpath.basename(path)
        items = volume.get("items")
        key = next((i["key"] for i in items if i["path"] == filename), None) if items else filename
        if key is not None:
            return volume["secretName"], key
    return None


def _mounted(spec: dict[str, Any], container: dict[str, Any], env: dict[str, str],
             names: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Problems for settings that are unset or not a mounted Secret file; the Secret of each that is."""
    problems, secrets = [], {}
    for name in names:
        if name not in env:
            problems.append(f"{name} is not set")
            continue
        found = secret_file(spec, container, env[name])
        if found is None:
            problems.append(f"{name} ({env[name]}) is not a file of a mounted Secret")
        else:
            secrets[name] = found[0]
    return problems, secrets


def check_service_tls(spec: dict[str, Any], container: dict[str, Any], name: str, port: int,
                      service_names: list[str]) -> list[str]:
    """An aiaas service serves TLS (mTLS unless public) with a certificate for the Services that
    select it, dials the others with its identity's certificate, and is probed over TLS."""
    env = env_values(container)
    client_names = CLIENT_ENV if name in PUBLIC_SERVICES else (MTLS_ENV, *CLIENT_ENV)
    problems, secrets = _mounted(spec, container, env, SERVER_ENV + client_names)
    served = secrets.get("AIAAS_TLS_CERT")
    if served is not None:
        missing = sorted(set(service_names) - set(SERVING_SECRETS.get(served, ())))
        if missing:
            problems.append(f"serves {served}, which is not issued for Service {', '.join(missing)}")
    identity = IDENTITY_SECRET.get(name)
    for setting in ("AIAAS_CLIENT_TLS_CERT", "AIAAS_CLIENT_TLS_KEY"):
        if setting in secrets and secrets[setting] != identity:
            problems.append(f"{setting} comes from {secrets[setting]}, not {name}'s identity ({identity})")
    if SERVER_NAME_ENV in env:
        problems.append(f"{SERVER_NAME_ENV} would expect one server name on every channel")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container.get(probe, {}).get("exec", {}).get("command")
        if command != probe_command(port):
            problems.append(f"{probe} is not `{' '.join(probe_command(port))}` (kubelet gRPC probes cannot do TLS)")
    return problems


def check_database_url(spec: dict[str, Any], container: dict[str, Any], url: str) -> list[str]:
    """A PostgreSQL URL verifies the server's certificate and name against a mounted CA."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgresql"):
        return []
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    problems = []
    if query.get("sslmode") != "verify-full":
        problems.append(f"database URL has sslmode={query.get('sslmode', 'prefer (unset)')}, not verify-full")
    root = query.get("sslrootcert")
    if root is None or secret_file(spec, container, root) is None:
        problems.append(f"database URL's sslrootcert ({root}) is not a file of a mounted Secret")
    return problems
