"""Composition root of the gateway: `create_service(settings)` wires caches, feed, quotas, replica pool
and servicers on a `ServiceApp`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
from typing import Any

import grpc

from aiaas.gateway.v1 import gateway_pb2 as gw
from aiaas.gateway.v1 import gateway_pb2_grpc as gw_grpc
from services.common.outages import url_address
from services.common.processes import ProcessKeeper, child_environment
from services.common.registry_client import RegistryClient
from services.common.reporting import TelemetryReporter
from services.common.server import Service, ServiceApp, ensure_port_free
from services.common.telemetry import add_process_metrics
from services.gateway import convert
from services.gateway.admin import GatewayAdmin
from services.gateway.balancer import Balancer
from services.gateway.dataplane import DataPlane
from services.gateway.entities import QuotaSpec, Route
from services.gateway.feed import RegistryFeed
from services.gateway.feedback import FeedbackDesk
from services.gateway.keys import KeyRing
from services.gateway.limits import RequestLimits, Signature
from services.gateway.openai_door import OpenAIDoor, OpenAIServer
from services.gateway.predictions import (
    MemoryPredictionStore,
    PredictionLog,
    PredictionStore,
    RedisPredictionStore,
)
from services.gateway.quotas import QuotaEnforcer
from services.gateway.records import RegistryRecords
from services.gateway.router import Catalog
from services.gateway.servicer import (
    INFERENCE_SERVICE,
    BodyGate,
    FeedbackServicer,
    GatewayAdminServicer,
    InferenceProxy,
    add_inference_proxy,
)
from services.gateway.settings import GatewaySettings
from services.gateway.signatures import SignatureCache
from services.gateway.upstream import InferenceUpstream

log = logging.getLogger("aiaas.gateway")

ADMIN_SERVICE = "aiaas.gateway.v1.GatewayAdmin"
# What `services.gateway.process` prints once it accepts on both ports.
PROCESS_READY_LINE = "gateway-process-ready"
FEEDBACK_SERVICE = "aiaas.gateway.v1.Feedback"


def encode_route(route: Route) -> bytes:
    return convert.route_to_pb(route).SerializeToString()


def decode_route(data: bytes) -> Route:
    return convert.route_from_pb(gw.Route.FromString(data))


def make_redis(settings: GatewaySettings) -> object | None:
    if not settings.redis_url:
        return None
    import redis.asyncio as aioredis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    timeout = settings.redis_timeout_ms / 1000.0
    return aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
    )


@dataclasses.dataclass(eq=False, repr=False)  # no repr: the settings hold secrets
class GatewayService(Service[DataPlane]):
    """The gateway's server and data plane, with what feeds them: the registry feed (keys, routes,
    versions), the replica pool, quotas and the telemetry reporter."""

    settings: GatewaySettings
    app: ServiceApp
    plane: DataPlane
    catalog: Catalog
    ring: KeyRing
    feed: RegistryFeed
    upstream: InferenceUpstream
    quotas: QuotaEnforcer
    reporter: TelemetryReporter
    registry_channel: grpc.aio.Channel
    redis: object | None
    # Stores the bootstrap admin token as a key once the snapshot is in.
    admin: GatewayAdmin | None = None
    # How long `prepare` waits for the registry's first snapshot; None: until it comes (or a signal).
    wait_for_registry_s: float | None = None
    # The OpenAI-compatible HTTP door (None: off); it opens with the gRPC port and drains beside it.
    openai: OpenAIServer | None = None
    # The gateway's other processes on the same ports (None: this is the only one, or one of them).
    siblings: ProcessKeeper | None = None
    _sibling_settings: GatewaySettings | None = dataclasses.field(default=None, init=False)

    def __post_init__(self) -> None:
        super().__init__(self.app, self.plane)

    def ready(self) -> bool:
        """Registry synced and at least one replica reachable; never "no replica had a bad answer
        lately": an overloaded or loading replica keeps the gateway ready (issue 12)."""
        return self.feed.synced.is_set() and self.upstream.reachable()

    async def prepare(self) -> None:
        """Start background work and wait for the registry's snapshot (keys, routes) before listening."""
        await self.upstream.start()
        await self.reporter.start()
        self.feed.start()
        if not self.settings.auth_enabled:
            log.warning("!" * 72)
            log.warning("AUTH IS OFF: every caller may infer, read and administer. Loopback use only.")
            log.warning("!" * 72)
        waited = 0.0
        while not self.feed.synced.is_set():
            try:
                await self.feed.wait_synced(5.0)
            except TimeoutError:
                waited += 5.0
                log.warning("still waiting for the registry at %s (%.0fs)", self.settings.registry_url, waited)
                if self.wait_for_registry_s is not None and waited >= self.wait_for_registry_s:
                    raise
        if self.admin is not None and self.settings.auth_enabled and self.settings.bootstrap_admin_key:
            await self.admin.ensure_bootstrap_key(self.settings.bootstrap_admin_key)

    async def start(self) -> int:
        """Prepare, bind both ports, start the other processes on them, then serve: once health
        answers, every process accepts (docs/gateway.md, "Processes")."""
        if self.siblings is not None and self.settings.port:
            ensure_port_free("gateway", self.settings.host, self.settings.port)
        if self.siblings is not None and self.openai is not None and self.settings.openai_port:
            ensure_port_free("gateway", self.settings.host, self.settings.openai_port)
        await self.prepare()
        if self.openai is not None:
            self.openai.bind()
        port = await self.app.start(before_start=self._start_siblings)
        if self.openai is not None:
            await self.openai.start()
        return port

    async def _start_siblings(self, port: int) -> None:
        if self.siblings is None:
            return
        openai_port = self.openai.port if self.openai is not None else self.settings.openai_port
        self._sibling_settings = dataclasses.replace(self.settings, port=port, openai_port=openai_port)
        ready = await self.siblings.start()
        log.info("gateway serves port %d from %d processes (%d of %d others ready)", port, 1 + ready, ready,
                 self.siblings.count)

    async def _spawn_sibling(self, index: int) -> asyncio.subprocess.Process:
        """Process `index` (1..processes-1): its settings, secrets included, go down its stdin, which
        stays open as its lifeline (it stops when this process is gone)."""
        assert self._sibling_settings is not None
        settings = dataclasses.replace(self._sibling_settings, bootstrap_admin_key=None)  # stored once, here
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.gateway.process", str(index), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=child_environment())
        assert process.stdin is not None
        process.stdin.write(settings_to_json(settings).encode() + b"\n")
        return process

    async def stop(self) -> None:
        """The other processes drain alongside this one."""
        if self.siblings is not None:
            self.siblings.begin_drain()
        if self.openai is not None:
            self.openai.begin_stop()  # drains beside the gRPC calls; `close` waits for it
        await super().stop()

    async def close(self) -> None:
        if self.siblings is not None:
            await self.siblings.close()
        if self.openai is not None:
            await self.openai.stop()
        await self.feed.close()
        await self.plane.shadows.drain()
        if self.plane.predictions is not None:
            await self.plane.predictions.close()
        await self.reporter.close()
        await self.upstream.close()
        await self.registry_channel.close()
        if self.redis is not None:
            await self.redis.aclose()  # type: ignore[attr-defined]


