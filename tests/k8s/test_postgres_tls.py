"""The prod overlay's PostgreSQL TLS against a real PostgreSQL: the server runs with the rendered
StatefulSet's settings and pg_hba.conf and a certificate issued for the `postgres` Service, and
the registry's rendered database URL (sslmode=verify-full) connects, while plaintext, another CA
and another server name are refused. The registry itself runs on it over verified TLS."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy
from sqlalchemy.exc import OperationalError

from aiaas.k8s.certs import POSTGRES_CERTIFICATE, CertificateAuthority, write_dev_certs
from aiaas.k8s.manifest import Manifest
from aiaas.k8s.render import render
from tests.k8s.pods import container_of, probe_command, probe_until_ready, tls_env
from tests.support.procs import ServiceProcess
from tests.support.servers import PostgresServer, _find_binary, wait_for_port

PASSWORD = "s3cret-Password_1"
# Where the rendered StatefulSet mounts its certificate and pg_hba.conf.
POD_TLS, POD_CONFIG = "/etc/postgres/tls", "/etc/postgres/config"


class PodPostgres(PostgresServer):
    """PostgreSQL started with the rendered pod's arguments; its mounts become folders here."""

    def __init__(self, objects: list[Manifest], ca: CertificateAuthority) -> None:
        super().__init__()
        self.objects = objects
        self.ca = ca

    def _own(self, path: Path, mode: int) -> None:
        if self._as_user:
            shutil.chown(path, "postgres", "postgres")
        os.chmod(path, mode)

    def start(self) -> PodPostgres:
        _, container = container_of(self.objects, "postgres")
        config = next(o for o in self.objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "postgres-config")
        root = Path(self.dir)
        mounts = {POD_TLS: root / "tls", POD_CONFIG: root / "config"}
        for folder in mounts.values():
            folder.mkdir()
            self._own(folder, 0o700)
        issued = self.ca.issue(POSTGRES_CERTIFICATE, "aiaas")
        for name, data, mode in (("tls.crt", issued.cert_pem, 0o644), ("tls.key", issued.key_pem, 0o600)):
            (mounts[POD_TLS] / name).write_bytes(data)
            self._own(mounts[POD_TLS] / name, mode)
        for name, text in config["data"].items():
            (mounts[POD_CONFIG] / name).write_text(text)
            self._own(mounts[POD_CONFIG] / name, 0o644)
        args = list(container["args"])
        for pod_path, here in mounts.items():
            args = [arg.replace(pod_path, str(here)) for arg in args]
        self._run(_find_binary("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        opts = " ".join([f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off", *args])
        self._run(_find_binary("pg_ctl"), "-D", self.data, "-o", opts, "-l", os.path.join(self.dir, "pg.log"),
                  "-w", "start")
        wait_for_port(self.port)
        # As the image's entrypoint does, over the local socket: the user and database of the pod's env.
        with psycopg.connect(host=self.dir, port=self.port, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE ROLE aiaas LOGIN PASSWORD '{PASSWORD}'")
            conn.execute("CREATE DATABASE aiaas OWNER aiaas")
        return self


@pytest.fixture(scope="module")
def prod() -> list[Manifest]:
    return render("prod")


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Development certificates standing in for cert-manager's: one CA for the pods and PostgreSQL."""
    outdir = tmp_path_factory.mktemp("pg-tls") / "certs"
    write_dev_certs(outdir, "aiaas")
    return outdir


@pytest.fixture(scope="module")
def postgres(prod: list[Manifest], certs_dir: Path) -> Iterator[PodPostgres]:
    ca = CertificateAuthority.load((certs_dir / "ca.crt").read_bytes(), (certs_dir / "ca.key").read_bytes())
    server = PodPostgres(prod, ca).start()
    yield server
    server.close()


def registry_url(prod: list[Manifest], certs_dir: Path, port: int, *, host: str = "postgres",
                 root: Path | None = None) -> str:
    """The registry's rendered database URL with the password, this server's port, the CA file its
    registry-tls mount would hold, and hostaddr so `host` is only the name checked, not resolved."""
    _, container = container_of(prod, "registry")
    url = next(e["value"] for e in container["env"] if e["name"] == "AIAAS_REGISTRY_DATABASE_URL")
    url = url.replace("$(POSTGRES_PASSWORD)", PASSWORD).replace("@postgres:5432/", f"@{host}:{port}/")
    url = url.replace("sslrootcert=/etc/aiaas/tls/ca.crt", f"sslrootcert={root or certs_dir / 'registry-tls' / 'ca.crt'}")
    return f"{url}&hostaddr=127.0.0.1"


def connect_error(url: str) -> str:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect():
            return ""
    except OperationalError as exc:
        return str(exc.orig)
    finally:
        engine.dispose()


def test_the_rendered_url_connects_over_verified_tls(postgres: PodPostgres, prod: list[Manifest],
                                                    certs_dir: Path) -> None:
    url = registry_url(prod, certs_dir, postgres.port)
    assert "sslmode=verify-full" in url
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        ssl, version = conn.execute(sqlalchemy.text(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).one()
        user = conn.execute(sqlalchemy.text("SELECT current_user")).scalar_one()
    engine.dispose()
    assert ssl is True and version.startswith("TLSv1.")
    assert user == "aiaas"


def test_plaintext_is_refused_by_the_rendered_pg_hba(postgres: PodPostgres, prod: list[Manifest],
                                                    certs_dir: Path) -> None:
    url = registry_url(prod, certs_dir, postgres.port).replace("sslmode=verify-full", "sslmode=disable")
    assert "no encryption" in connect_error(url)


def test_another_ca_or_another_name_is_refused(postgres: PodPostgres, prod: list[Manifest], certs_dir: Path,
                                              tmp_path: Path) -> None:
    stranger = tmp_path / "stranger-ca.crt"
    stranger.write_bytes(CertificateAuthority.create().cert_pem)
    assert "certificate verify failed" in connect_error(registry_url(prod, certs_dir, postgres.port, root=stranger))
    # The certificate is for `postgres`; a URL naming another host must not accept it.
    error = connect_error(registry_url(prod, certs_dir, postgres.port, host="registry"))
    assert 'does not match host name "registry"' in error


def test_registry_runs_on_verified_postgres(postgres: PodPostgres, prod: list[Manifest], certs_dir: Path,
                                           tmp_path: Path) -> None:
    env = tls_env(prod, "registry", certs_dir)
    service = ServiceProcess("registry", ["--database-url", registry_url(prod, certs_dir, postgres.port),
                                          "--artifact-dir", str(tmp_path / "artifacts")],
                             env={**env, "AIAAS_HOME": str(tmp_path)})
    service.start(wait=False)
    try:
        result = probe_until_ready(probe_command(prod, "registry", service.port, "startupProbe"), env,
                                   alive=lambda: service.proc is not None and service.proc.poll() is None)
        assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{service.log()[-3000:]}"
        with psycopg.connect(host=postgres.dir, port=postgres.port, user="postgres", dbname="aiaas") as conn:
            tables = {row[0] for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE tableowner = 'aiaas'").fetchall()}
            encrypted = conn.execute(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                "WHERE a.usename = 'aiaas'").fetchall()
        assert tables, "the registry created no table in PostgreSQL"
        # The registry's pooled connections, every one of them over TLS.
        assert encrypted and all(row[0] is True for row in encrypted)
    finally:
        service.stop()
