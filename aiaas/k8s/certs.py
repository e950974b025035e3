"""Certificates for mTLS between the services: which ones exist, what names they carry, and
(for development clusters, `aiaas k8s dev-certs`) a CA that issues them, written as files and Secrets.

Each pod's identity is the URI SAN `spiffe://aiaas/<namespace>/<identity>`; a certificate that
serves also carries the DNS names of its Services, which are the names its clients dial
(`registry`, `dns:///inference-headless`). In production cert-manager issues the same
certificates (deploy/k8s/overlays/prod/certificates.yaml); the tests hold the two to this table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from aiaas import pki
from aiaas.k8s.manifest import Manifest
from aiaas.k8s.render import NAMESPACE, PART_OF
from aiaas.pki import Issued

CLUSTER_DOMAIN = "cluster.local"
# What a certificate that also answers on this machine (`kubectl port-forward`) is valid for.
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class CertSpec:
    """One certificate: `identity` names who presents it (None: it only serves), `services`
    the Services whose DNS names it answers to, `secret` the Secret it lives in (None: files only,
    an operator's client certificate)."""

    secret: str | None
    identity: str | None
    services: tuple[str, ...] = ()
    # Also localhost and the loopback addresses, for `kubectl port-forward` (development only).
    localhost: bool = False

    @property
    def name(self) -> str:
        return self.secret or str(self.identity)


# What the pods mount. The gateway has two: its identity towards the other services, and the
# certificate its public port serves (from a public issuer in production).
POD_CERTIFICATES = (
    CertSpec("registry-tls", "registry", ("registry",)),
    CertSpec("inference-tls", "inference", ("inference", "inference-headless")),
    CertSpec("monitor-tls", "monitor", ("monitor",)),
    CertSpec("gateway-client-tls", "gateway"),
    CertSpec("gateway-tls", None, ("gateway",), localhost=True),
)
# PostgreSQL (prod only) serves TLS that the registry verifies (sslmode=verify-full).
POSTGRES_CERTIFICATE = CertSpec("postgres-tls", None, ("postgres",))
# People and tools outside the cluster that call the services directly (through port-forward).
OPERATOR_CERTIFICATES = (CertSpec(None, "admin"), CertSpec(None, "deployer"))


def dns_names(services: Sequence[str], namespace: str, cluster_domain: str = CLUSTER_DOMAIN) -> list[str]:
    """Every name a pod in the cluster may dial a Service by, short name first."""
    return [name for service in services for name in (
        service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.{cluster_domain}")]


class CertificateAuthority:
    """The development CA that issues the services' certificates (through `aiaas.pki`)."""

    def __init__(self, issued: Issued) -> None:
        self.issued = issued
        self.cert, _ = pki.load_ca(issued)

    @classmethod
    def create(cls, common_name: str = "aiaas development CA", days: int = 365) -> CertificateAuthority:
        return cls(pki.make_ca(common_name, days=days))

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """ValueError unless the key is an EC key matching a CA certificate."""
        return cls(Issued(cert_pem, key_pem))

    @property
    def cert_pem(self) -> bytes:
        return self.issued.cert_pem

    @property
    def key_pem(self) -> bytes:
        return self.issued.key_pem

    def issue(self, spec: CertSpec, namespace: str = NAMESPACE, days: int = 90) -> Issued:
        """A certificate for `spec`: client auth with its SPIFFE URI when it has an identity,
        server auth with its Services' DNS names when it serves; never past the CA's own expiry."""
        if spec.identity is None and not spec.services:
            raise ValueError(f"{spec.name}: a certificate needs an identity, a Service, or both")
        names = dns_names(spec.services, namespace) + (["localhost"] if spec.localhost else [])
        return pki.issue(self.issued, spec.identity or spec.services[0], dns_names=names,
                         ip_addresses=LOOPBACK_ADDRESSES if spec.localhost else (), namespace=namespace,
                         client=bool(spec.identity), days=days)


def tls_secret(name: str, namespace: str, issued: Issued, ca_pem: bytes) -> Manifest:
    """A `kubernetes.io/tls` Secret with tls.crt, tls.key and ca.crt, the layout cert-manager writes."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(PART_OF),
                     "annotations": {"aiaas.dev/generated-by": "aiaas k8s dev-certs"}},
        "stringData": {"tls.crt": issued.cert_pem.decode(), "tls.key": issued.key_pem.decode(),
                       "ca.crt": ca_pem.decode()},
    }


class _BlockDumper(yaml.SafeDumper):
    """PEM blocks as YAML literal blocks, readable in secrets.yaml."""


_BlockDumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def load_or_create_ca(outdir: Path, days: int) -> tuple[CertificateAuthority, bool]:
    """The CA in OUTDIR (ca.crt, ca.key) if both are there, else a new one written there;
    the flag says whether it was created. Keeping it means clients that trust it go on working."""
    cert_path, key_path = outdir / "ca.crt", outdir / "ca.key"
    if cert_path.exists() != key_path.exists():
        raise ValueError(f"{outdir} has only one of ca.crt and ca.key: restore the other or remove both")
    if cert_path.exists():
        return CertificateAuthority.load(cert_path.read_bytes(), key_path.read_bytes()), False
    ca = CertificateAuthority.create(days=days)
    pki.write(ca.issued, outdir, "ca")
    return ca, True


@dataclass(frozen=True)
class DevCerts:
    """What `write_dev_certs` did: whether the CA is new, the files written, the Secrets manifest."""

    ca_created: bool
    files: list[Path]
    secrets: Path


def write_dev_certs(outdir: Path, namespace: str = NAMESPACE, days: int = 90, ca_days: int = 365) -> DevCerts:
    """Issue every pod's and operator's certificate into OUTDIR/<name>/ (tls.crt, tls.key, ca.crt)
    and write OUTDIR/secrets.yaml with the pods' Secrets. A CA already in OUTDIR issues them."""
    if days < 1 or ca_days < 1:
        raise ValueError("certificates must be valid for at least one day")
    outdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca, created = load_or_create_ca(outdir, ca_days)
    written: list[Path] = []
    secrets: list[Manifest] = []
    for spec in (*POD_CERTIFICATES, *OPERATOR_CERTIFICATES):
        issued = ca.issue(spec, namespace, days)
        folder = outdir / spec.name
        for filename, data, private in (("tls.crt", issued.cert_pem, False), ("tls.key", issued.key_pem, True),
                                        ("ca.crt", ca.cert_pem, False)):
            pki.write_file(folder / filename, data, private=private)
            written.append(folder / filename)
        if spec.secret:
            secrets.append(tls_secret(spec.secret, namespace, issued, ca.cert_pem))
    manifest = outdir / "secrets.yaml"
    header = b"# Development certificates from `aiaas k8s dev-certs`: kubectl apply -f this file.\n"
    pki.write_file(manifest, header + yaml.dump_all(secrets, Dumper=_BlockDumper, sort_keys=False).encode(),
                   private=True)
    return DevCerts(created, written, manifest)