def create_service(settings: GatewaySettings, *, configure_process: bool = True,
                   process_index: int = 0) -> GatewayService:
    """Wire the gateway; call inside the running event loop. `process_index` 0 is the gateway as
    started, which starts `settings.process_count - 1` others (`services.gateway.process`), each
    created with its index."""
    processes = settings.process_count
    shared = processes > 1 or process_index > 0
    # No request is larger than max_request_bytes: grpc refuses one before reading it.
    app = ServiceApp("gateway", settings, configure_process=configure_process,
                     max_receive_bytes=settings.max_request_bytes, public=True, reuse_port=shared)
    identity = settings.client_identity()
    ring = KeyRing(settings.key_pepper.encode(), enabled=settings.auth_enabled)
    catalog = Catalog(settings.default_alias)
    registry_channel = identity.aio_channel(settings.registry_url)
    feed = RegistryFeed(registry_channel, catalog, ring, address=settings.registry_url)
    redis = make_redis(settings)
    quotas = QuotaEnforcer(
        redis=redis, failure_mode=settings.redis_failure_mode, timeout_s=settings.redis_timeout_ms / 1000.0,
        retry_after_s=settings.redis_retry_after_s, replicas=settings.gateway_replicas * processes,
        address=url_address(settings.redis_url, 6379) if settings.redis_url else "",
        default_key=QuotaSpec(settings.default_key_rps, settings.default_key_burst,
                              settings.default_key_tokens_per_minute),
        default_model=QuotaSpec(settings.default_model_rps, settings.default_model_burst,
                                settings.default_model_tokens_per_minute),
    )
    balancer = Balancer(eject_after=settings.eject_after_failures, eject_base_s=settings.eject_base_s,
                        eject_max_s=settings.eject_max_s, panic_threshold=settings.eject_panic_threshold)
    upstream = InferenceUpstream(
        settings.inference_targets, balancer, max_message_bytes=settings.max_message_bytes,
        max_attempts=settings.max_attempts, dns_refresh_s=settings.dns_refresh_s, identity=identity,
        health_check_interval_s=settings.health_check_interval_s, health_check_timeout_s=settings.health_check_timeout_s,
        try_timeouts=settings.try_timeouts(), connections=settings.upstream_connections,
    )
    reporter = TelemetryReporter(settings.monitor_url, source="gateway", identity=identity)
    registry = RegistryClient(registry_channel, timeout_s=5.0)

    async def fetch_signature(model: str, version: int) -> Signature | None:
        return convert.signature_from_pb(await registry.get_version(model, version))

    limits = RequestLimits(max_request_bytes=settings.max_request_bytes, max_inputs=settings.max_inputs,
                           max_rank=settings.max_rank, max_elements=settings.max_elements)
    prediction_store: PredictionStore = (RedisPredictionStore(redis) if redis is not None
                                         else MemoryPredictionStore(settings.feedback_max_entries))
    predictions = PredictionLog(prediction_store, settings.feedback_sample_rate, settings.feedback_window_s,
                                max_pending=settings.feedback_max_pending)
    service: GatewayService
    plane = DataPlane(
        catalog=catalog, ring=ring, quotas=quotas, upstream=upstream, limits=limits,
        signatures=SignatureCache(fetch_signature), reporter=reporter, default_timeout_s=settings.default_timeout_s,
        shadow_max_concurrency=settings.shadow_max_concurrency, shadow_tolerance=settings.shadow_tolerance,
        stream_window=settings.stream_window, drift_sample_rate=settings.drift_sample_rate,
        ready=lambda: service.ready(), predictions=predictions, generation_timeout_s=settings.generation_timeout_s,
        merge_max_in_flight=settings.merge_max_in_flight, replicas=lambda: len(balancer.healthy()),
    )
    admin = GatewayAdmin(RegistryRecords(registry_channel), ring, catalog, encode_route, decode_route)
    # Keys are checked before any request body is read (see servicer.BodyGate).
    app.add_service(INFERENCE_SERVICE, add_inference_proxy,
                    InferenceProxy(plane, body_timeout_s=settings.body_timeout_s))
    gate = BodyGate(ring, settings.body_timeout_s)
    app.add_service(ADMIN_SERVICE, gate.adding(gw_grpc.add_GatewayAdminServicer_to_server),
                    GatewayAdminServicer(admin, ring))
    app.add_service(FEEDBACK_SERVICE, gate.adding(gw_grpc.add_FeedbackServicer_to_server),
                    FeedbackServicer(FeedbackDesk(prediction_store, reporter, settings.feedback_window_s), ring))
    openai = None
    if settings.openai_enabled:
        openai = OpenAIServer(
            OpenAIDoor(plane, max_body_bytes=min(settings.openai_max_body_bytes, settings.max_request_bytes)), host=settings.host,
            port=settings.openai_port, max_connections=settings.openai_max_connections,
            keep_alive_s=settings.openai_keep_alive_s, grace_period_s=settings.grace_period_s,
            tls_cert=settings.tls_cert, tls_key=settings.tls_key, reuse_port=shared,
        )
    service = GatewayService(settings, app, plane, catalog=catalog, ring=ring, feed=feed, upstream=upstream,
                             quotas=quotas, reporter=reporter, registry_channel=registry_channel, redis=redis,
                             admin=admin, openai=openai)
    if process_index == 0 and processes > 1:
        siblings = ProcessKeeper("gateway process", processes - 1, lambda i: service._spawn_sibling(i + 1),
                                 ready_line=PROCESS_READY_LINE, grace_period_s=settings.grace_period_s)
        service.siblings = siblings
        if settings.metrics_port and configure_process:
            # One /metrics for the replica: this process serves the others' too, labelled `process`.
            add_process_metrics(lambda: [(str(i + 1), int(port)) for i, port in list(siblings.announced.items())
                                         if port.isdigit() and int(port)])
    return service


def settings_to_json(settings: GatewaySettings) -> str:
    return json.dumps(dataclasses.asdict(settings))


def settings_from_json(text: str) -> GatewaySettings:
    """The inverse of `settings_to_json` (tuples come back as JSON lists)."""
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}
    return GatewaySettings(**fields)
