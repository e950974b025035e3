"""Composition root of the registry: `create_service(settings)` wires store, artifacts, core, feed hub
and artifact sweeper on a `ServiceApp`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import make_url

from aiaas.registry.v1 import registry_pb2_grpc
from services.common.server import Service, ServiceApp
from services.registry.artifacts import ArtifactStore
from services.registry.core import MAX_REQUEST_BYTES, RegistryCore
from services.registry.feed import FeedHub
from services.registry.quality_servicer import QualityServicer
from services.registry.servicer import UploadLimits
from services.registry.settings import RegistrySettings
from services.registry.sql_store import SqlRegistryStore

SERVICE_NAME = "aiaas.registry.v1.ModelRegistry"

log = logging.getLogger("aiaas.registry.server")


class ArtifactSweeper:
    """Every `interval_s`, removes temporary files of dead uploads (a crashed replica's, or a stream lost
    without its handler seeing it; this process's live uploads are spared, other replicas' by age) and
    blobs a deletion left unreferenced without removing (a crash or a lost database connection between)."""

    def __init__(self, core: RegistryCore, *, interval_s: float, stale_after_s: float) -> None:
        self.core = core
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="artifact-sweeper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.sweep)
            except Exception:  # the sweeper outlives one bad pass (a vanished mount, a database restart)
                log.exception("sweeping %s failed; trying again in %gs", self.core.artifacts.root, self.interval_s)

    def sweep(self) -> None:
        self.core.artifacts.sweep_dead_uploads(self.stale_after_s)
        if removed := self.core.collect_unreferenced_blobs():
            log.info("removed %d unreferenced blob(s) from %s", removed, self.core.artifacts.blob_dir)


class RegistryService(Service[RegistryCore]):
    """The registry's server, core, store, feed hub and artifact sweeper."""

    def __init__(self, app: ServiceApp, core: RegistryCore, *, store: SqlRegistryStore, hub: FeedHub,
                 sweeper: ArtifactSweeper) -> None:
        super().__init__(app, core)
        self.store = store
        self.hub = hub
        self.sweeper = sweeper

    async def prepare(self) -> None:
        await self.hub.start()
        self.sweeper.start()

    async def stop(self) -> None:
        # Watches never finish by themselves: end them first, or they would hold the drain
        # for the whole grace period. Watchers reconnect to another replica with their revision.
        await self.hub.close()
        await super().stop()

    async def close(self) -> None:
        await self.hub.close()
        await self.sweeper.close()
        await asyncio.to_thread(self.store.close)


def _prepare_sqlite_dir(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def _feed_kinds(app: ServiceApp) -> Callable[[], frozenset[str] | None]:
    guard = app.guard
    if guard is None:
        return lambda: None
    return lambda: guard.allowed_values("WatchModels", "kind")


def create_service(settings: RegistrySettings, *, configure_process: bool = True) -> RegistryService:
    """Wire the registry; call inside the running event loop."""
    url = settings.resolved_database_url()
    _prepare_sqlite_dir(url)
    store = SqlRegistryStore(url, feed_retention=settings.feed_retention)
    artifacts = ArtifactStore(settings.resolved_artifact_dir())
    # Same rule as the sweeper: other replicas may be uploading into this directory right now.
    artifacts.clean_stale_uploads(settings.upload_stale_after_s)
    core = RegistryCore(store, artifacts, max_artifact_bytes=settings.max_artifact_bytes,
                        max_concurrent_uploads=settings.max_concurrent_uploads,
                        allowed_formats=settings.format_set(), max_dataset_bytes=settings.max_dataset_bytes,
                        gated_aliases=settings.gated_alias_set())
    hub = FeedHub(store, poll_s=settings.feed_poll_s, heartbeat_s=settings.heartbeat_s)
    # Every request fits in a chunk or a header plus framing; responses (listings, downloads) may be larger.
    app = ServiceApp("registry", settings, configure_process=configure_process, max_receive_bytes=MAX_REQUEST_BYTES)
    limits = UploadLimits(idle_timeout_s=settings.upload_idle_timeout_s,
                          max_duration_s=settings.upload_max_duration_s)
    app.add_service(SERVICE_NAME, registry_pb2_grpc.add_ModelRegistryServicer_to_server,
                    QualityServicer(core, hub, limits, feed_kinds=_feed_kinds(app)))
    sweeper = ArtifactSweeper(core, interval_s=settings.upload_sweep_interval_s,
                              stale_after_s=settings.upload_stale_after_s)
    return RegistryService(app, core, store=store, hub=hub, sweeper=sweeper)
