"""`python -m aiaas.k8s.probe --port N`: the kubelet's startup, readiness and liveness check
of a service that serves TLS, run inside its container (an `exec` probe).

A kubelet `grpc` probe speaks plaintext only. This one calls grpc.health.v1 `Check` on the
loopback address over TLS and exits 0 only on SERVING. It trusts exactly the certificate
the server serves (AIAAS_TLS_CERT, the same file) and expects that certificate's first DNS
name, so it needs no CA and works as well for a certificate from a public issuer. When the
server asks for client certificates (AIAAS_TLS_CLIENT_CA is set) it presents the pod's own
(AIAAS_CLIENT_TLS_CERT, AIAAS_CLIENT_TLS_KEY). Without AIAAS_TLS_CERT it checks plaintext.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ProbeError(RuntimeError):
    """The probe cannot be set up: a certificate file missing or without a DNS name."""


def served_name(cert_pem: bytes) -> str:
    """The first DNS name of the certificate (chain) a server serves: what its clients dial."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    dns = names.get_values_for_type(x509.DNSName) if names else []
    if not dns:
        raise ProbeError("the served certificate has no DNS name to check it against")
    return dns[0]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ProbeError(f"cannot read {what} {path}: {exc.strerror}") from exc


def channel(port: int, server_cert: str | None, client_cert: str | None,
            client_key: str | None) -> grpc.Channel:
    """A channel to the loopback port: plaintext without `server_cert`, else TLS pinned to it."""
    target = f"127.0.0.1:{port}"
    if not server_cert:
        return grpc.insecure_channel(target)
    served = _read(server_cert, "served certificate")
    if bool(client_cert) != bool(client_key):
        raise ProbeError("a client certificate needs its key, and a key its certificate")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=served,
        private_key=_read(client_key, "client key") if client_key else None,
        certificate_chain=_read(client_cert, "client certificate") if client_cert else None,
    )
    return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", served_name(served))])


def check(port: int, *, service: str = "", timeout_s: float = 3.0, server_cert: str | None = None,
          client_cert: str | None = None, client_key: str | None = None) -> str:
    """The health status name the server reports; raises grpc.RpcError or ProbeError."""
    with channel(port, server_cert, client_cert, client_key) as chan:
        reply = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(service=service),
                                                       timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    mtls = bool(environ.get("AIAAS_TLS_CLIENT_CA"))
    parser = argparse.ArgumentParser(prog="python -m aiaas.k8s.probe",
                                     description="grpc.health.v1 Check over TLS on the loopback port; exit 0 on SERVING")
    parser.add_argument("--port", type=int, required=True, help="the service's gRPC port")
    parser.add_argument("--service", default="", help="health service name ('' is the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (3)")
    parser.add_argument("--server-cert", default=environ.get("AIAAS_TLS_CERT"),
                        help="certificate the server serves ($AIAAS_TLS_CERT; unset: plaintext)")
    parser.add_argument("--client-cert", default=environ.get("AIAAS_CLIENT_TLS_CERT") if mtls else None,
                        help="certificate to present ($AIAAS_CLIENT_TLS_CERT when $AIAAS_TLS_CLIENT_CA is set)")
    parser.add_argument("--client-key", default=environ.get("AIAAS_CLIENT_TLS_KEY") if mtls else None,
                        help="its key ($AIAAS_CLIENT_TLS_KEY when $AIAAS_TLS_CLIENT_CA is set)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """0 when the server says SERVING; 1 otherwise, with the reason on one line (kubelet events show it)."""
    args = parse_args(argv, os.environ if environ is None else environ)
    try:
        status = check(args.port, service=args.service, timeout_s=args.timeout, server_cert=args.server_cert,
                       client_cert=args.client_cert, client_key=args.client_key)
    except ProbeError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"health check on port {args.port}: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
