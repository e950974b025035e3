"""`aiaas.pki`, the one place certificates are issued: what an identity certificate carries, that
the cluster's CA (`aiaas.k8s.certs`) is the same kind of CA, and that keys are written private."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aiaas import pki
from aiaas.k8s.certs import CertificateAuthority, CertSpec

ExtensionT = TypeVar("ExtensionT", bound=x509.ExtensionType)


def extension(cert: x509.Certificate, kind: type[ExtensionT]) -> ExtensionT:
    return cert.extensions.get_extension_for_class(kind).value


def test_an_identity_certificate_serves_and_identifies_and_chains_to_its_ca() -> None:
    ca = pki.make_ca(days=3)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    cert = x509.load_pem_x509_certificate(pki.issue(ca, "registry", namespace="ml", days=90).cert_pem)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "registry"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "aiaas"
    names = extension(cert, x509.SubjectAlternativeName)
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://aiaas/ml/registry"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert set(extension(cert, x509.ExtendedKeyUsage)) == {ExtendedKeyUsageOID.CLIENT_AUTH,
                                                           ExtendedKeyUsageOID.SERVER_AUTH}
    usage = extension(cert, x509.KeyUsage)
    assert usage.digital_signature and not usage.key_cert_sign
    assert not extension(cert, x509.BasicConstraints).ca
    assert extension(cert, x509.AuthorityKeyIdentifier).key_identifier == extension(
        ca_cert, x509.SubjectKeyIdentifier).digest
    # Asked for 90 days from a CA that lives 3: the certificate ends with the CA.
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc
    assert cert.not_valid_before_utc < datetime.datetime.now(datetime.UTC)


def test_a_client_only_or_server_only_certificate_says_so() -> None:
    ca = pki.make_ca()
    client = x509.load_pem_x509_certificate(pki.issue(ca, "admin", dns_names=(), ip_addresses=()).cert_pem)
    assert set(extension(client, x509.ExtendedKeyUsage)) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    server = x509.load_pem_x509_certificate(pki.issue(ca, "db", dns_names=("db",), client=False).cert_pem)
    assert set(extension(server, x509.ExtendedKeyUsage)) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert extension(server, x509.SubjectAlternativeName).get_values_for_type(x509.UniformResourceIdentifier) == []
    with pytest.raises(ValueError, match="must identify a client or serve a name"):
        pki.issue(ca, "nobody", dns_names=(), ip_addresses=(), client=False)


def test_the_cluster_ca_and_the_identity_ca_are_one_kind() -> None:
    """A CA from `aiaas identity certs` issues the cluster's certificates and the other way round."""
    identity_ca = pki.make_ca()
    cluster = CertificateAuthority.load(identity_ca.cert_pem, identity_ca.key_pem)
    leaf = x509.load_pem_x509_certificate(cluster.issue(CertSpec("registry-tls", "registry", ("registry",))).cert_pem)
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(identity_ca.cert_pem))
    cluster_ca = CertificateAuthority.create()
    issued = pki.issue(cluster_ca.issued, "gateway")
    x509.load_pem_x509_certificate(issued.cert_pem).verify_directly_issued_by(cluster_ca.cert)
    with pytest.raises(ValueError, match="not a CA"):
        pki.issue(issued, "x")


def test_keys_are_written_private_even_over_a_readable_file(tmp_path: Path) -> None:
    ca = pki.make_ca()
    (tmp_path / "ca.key").write_bytes(b"old")
    (tmp_path / "ca.key").chmod(0o644)
    cert, key = pki.write(ca, tmp_path, "ca")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.read_bytes() == ca.key_pem
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644 and cert.read_bytes() == ca.cert_pem
