"""`aiaas k8s dev-certs` and the certificate table: what each certificate carries, that they chain
to one CA that is kept across runs, that the Secrets are exactly what the dev overlay mounts, and
that the prod overlay's cert-manager Certificates ask for the same names."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from aiaas.cli.main import main
from aiaas.identity import spiffe_id
from aiaas.k8s.certs import (
    OPERATOR_CERTIFICATES,
    POD_CERTIFICATES,
    POSTGRES_CERTIFICATE,
    CertificateAuthority,
    CertSpec,
    dns_names,
    write_dev_certs,
)
from aiaas.k8s.render import render
from aiaas.k8s.rollout import mounted_secrets

ALL_DEV = (*POD_CERTIFICATES, *OPERATOR_CERTIFICATES)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("dev-certs") / "certs"
    assert write_dev_certs(outdir, "aiaas").ca_created
    return outdir


def test_every_certificate_chains_to_the_dev_ca_with_its_names(dev_dir: Path) -> None:
    ca = load(dev_dir / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for spec in ALL_DEV:
        folder = dev_dir / spec.name
        cert = load(folder / "tls.crt")
        cert.verify_directly_issued_by(ca)
        assert (folder / "ca.crt").read_bytes() == (dev_dir / "ca.crt").read_bytes()
        key = serialization.load_pem_private_key((folder / "tls.key").read_bytes(), password=None)
        assert key.public_key() == cert.public_key()
        names = sans(cert)
        uris = names.get_values_for_type(x509.UniformResourceIdentifier)
        assert uris == ([f"spiffe://aiaas/aiaas/{spec.identity}"] if spec.identity else []), spec.name
        expected_dns = dns_names(spec.services, "aiaas") + (["localhost"] if spec.localhost else [])
        assert names.get_values_for_type(x509.DNSName) == expected_dns, spec.name
        ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
        assert ips == ({"127.0.0.1", "::1"} if spec.localhost else set()), spec.name
        expected_usages = ({ExtendedKeyUsageOID.CLIENT_AUTH} if spec.identity else set()) | (
            {ExtendedKeyUsageOID.SERVER_AUTH} if spec.services else set())
        assert usages(cert) == expected_usages, spec.name
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_the_identities_and_names_the_services_dial() -> None:
    by_secret = {spec.secret: spec for spec in POD_CERTIFICATES}
    assert by_secret["inference-tls"].services == ("inference", "inference-headless")
    assert dns_names(["registry"], "ml") == ["registry", "registry.ml", "registry.ml.svc",
                                             "registry.ml.svc.cluster.local"]
    assert spiffe_id("gateway", "ml") == "spiffe://aiaas/ml/gateway"
    assert {spec.identity for spec in ALL_DEV} - {None} == {
        "registry", "inference", "monitor", "gateway", "admin", "deployer"}


def test_keys_are_private_and_certificates_readable(dev_dir: Path) -> None:
    assert stat.S_IMODE((dev_dir / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((dev_dir / "secrets.yaml").stat().st_mode) == 0o600
    assert stat.S_IMODE(dev_dir.stat().st_mode) == 0o700
    for spec in ALL_DEV:
        assert stat.S_IMODE((dev_dir / spec.name / "tls.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((dev_dir / spec.name / "tls.crt").stat().st_mode) == 0o644


def test_secrets_are_what_the_dev_overlay_mounts_and_validate(dev_dir: Path) -> None:
    secrets = [doc for doc in yaml.safe_load_all((dev_dir / "secrets.yaml").read_text()) if doc]
    assert {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in secrets} == set(mounted_secrets(render("dev")))
    for secret in secrets:
        kubernetes_validate.validate(secret, kubernetes_validate.latest_version(), strict=True)
        assert secret["type"] == "kubernetes.io/tls"
        assert secret["metadata"]["labels"] == {"app.kubernetes.io/part-of": "aiaas"}
        name = secret["metadata"]["name"]
        assert secret["stringData"] == {key: (dev_dir / name / key).read_text() for key in ("tls.crt", "tls.key", "ca.crt")}


def test_a_second_run_keeps_the_ca_and_issues_new_certificates(tmp_path: Path) -> None:
    first = write_dev_certs(tmp_path, "aiaas")
    ca_before = (tmp_path / "ca.crt").read_bytes()
    leaf_before = (tmp_path / "registry-tls" / "tls.crt").read_bytes()
    second = write_dev_certs(tmp_path, "aiaas")
    assert first.ca_created and not second.ca_created
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    assert (tmp_path / "registry-tls" / "tls.crt").read_bytes() != leaf_before
    load(tmp_path / "registry-tls" / "tls.crt").verify_directly_issued_by(load(tmp_path / "ca.crt"))


def test_a_broken_ca_folder_is_refused(tmp_path: Path) -> None:
    write_dev_certs(tmp_path, "aiaas")
    other = CertificateAuthority.create()
    (tmp_path / "ca.key").write_bytes(other.key_pem)
    with pytest.raises(ValueError, match="not an EC key matching the CA certificate"):
        write_dev_certs(tmp_path, "aiaas")
    (tmp_path / "ca.key").unlink()
    with pytest.raises(ValueError, match="only one of ca.crt and ca.key"):
        write_dev_certs(tmp_path, "aiaas")
    leaf = CertificateAuthority.create().issue(CertSpec("x-tls", "x"), "aiaas")
    with pytest.raises(ValueError, match="not a CA"):
        CertificateAuthority.load(leaf.cert_pem, leaf.key_pem)


def test_certificates_never_outlive_the_ca_and_need_a_subject(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(days=2)
    cert = x509.load_pem_x509_certificate(ca.issue(POD_CERTIFICATES[0], "aiaas", days=90).cert_pem)
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    with pytest.raises(ValueError, match="needs an identity, a Service, or both"):
        ca.issue(CertSpec("empty", None), "aiaas")
    with pytest.raises(ValueError, match="at least one day"):
        write_dev_certs(tmp_path, "aiaas", days=0)


def test_another_namespace_is_in_every_name(tmp_path: Path) -> None:
    write_dev_certs(tmp_path, "ml-serving")
    cert = load(tmp_path / "inference-tls" / "tls.crt")
    assert sans(cert).get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://aiaas/ml-serving/inference"]
    assert "inference-headless.ml-serving.svc" in sans(cert).get_values_for_type(x509.DNSName)
    secrets = list(yaml.safe_load_all((tmp_path / "secrets.yaml").read_text()))
    assert {s["metadata"]["namespace"] for s in secrets} == {"ml-serving"}
    gateway = load(tmp_path / "gateway-tls" / "tls.crt")
    assert ipaddress.ip_address("127.0.0.1") in sans(gateway).get_values_for_type(x509.IPAddress)


def test_cli_dev_certs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["k8s", "dev-certs", str(tmp_path / "out"), "--namespace", "ml", "--days", "7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"created the CA {tmp_path / 'out' / 'ca.crt'}")
    assert "inference-tls       spiffe://aiaas/ml/inference" in out
    assert f"kubectl apply -f {tmp_path / 'out' / 'secrets.yaml'}" in out
    cert = load(tmp_path / "out" / "admin" / "tls.crt")
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < datetime.timedelta(days=8)
    assert main(["k8s", "dev-certs", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("kept the CA")
    assert main(["k8s", "dev-certs", str(tmp_path / "bad"), "--days", "0"]) == 1
    assert "error: certificates must be valid for at least one day" in capsys.readouterr().err


# The prod overlay's cert-manager resources ------------------------------------------------------

CERT_MANAGER_USAGES = {"digital signature", "key encipherment", "server auth", "client auth"}


def certificates(overlay: str) -> dict[str, dict]:
    return {o["spec"]["secretName"]: o for o in render(overlay)
            if o["kind"] == "Certificate" and o["apiVersion"] == "cert-manager.io/v1"}


@pytest.mark.parametrize("overlay", ["prod", "gpu"])
def test_prod_certificates_ask_for_the_names_of_the_table(overlay: str) -> None:
    issued = certificates(overlay)
    table = {str(spec.secret): spec for spec in (*POD_CERTIFICATES, POSTGRES_CERTIFICATE)}
    assert set(issued) == set(table) | {"aiaas-internal-ca"}
    for secret, spec in table.items():
        cert = issued[secret]["spec"]
        assert cert["privateKey"] == {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}, secret
        assert set(cert["usages"]) <= CERT_MANAGER_USAGES
        assert ("client auth" in cert["usages"]) == bool(spec.identity), secret
        assert ("server auth" in cert["usages"]) == bool(spec.services), secret
        if secret == "gateway-tls":
            # The public certificate: a public issuer, for the name clients outside dial.
            assert cert["issuerRef"] == {"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "aiaas-public"}
            assert "uris" not in cert and cert["dnsNames"]
            continue
        assert cert["issuerRef"] == {"kind": "Issuer", "name": "aiaas-internal"}, secret
        assert cert.get("uris", []) == ([spiffe_id(spec.identity, "aiaas")] if spec.identity else []), secret
        assert cert.get("dnsNames", []) == dns_names(spec.services, "aiaas"), secret
        assert cert["commonName"] == (spec.identity or spec.services[0]), secret


def test_prod_internal_ca_is_made_in_the_cluster() -> None:
    objects = render("prod")
    issuers = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Issuer"}
    assert issuers == {"aiaas-selfsigned": {"selfSigned": {}}, "aiaas-internal": {"ca": {"secretName": "aiaas-internal-ca"}}}
    ca = certificates("prod")["aiaas-internal-ca"]["spec"]
    assert ca["isCA"] is True and ca["issuerRef"] == {"kind": "Issuer", "name": "aiaas-selfsigned"}
    for obj in objects:
        if obj["apiVersion"] == "cert-manager.io/v1":
            assert obj["metadata"]["namespace"] == "aiaas"
            assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "aiaas"
