"""The TLS wiring of the rendered dev overlay against real processes. The registry, started with
its pod's TLS settings and `aiaas k8s dev-certs` certificates, serves mTLS: it answers the exec
probes the kubelet would run, admits a caller with another pod's identity certificate under the
names the services dial, and refuses plaintext, callers without a certificate and certificates
of another CA. The gateway's probe works against a server that, like the public gateway, asks
for no client certificate."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aiaas.k8s.certs import POD_CERTIFICATES, CertificateAuthority, write_dev_certs
from aiaas.k8s.manifest import Manifest
from aiaas.k8s.render import render
from tests.k8s.pods import probe_command, probe_until_ready, run_probe, tls_env
from tests.support.procs import ServiceProcess
from tests.support.servers import free_port


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("tls") / "certs"
    write_dev_certs(outdir, "aiaas")
    return outdir


@pytest.fixture(scope="module")
def dev() -> list[Manifest]:
    return render("dev")


def failed(result: subprocess.CompletedProcess[str], log: str = "") -> str:
    return f"probe exit {result.returncode}: {result.stdout}{result.stderr}\n{log[-3000:]}"


@pytest.fixture(scope="module")
def registry(certs_dir: Path, dev: list[Manifest],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, dict[str, str]]]:
    home = tmp_path_factory.mktemp("registry")
    env = tls_env(dev, "registry", certs_dir)
    service = ServiceProcess("registry", ["--database-url", f"sqlite:///{home / 'registry.db'}",
                                          "--artifact-dir", str(home / "artifacts")],
                             env={**env, "AIAAS_HOME": str(home)})
    service.start(wait=False)
    # As the kubelet does: the startup probe, again and again, until it passes.
    result = probe_until_ready(probe_command(dev, "registry", service.port, "startupProbe"), env,
                               alive=lambda: service.proc is not None and service.proc.poll() is None)
    assert result.returncode == 0, failed(result, service.log())
    yield service, env
    service.stop()


def credentials(certs_dir: Path, secret: str | None) -> grpc.ChannelCredentials:
    """TLS trusting the dev CA, presenting the certificate of `secret` (None: no certificate)."""
    ca = (certs_dir / "ca.crt").read_bytes()
    if secret is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(root_certificates=ca,
                                        private_key=(certs_dir / secret / "tls.key").read_bytes(),
                                        certificate_chain=(certs_dir / secret / "tls.crt").read_bytes())


def check(port: int, creds: grpc.ChannelCredentials | None, server_name: str = "registry") -> str:
    """The health status the server gives this caller, or the gRPC code it fails with."""
    target = f"127.0.0.1:{port}"
    channel = (grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", server_name)])
               if creds is not None else grpc.insecure_channel(target))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[attr-defined, no-any-return]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_registry_answers_each_kubelet_probe_over_mtls(registry: tuple[ServiceProcess, dict[str, str]],
                                                       dev: list[Manifest]) -> None:
    service, env = registry
    assert env["AIAAS_TLS_CLIENT_CA"].endswith("registry-tls/ca.crt")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        result = run_probe(probe_command(dev, "registry", service.port, probe), env)
        assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), failed(result)


def test_registry_admits_other_identities_by_the_names_services_dial(
        registry: tuple[ServiceProcess, dict[str, str]], certs_dir: Path) -> None:
    service, _ = registry
    for secret in ("inference-tls", "gateway-client-tls", "monitor-tls", "admin", "deployer"):
        assert check(service.port, credentials(certs_dir, secret)) == "SERVING", secret
    for name in ("registry.aiaas", "registry.aiaas.svc", "registry.aiaas.svc.cluster.local"):
        assert check(service.port, credentials(certs_dir, "inference-tls"), name) == "SERVING", name
    # The registry's certificate is not the monitor's: a client dialling `monitor` refuses it.
    assert check(service.port, credentials(certs_dir, "inference-tls"), "monitor") == "UNAVAILABLE"


def test_registry_refuses_plaintext_no_certificate_and_another_ca(
        registry: tuple[ServiceProcess, dict[str, str]], certs_dir: Path) -> None:
    service, _ = registry
    assert check(service.port, None) == "UNAVAILABLE"
    assert check(service.port, credentials(certs_dir, None)) == "UNAVAILABLE"
    stranger = CertificateAuthority.create().issue(POD_CERTIFICATES[1], "aiaas")
    foreign = grpc.ssl_channel_credentials(root_certificates=(certs_dir / "ca.crt").read_bytes(),
                                           private_key=stranger.key_pem, certificate_chain=stranger.cert_pem)
    assert check(service.port, foreign) == "UNAVAILABLE"


def test_probe_fails_when_the_server_does_not_serve_the_pinned_certificate(
        registry: tuple[ServiceProcess, dict[str, str]], dev: list[Manifest], certs_dir: Path) -> None:
    service, env = registry
    wrong = {**env, "AIAAS_TLS_CERT": str(certs_dir / "monitor-tls" / "tls.crt")}
    result = run_probe(probe_command(dev, "registry", service.port), wrong)
    assert result.returncode == 1
    assert f"health check on port {service.port}: UNAVAILABLE" in result.stderr
    without_client_cert = {k: v for k, v in env.items() if not k.startswith("AIAAS_CLIENT_TLS_")}
    result = run_probe(probe_command(dev, "registry", service.port), without_client_cert)
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
    missing = {**env, "AIAAS_TLS_CERT": str(certs_dir / "nowhere.crt")}
    result = run_probe(probe_command(dev, "registry", service.port), missing)
    assert result.returncode == 1
    assert f"probe: cannot read served certificate {certs_dir / 'nowhere.crt'}" in result.stderr


@pytest.fixture
def public_server(certs_dir: Path) -> Iterator[tuple[int, health.HealthServicer]]:
    """A gRPC server that, like the public gateway, serves gateway-tls and asks for no certificate."""
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = free_port()
    folder = certs_dir / "gateway-tls"
    server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials(
        [((folder / "tls.key").read_bytes(), (folder / "tls.crt").read_bytes())]))
    server.start()
    yield port, servicer
    server.stop(None)


def test_gateway_probe_checks_its_public_certificate(public_server: tuple[int, health.HealthServicer],
                                                      dev: list[Manifest], certs_dir: Path) -> None:
    port, servicer = public_server
    env = tls_env(dev, "gateway", certs_dir)
    assert env["AIAAS_TLS_CERT"].endswith("gateway-tls/tls.crt") and "AIAAS_TLS_CLIENT_CA" not in env
    command = probe_command(dev, "gateway", port)
    result = probe_until_ready(command, env, deadline_s=30)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), failed(result)
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = run_probe(command, env)
    assert (result.returncode, result.stdout.strip()) == (1, "NOT_SERVING"), failed(result)
