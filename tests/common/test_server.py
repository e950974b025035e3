"""services.common: a real grpc.aio server built with ServiceApp, its interceptor, health, shutdown,
settings and TLS / mTLS. No grpc_testing: every call crosses a real socket and the interceptors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import errors
from services.common.errors import AiaasError, ErrorCode, InvalidArgument
from services.common.server import ServiceApp
from services.common.settings import ServerSettings, load_settings
from tests.support.procs import REPO_ROOT, wait_healthy
from tests.support.servers import free_port

SERVICE = "test.v1.Probe"


def error_for(code_name: str) -> AiaasError:
    error = AiaasError(f"probe failed with {code_name}")
    error.code = ErrorCode[code_name]
    return error


async def fail_unary(request: bytes, context: Any) -> bytes:
    if request == b"boom":
        raise RuntimeError("secret internal detail")
    raise error_for(request.decode())


async def fail_server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"first"
    if request == b"boom":
        raise RuntimeError("secret internal detail")
    raise error_for(request.decode())


async def fail_client_stream(requests: AsyncIterator[bytes], context: Any) -> bytes:
    async for request in requests:
        raise error_for(request.decode())
    return b""


async def fail_bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield b"ack"
        raise error_for(request.decode())


def add_probe(_servicer: object, server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Fail": grpc.unary_unary_rpc_method_handler(fail_unary),
        "FailStream": grpc.unary_stream_rpc_method_handler(fail_server_stream),
        "FailUpload": grpc.stream_unary_rpc_method_handler(fail_client_stream),
        "FailChat": grpc.stream_stream_rpc_method_handler(fail_bidi),
    })
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture
async def app() -> AsyncIterator[ServiceApp]:
    service_app = ServiceApp("probe", ServerSettings(host="127.0.0.1", port=0, require_identity=False, grace_period_s=1.0),
                             configure_process=False)
    service_app.add_service(SERVICE, add_probe, None)
    await service_app.start()
    yield service_app
    await service_app.server.stop(None)


@pytest.fixture
async def channel(app: ServiceApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        yield chan


def test_every_error_class_declares_a_code_the_table_maps() -> None:
    from services.common.interceptors import STATUS_BY_CODE

    assert set(STATUS_BY_CODE) == set(ErrorCode)
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, AiaasError)]
    assert {c.code for c in classes if c is not AiaasError} == set(ErrorCode)


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
async def test_each_error_code_maps_to_its_status_with_the_message(channel: grpc.aio.Channel, code: ErrorCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/Fail")(code.name.encode(), timeout=5)
    assert caught.value.code() == grpc.StatusCode[code.name]
    assert caught.value.details() == f"probe failed with {code.name}"


async def test_unexpected_errors_become_internal_and_are_logged(channel: grpc.aio.Channel,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="aiaas.rpc"), pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/Fail")(b"boom", timeout=5)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in caught.value.details() and "see the server log" in caught.value.details()
    logged = [r for r in caplog.records if r.name == "aiaas.rpc"]
    assert logged and logged[0].exc_info is not None and "secret internal detail" in str(logged[0].exc_info[1])


async def test_streaming_handlers_map_errors_too(channel: grpc.aio.Channel) -> None:
    call = channel.unary_stream(f"/{SERVICE}/FailStream")(b"NOT_FOUND", timeout=5)
    assert await call.read() == b"first"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.NOT_FOUND, "probe failed with NOT_FOUND")

    call = channel.unary_stream(f"/{SERVICE}/FailStream")(b"boom", timeout=5)
    assert await call.read() == b"first"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INTERNAL

    async def one(value: bytes) -> AsyncIterator[bytes]:
        yield value

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.stream_unary(f"/{SERVICE}/FailUpload")(one(b"ABORTED"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.ABORTED

    chat = channel.stream_stream(f"/{SERVICE}/FailChat")(one(b"RESOURCE_EXHAUSTED"), timeout=5)
    assert await chat.read() == b"ack"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chat.read()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_health_is_serving_then_not_serving_on_shutdown(app: ServiceApp, channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.ensure_future(app.shutdown())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    await stopping


SERVER_SCRIPT = textwrap.dedent('''
    import asyncio, os, sys
    from pathlib import Path
    import grpc
    from services.common.server import ServiceApp
    from services.common.settings import ServerSettings

    async def slow(request, context):
        Path(os.environ["MARKER"]).write_text("started")
        await asyncio.sleep(1.0)
        return b"done:" + request

    def add(_servicer, server):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.v1.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)}),))

    async def main():
        app = ServiceApp("slow", ServerSettings(host="127.0.0.1", port=int(sys.argv[1]), require_identity=False, grace_period_s=10,
                                                log_json=False))
        app.add_service("test.v1.Slow", add, None)
        await app.run()

    asyncio.run(main())
''')


def test_sigterm_drains_an_in_flight_call_and_exits_0(tmp_path: Path) -> None:
    script = tmp_path / "slow_server.py"
    script.write_text(SERVER_SCRIPT)
    marker = tmp_path / "marker"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, str(script), str(port)], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout=30, proc=proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            future = chan.unary_unary("/test.v1.Slow/Call").future(b"x", timeout=15)
            started = threading.Event()
            while not started.wait(0.02):
                if marker.exists():
                    started.set()
            proc.send_signal(signal.SIGTERM)
            assert future.result() == b"done:x"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@dataclass(frozen=True)
class ProbeSettings(ServerSettings):
    port: int = 1234
    colour: str = "red"
    verbose: bool = False
    ratio: float = 0.5


def test_settings_come_from_env_and_flags_with_flags_winning() -> None:
    env = {"AIAAS_PROBE_PORT": "2000", "AIAAS_PORT": "3000", "AIAAS_COLOUR": "blue", "AIAAS_VERBOSE": "yes",
           "AIAAS_PROBE_RATIO": "0.25"}
    from_env = load_settings(ProbeSettings, [], service="probe", environ=env)
    assert (from_env.port, from_env.colour, from_env.verbose, from_env.ratio) == (2000, "blue", True, 0.25)
    flagged = load_settings(ProbeSettings, ["--port", "4000", "--colour", "green", "--no-verbose"], service="probe",
                            environ=env)
    assert (flagged.port, flagged.colour, flagged.verbose) == (4000, "green", False)
    assert load_settings(ProbeSettings, [], service="probe", environ={}).port == 1234
    with pytest.raises(InvalidArgument, match="cannot read 'lots' as int"):
        load_settings(ProbeSettings, [], service="probe", environ={"AIAAS_PORT": "lots"})
    with pytest.raises(InvalidArgument, match="tls_cert and tls_key must be given together"):
        load_settings(ProbeSettings, ["--tls-cert", "x.pem"], service="probe", environ={})


# TLS --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(directory: Path) -> Certs:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        pass
    else:
        return _make_certs_cryptography(directory)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=aiaas test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (directory / f"{name}.ext").write_text(ext)
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=directory)
    return Certs(directory / "ca.crt", directory / "server.crt", directory / "server.key", directory / "client.crt",
                 directory / "client.key")


def _make_certs_cryptography(directory: Path) -> Certs:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    def build(cn: str, issuer: x509.Name, key: Any, signer: Any, extensions: list[tuple[Any, bool]]) -> Any:
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aiaas test CA")])
    ca = build("aiaas test CA", ca_name, ca_key, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    ca_path, _ = write("ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = build("server", ca_name, server_key, ca_key, [
        (x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
         False), (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = build("client", ca_name, client_key, ca_key,
                   [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    server_paths, client_paths = write("server", server, server_key), write("client", client, client_key)
    return Certs(ca_path, *server_paths, *client_paths)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


async def _check(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    options = [("grpc.ssl_target_name_override", "localhost")]
    target = f"127.0.0.1:{port}"
    chan = grpc.aio.secure_channel(target, credentials, options) if credentials else grpc.aio.insecure_channel(target)
    async with chan:
        try:
            await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=3)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()


@pytest.fixture
async def tls_app(request: pytest.FixtureRequest, certs: Certs) -> AsyncIterator[ServiceApp]:
    mutual = request.param == "mtls"
    settings = ServerSettings(host="127.0.0.1", port=0, require_identity=False, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key),
                              tls_client_ca=str(certs.ca) if mutual else None)
    service_app = ServiceApp("tls", settings, configure_process=False)
    await service_app.start()
    yield service_app
    await service_app.server.stop(None)


@pytest.mark.parametrize("tls_app", ["tls"], indirect=True)
async def test_tls_serves_only_encrypted_clients(tls_app: ServiceApp, certs: Certs) -> None:
    ca = certs.ca.read_bytes()
    assert await _check(tls_app.port, grpc.ssl_channel_credentials(root_certificates=ca)) == grpc.StatusCode.OK
    assert await _check(tls_app.port, None) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("tls_app", ["mtls"], indirect=True)
async def test_mtls_requires_a_client_certificate(tls_app: ServiceApp, certs: Certs) -> None:
    ca = certs.ca.read_bytes()
    with_cert = grpc.ssl_channel_credentials(root_certificates=ca, private_key=certs.client_key.read_bytes(),
                                             certificate_chain=certs.client_cert.read_bytes())
    assert await _check(tls_app.port, with_cert) == grpc.StatusCode.OK
    assert await _check(tls_app.port, grpc.ssl_channel_credentials(root_certificates=ca)) == grpc.StatusCode.UNAVAILABLE
