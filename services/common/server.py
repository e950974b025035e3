"""One way to run a grpc.aio server for every service.

`ServiceApp` owns the server: options (message sizes, per-connection caps, keepalive), the
interceptor, health and reflection, TLS / mTLS, and graceful shutdown (health NOT_SERVING, stop
accepting, drain within the grace period, run shutdown hooks, exit 0).

`Service` is what every `services/<name>/server.py` returns from `create_service(settings)`: the
app, the core, and one lifecycle (`start`, `stop`, `run`) that `python -m services.<name>` and the
tests drive the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.authz import Authenticator, Guard, Policy, TokenVerifier
from services.common.errors import InvalidArgument, Unavailable
from services.common.interceptors import ServiceInterceptor
from services.common.logs import configure_logging
from services.common.settings import ServerSettings
from services.common.telemetry import configure_telemetry

log = logging.getLogger("aiaas.server")

ShutdownHook = Callable[[], Awaitable[None]]
CoreT = TypeVar("CoreT")


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def server_options(settings: ServerSettings, max_receive_bytes: int, *,
                   reuse_port: bool = False) -> list[tuple[str, Any]]:
    """Options bounding what one caller or connection can hold. `reuse_port`: several processes
    accept on the port (SO_REUSEPORT, the inference service's frontends); otherwise a second
    server on a taken port fails to bind instead of silently sharing it.

    grpc-core refuses a message over `max_receive_bytes` with RESOURCE_EXHAUSTED, but (grpcio 1.81,
    grpc/grpc#43012) only once the whole message has arrived: an oversized message is buffered once
    before it is refused. That is why the gateway checks the API key before it reads any body, and
    why the per-connection stream cap below matters."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Count open HTTP/2 streams against the cap, so clients queue calls past it. grpc's default
        # also counts calls that ended but are not yet freed and refuses new ones meanwhile
        # (REFUSED_STREAM: UNAVAILABLE to a client running near the cap).
        ("grpc.http.overload_protection", 0),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", settings.keepalive_min_ping_interval_ms),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
    ]
    if settings.max_connection_idle_ms:
        options.append(("grpc.max_connection_idle_ms", settings.max_connection_idle_ms))
    if settings.max_connection_age_ms:
        options.append(("grpc.max_connection_age_ms", settings.max_connection_age_ms))
        options.append(("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace_ms))
    return options


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    key = Path(settings.tls_key or "").read_bytes()
    cert = Path(settings.tls_cert).read_bytes()
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def build_guard(name: str, settings: ServerSettings) -> Guard:
    """Who may call service `name`: its authenticator (mTLS and/or tokens) and the policy."""
    tokens = TokenVerifier.from_file(settings.identity_token_key) if settings.identity_token_key else None
    mtls = bool(settings.tls_client_ca)
    if settings.require_identity and not mtls and tokens is None:
        raise InvalidArgument(
            f"{name} requires caller identities but has no way to verify one: set tls_client_ca (mTLS, "
            "production) or identity_token_key (development tokens, see `aiaas identity`), or set "
            "require_identity=false to accept any caller (local development only)"
        )
    authenticator = Authenticator(mtls=mtls, tokens=tokens, trust_domain=settings.trust_domain) \
        if (mtls or tokens is not None) else None
    return Guard(name, authenticator, Policy.load(settings.authz_policy), required=settings.require_identity)


def ensure_port_free(service: str, host: str, port: int) -> None:
    """Before several processes share a port (SO_REUSEPORT): refuse one some other server already
    holds, instead of splitting its connections with it."""
    try:
        with socket.create_server((host.strip("[]"), port),
                                  family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as exc:
        raise Unavailable(f"{service} cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class ServiceApp:
    """A configured grpc.aio server; add servicers, then `run()` until SIGTERM/SIGINT."""

    def __init__(
        self,
        name: str,
        settings: ServerSettings,
        *,
        extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        configure_process: bool = True,
        max_receive_bytes: int | None = None,
        public: bool = False,
        reuse_port: bool = False,
    ) -> None:
        """`max_receive_bytes`: the service's real per-message cap when it is smaller than
        `settings.max_message_bytes` (the gateway's largest request, the registry's chunk).
        `public`: callers are not internal services (the gateway's door, keyed by API keys), so no
        caller identity is asked for."""
        self.name = name
        self.settings = settings
        self.max_receive_bytes = max_receive_bytes or settings.max_message_bytes
        tracing = False
        if configure_process:
            configure_logging(name, settings.log_level, settings.log_json)
            tracing = configure_telemetry(
                name, otlp_endpoint=settings.otlp_endpoint, metrics_port=settings.metrics_port,
                metrics_host=settings.host,
            )
        # The service interceptor wraps handlers at registration (see `add_service`), not per call.
        self.guard = None if public else build_guard(name, settings)
        self.tracing = tracing
        self.interceptor = ServiceInterceptor(name, tracing=tracing, guard=self.guard)
        self.server = grpc.aio.server(
            interceptors=list(extra_interceptors) or None,
            options=server_options(settings, self.max_receive_bytes, reuse_port=reuse_port),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        self._registrations: list[tuple[Callable[[Any, Any], None], Any]] = []
        self._shutdown_hooks: list[ShutdownHook] = []
        self._stopping: asyncio.Event | None = None
        self.port = 0

    def add_service(self, full_name: str, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        """Register a servicer through its generated `add_..._to_server` (or any function that adds
        generic handlers); every handler it adds is wrapped by the service interceptor."""
        add_to_server(servicer, _InterceptedRegistrar(self.server, self.interceptor))
        self._service_names.append(full_name)
        self._registrations.append((add_to_server, servicer))

    def internal_server(self, address: str, guard: Guard) -> grpc.aio.Server:
        """A second server over the same servicers and health, for this service's own frontend
        processes (a Unix socket only they can reach): its interceptor authorizes each call as the
        caller the frontend verified (`guard`), and it counts the calls in the same RPC metrics.
        Not started; bound to `address`."""
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.max_receive_bytes),
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.http.overload_protection", 0),
        ], maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs)
        interceptor = ServiceInterceptor(self.name, tracing=self.tracing, guard=guard)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for add_to_server, servicer in self._registrations:
            add_to_server(servicer, _InterceptedRegistrar(server, interceptor))
        reflection.enable_server_reflection(self._service_names, server)
        if server.add_insecure_port(address) == 0:
            raise RuntimeError(f"could not bind {address}")
        return server

    def on_shutdown(self, hook: ShutdownHook) -> None:
        """Run `hook` after in-flight calls have drained (close stores, stop workers...)."""
        self._shutdown_hooks.append(hook)

    async def set_serving(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(service, status)

    async def start(self, before_start: Callable[[int], Awaitable[None]] | None = None) -> int:
        """Bind, then serve. `before_start(port)` runs once the port is bound and before calls are
        taken (the inference service starts its frontends on the port there)."""
        reflection.enable_server_reflection(self._service_names, self.server)
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        if before_start is not None:
            await before_start(self.port)
        await self.server.start()
        for name in self._service_names:
            if name not in (health.SERVICE_NAME, reflection.SERVICE_NAME):
                await self.set_serving(name, True)
        await self.set_serving("", True)
        log.info("%s listening on %s:%d (tls=%s)", self.name, self.settings.host, self.port, bool(credentials))
        return self.port

    def request_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def run(self) -> None:
        """Start, then serve until SIGTERM/SIGINT, then shut down gracefully."""
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self.start()
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("%s shutting down: draining for up to %.1fs", self.name, self.settings.grace_period_s)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_period_s)
        for hook in reversed(self._shutdown_hooks):
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        log.info("%s stopped", self.name)


class Service(Generic[CoreT]):
    """A wired service: its `app` (the grpc server), its `core` (the domain object its servicer calls)
    and its lifecycle. Subclasses say what runs before the port opens (`prepare`) and what to
    release once calls have drained (`close`)."""

    def __init__(self, app: ServiceApp, core: CoreT) -> None:
        self.app = app
        self.core = core
        app.on_shutdown(self.close)

    @property
    def port(self) -> int:
        """The bound port once started (settings.port 0 picks a free one)."""
        return self.app.port

    async def prepare(self) -> None:
        """Work that must finish before the port opens (loads, the registry's first snapshot)."""

    async def start(self) -> int:
        """Prepare, then listen and report SERVING; returns the bound port."""
        await self.prepare()
        return await self.app.start()

    async def stop(self) -> None:
        """Graceful: health NOT_SERVING, stop accepting, drain within the grace period, then `close`."""
        await self.app.shutdown()

    async def close(self) -> None:
        """Release background tasks, channels and stores (after the drain, or when start-up is cut short)."""

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop. A signal during start-up (a long load, a registry
        not up yet) ends it there: nothing was served, so it only closes."""
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        starting = loop.create_task(self.start(), name=f"{self.app.name}-start")
        signalled = loop.create_task(stopping.wait(), name=f"{self.app.name}-signal")
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            log.info("%s stopped during start-up", self.app.name)
            await self.close()
            return
        if starting.exception() is not None:
            signalled.cancel()
            await self.close()
            starting.result()
        await signalled
        await self.stop()


class _InterceptedRegistrar:
    """What `add_..._to_server` sees instead of the server: the handlers it adds get wrapped."""

    def __init__(self, server: grpc.aio.Server, interceptor: ServiceInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(self._interceptor.wrap_generic(h) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        # grpc.aio ignores registered method handlers today; the generic handler serves the calls.
        wrapped = {name: self._interceptor.wrap_cached(h, f"/{service_name}/{name}") for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service_name, wrapped)
