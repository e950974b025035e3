"""Composition root of the inference service: `create_service(settings)` wires repository, loaders,
alias follower, servicer, health and telemetry on a `ServiceApp`.

Start-up order: the versions named in `load_models`, the Triton-delegated models and the first
registry snapshot of followed aliases are loaded and warmed (bounded by `startup_timeout_s`)
before the port opens, so a replica that reports SERVING can serve. Health carries one entry
per model (`name`) and per version (`name/version`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc
from tritonclient.grpc import service_pb2_grpc

from services.common.errors import AiaasError, InvalidArgument, Unavailable
from services.common.reporting import RequestRecord as Report
from services.common.reporting import TelemetryReporter
from services.common.server import Service, ServiceApp, channel_options, ensure_port_free
from services.inference import generations
from services.inference.entities import RequestObserver, RequestRecord
from services.inference.follower import AliasFollower
from services.inference.frontends import FrontendPool
from services.inference.registry_source import RegistryLoader
from services.inference.repository import ModelRepository, VersionLoader, parse_version
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings
from services.inference.triton_backend import TritonLoader, load_backends

log = logging.getLogger("aiaas.inference")

SERVICE_NAME = "inference.GRPCInferenceService"


def parse_model_ref(ref: str) -> tuple[str, int, str]:
    """"model", "model:alias" or "model/version" -> (model, version, alias)."""
    if "/" in ref:
        model, _, version = ref.partition("/")
        return model, parse_version(version), ""
    model, _, alias = ref.partition(":")
    if not model:
        raise InvalidArgument(f"load_models: empty model name in {ref!r}")
    return model, 0, alias


@dataclasses.dataclass(eq=False, repr=False)  # no repr: the settings hold secrets
class InferenceService(Service[ModelRepository]):
    """The inference service's server and model repository, with what feeds the repository (the
    registry loader, Triton backends, the alias follower) and its telemetry reporter."""

    settings: InferenceSettings
    app: ServiceApp
    repository: ModelRepository
    servicer: InferenceServicer
    registry_channel: grpc.aio.Channel
    loader: RegistryLoader
    triton_loaders: dict[str, TritonLoader]
    follower: AliasFollower | None
    reporter: TelemetryReporter
    frontends: FrontendPool
    generations: generations.GenerationsServicer | None = None

    def __post_init__(self) -> None:
        super().__init__(self.app, self.repository)
        self.repository.add_listener(self._on_version_state)

    def _on_version_state(self, model: str, version: int, ready: bool) -> None:
        loop = asyncio.get_running_loop()
        loop.create_task(self.app.set_serving(f"{model}/{version}", ready))
        loop.create_task(self.app.set_serving(model, bool(self.repository.ready_versions(model))))
        if ready:
            self.reporter.report_load(model, version)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Load what must be served before the port opens (bounded by startup_timeout_s)."""
        await self.reporter.start()
        try:
            await asyncio.wait_for(self._initial_load(), self.settings.startup_timeout_s)
        except TimeoutError:
            log.warning("start-up loads not finished after %.0fs; serving what is ready, the rest follows",
                        self.settings.startup_timeout_s)
        self.servicer.ready = True

    async def _initial_load(self) -> None:
        refs = [parse_model_ref(ref) for ref in self.settings.load_models]
        refs += [(name, 0, "") for name in self.triton_loaders if name not in {r[0] for r in refs}]
        if self.follower is not None:
            self.follower.start()
        await asyncio.gather(*(self._load_at_start(m, v, a) for m, v, a in refs))
        if self.follower is not None:
            await self.follower.synced.wait()
            await self.repository.settle()

    async def _load_at_start(self, model: str, version: int, alias: str) -> None:
        """Retry while the registry (or a Triton server) is not up yet; give up on any other error."""
        delay = self.settings.reconnect_min_s
        while True:
            try:
                await self.repository.load(model, version, alias)
                return
            except Unavailable as exc:
                log.warning("start-up load of %s waits for its source: %s", model, exc.message)
            except AiaasError as exc:
                log.error("start-up load of %s %s failed: %s", model, version or alias or "", exc.message)
                return
            await asyncio.sleep(delay)
            delay = min(self.settings.reconnect_max_s, delay * 2)

    async def start(self) -> int:
        """Prepare, bind, start the frontends on the bound port, then serve: once health answers,
        every process accepts (docs/inference.md, "Frontends")."""
        if self.frontends.count > 1 and self.settings.port:
            ensure_port_free("inference", self.settings.host, self.settings.port)
        await self.prepare()
        return await self.app.start(before_start=self.frontends.start)

    async def stop(self) -> None:
        """The frontends drain alongside the core; the core closes its models once they are gone."""
        self.frontends.begin_drain()
        if self.generations is not None:
            self.generations.begin_drain()  # multiplexed streams take no new generations and end when idle
        await super().stop()

    async def close(self) -> None:
        await self.frontends.close()
        self.servicer.ready = False
        if self.follower is not None:
            await self.follower.close()
        await self.repository.close()
        for loader in self.triton_loaders.values():
            await loader.close()
        await self.reporter.close()
        await self.registry_channel.close()


