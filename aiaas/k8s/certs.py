"""Certificates for mTLS between the services: which ones exist, what names they carry, and
(for development clusters, `aiaas k8s dev-certs`) a CA that issues them, written as files and Secrets.

Each pod's identity is the URI SAN `spiffe://aiaas/<namespace>/<identity>`; a certificate that
serves also carries the DNS names of its Services, which are the names its clients dial
(`registry`, `dns:///inference-headless`). In production cert-manager issues the same
certificates (deploy/k8s/overlays/prod/certificates.yaml); the tests hold the two to this table.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aiaas.k8s.manifest import Manifest
from aiaas.k8s.render import NAMESPACE, PART_OF

TRUST_DOMAIN = "aiaas"
CLUSTER_DOMAIN = "cluster.local"
# Minutes a new certificate is valid before now, so a node whose clock lags accepts it.
BACKDATE = datetime.timedelta(minutes=5)


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


def spiffe_id(namespace: str, identity: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{namespace}/{identity}"


def dns_names(services: Sequence[str], namespace: str, cluster_domain: str = CLUSTER_DOMAIN) -> list[str]:
    """Every name a pod in the cluster may dial a Service by, short name first."""
    return [name for service in services for name in (
        service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.{cluster_domain}")]


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertificateAuthority:
    """A CA key and self-signed certificate that issues the services' certificates."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, common_name: str = "aiaas development CA", days: int = 365) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise ValueError("the CA key is not an EC key matching the CA certificate")
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not constraints.ca:
            raise ValueError("the CA certificate is not a CA (basicConstraints CA:FALSE)")
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def issue(self, spec: CertSpec, namespace: str = NAMESPACE, days: int = 90) -> Issued:
        """A certificate for `spec`: client auth with its SPIFFE URI when it has an identity,
        server auth with its Services' DNS names when it serves; never past the CA's own expiry."""
        if spec.identity is None and not spec.services:
            raise ValueError(f"{spec.name}: a certificate needs an identity, a Service, or both")
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        if spec.identity:
            names.append(x509.UniformResourceIdentifier(spiffe_id(namespace, spec.identity)))
        names += [x509.DNSName(name) for name in dns_names(spec.services, namespace)]
        if spec.localhost:
            names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                      x509.IPAddress(ipaddress.ip_address("::1"))]
        usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if spec.identity else []) + (
            [ExtendedKeyUsageOID.SERVER_AUTH] if spec.services else [])
        now = datetime.datetime.now(datetime.UTC)
        # The CN repeats the identity: a peer that reads no URI SAN takes the CN instead.
        common_name = spec.identity or spec.services[0]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
                                     x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


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


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with the final mode, so a key is never readable by others, even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def load_or_create_ca(outdir: Path, days: int) -> tuple[CertificateAuthority, bool]:
    """The CA in OUTDIR (ca.crt, ca.key) if both are there, else a new one written there;
    the flag says whether it was created. Keeping it means clients that trust it go on working."""
    cert_path, key_path = outdir / "ca.crt", outdir / "ca.key"
    if cert_path.exists() != key_path.exists():
        raise ValueError(f"{outdir} has only one of ca.crt and ca.key: restore the other or remove both")
    if cert_path.exists():
        return CertificateAuthority.load(cert_path.read_bytes(), key_path.read_bytes()), False
    ca = CertificateAuthority.create(days=days)
    _write(cert_path, ca.cert_pem)
    _write(key_path, ca.key_pem, private=True)
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
            _write(folder / filename, data, private)
            written.append(folder / filename)
        if spec.secret:
            secrets.append(tls_secret(spec.secret, namespace, issued, ca.cert_pem))
    manifest = outdir / "secrets.yaml"
    header = b"# Development certificates from `aiaas k8s dev-certs`: kubectl apply -f this file.\n"
    _write(manifest, header + yaml.dump_all(secrets, Dumper=_BlockDumper, sort_keys=False).encode(), private=True)
    return DevCerts(created, written, manifest)
