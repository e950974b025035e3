"""Development certificates, the one place aiaas issues them: a CA and per-identity certificates
carrying SPIFFE identities.

For local stacks, tests, `aiaas identity certs` and `aiaas k8s dev-certs` (aiaas/k8s/certs.py says
which certificates a cluster needs and issues them here); production certificates come from
cert-manager, a mesh or your own PKI (docs/security.md). Needs `cryptography` (server distribution).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aiaas.identity import DEFAULT_TRUST_DOMAIN, spiffe_id

# A new certificate is valid from this long ago, so a machine whose clock lags accepts it.
BACKDATE = datetime.timedelta(minutes=5)


@dataclasses.dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


def make_ca(common_name: str = "aiaas development CA", *, days: int = 365,
            organization: str = DEFAULT_TRUST_DOMAIN) -> Issued:
    """A new self-signed CA that may issue leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _subject(organization, common_name)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
    )
    return _signed(builder, key, key, now)


def load_ca(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA's certificate and key; ValueError unless the key is an EC key matching a CA certificate."""
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ValueError("the CA key is not an EC key matching the CA certificate")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError("the CA certificate is not a CA (basicConstraints CA:FALSE)")
    return cert, key


def issue(ca: Issued, name: str, *, dns_names: Sequence[str] = ("localhost",),
          ip_addresses: Sequence[str] = ("127.0.0.1",), namespace: str = "default",
          trust_domain: str = DEFAULT_TRUST_DOMAIN, uri: str | None = None, client: bool = True,
          days: int = 90) -> Issued:
    """A certificate with CN `name`, signed by `ca` and never valid past the CA's own expiry.

    As a client (`client`): the URI SAN `uri`, by default spiffe://<trust_domain>/<namespace>/<name>,
    and client auth. As a server (any `dns_names` or `ip_addresses`): those names and server auth.
    """
    if not client and not dns_names and not ip_addresses:
        raise ValueError(f"{name}: a certificate must identify a client or serve a name")
    ca_cert, ca_key = load_ca(ca)
    names: list[x509.GeneralName] = []
    if client:
        names.append(x509.UniformResourceIdentifier(uri or spiffe_id(name, namespace, trust_domain)))
    names += [x509.DNSName(d) for d in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + (
        [ExtendedKeyUsageOID.SERVER_AUTH] if dns_names or ip_addresses else [])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        # The CN repeats the identity: a peer that reads no URI SAN takes the CN instead.
        x509.CertificateBuilder().subject_name(_subject(trust_domain, name)).issuer_name(ca_cert.subject)
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    return _signed(builder, ec.generate_private_key(ec.SECP256R1()), ca_key, now)


def write(issued: Issued, directory: Path, stem: str) -> tuple[Path, Path]:
    """`<stem>.crt` (mode 0644) and `<stem>.key` (mode 0600) under `directory`."""
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    write_file(cert, issued.cert_pem)
    write_file(key, issued.key_pem, private=True)
    return cert, key


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """`data` at `path` (its folder made when missing), mode 0600 when `private`, else 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    # Created with the final mode, so a key is never readable by others, even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, mode)


def _subject(organization: str, common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         encipher_only=False, decipher_only=False)


def _signed(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey,
            signer: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> Issued:
    cert = (
        builder.public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(signer, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)