def _reporting_to(reporter: TelemetryReporter) -> RequestObserver:
    """The one place a finished request meets telemetry (the monitor's reporter)."""

    def report(record: RequestRecord) -> None:
        reporter.record(Report(
            source="inference", model=record.model, version=record.version, alias="", status=record.status,
            latency_us=record.latency_ns // 1000, queue_us=record.queue_ns // 1000,
            compute_us=record.compute_ns // 1000, batch_size=record.batch_size, generation=record.generation))
        if record.inputs is not None:
            reporter.sample_inputs(record.model, record.version, record.inputs)  # type: ignore[arg-type]

    return report


def create_service(settings: InferenceSettings, *, configure_process: bool = True) -> InferenceService:
    """Wire the inference service; call inside the running event loop."""
    frontend_count = settings.frontend_count
    app = ServiceApp("inference", settings, configure_process=configure_process, reuse_port=frontend_count > 1)
    identity = settings.client_identity()
    registry_channel = identity.aio_channel(settings.registry_url, channel_options(settings.max_message_bytes))
    loader = RegistryLoader(settings, registry_channel)
    triton_loaders = {name: TritonLoader(cfg) for name, cfg in load_backends(settings.triton_backends).items()}
    # Always on: it keeps the per-model metrics; it ships records only with a monitor_url.
    reporter = TelemetryReporter(settings.monitor_url or None, source="inference", identity=identity)
    repository = ModelRepository(
        loader, default_alias=settings.default_alias, loaders=dict[str, VersionLoader](triton_loaders),
        drain_timeout_s=settings.drain_timeout_s, retry_min_s=settings.reconnect_min_s,
        retry_max_s=max(settings.reconnect_max_s, settings.reconnect_min_s), observer=_reporting_to(reporter))
    follower = None
    if settings.follow_aliases:
        follower = AliasFollower(
            registry_channel, repository, aliases=settings.follow_aliases, models=settings.follow_models,
            backoff_min_s=settings.reconnect_min_s, backoff_max_s=settings.reconnect_max_s, address=settings.registry_url)

    async def catalog() -> list[str]:
        """Every model this replica could serve: its Triton-delegated ones and the registry's."""
        return list(triton_loaders) + [m.name async for m in loader.registry.models()]

    servicer = InferenceServicer(repository, catalog=catalog, priority_levels=settings.priority_levels,
                                 default_priority_level=settings.default_priority_level)
    app.add_service(SERVICE_NAME, service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, servicer)
    multiplexed = generations.GenerationsServicer(servicer)
    app.add_service(generations.SERVICE_NAME, generations.add_to_server, multiplexed)
    return InferenceService(settings, app, repository, servicer=servicer, registry_channel=registry_channel,
                            loader=loader, triton_loaders=triton_loaders, follower=follower, reporter=reporter,
                            frontends=FrontendPool(app, settings, servicer, frontend_count), generations=multiplexed)
