"""Composition root of the registry: settings -> store, artifacts, core, feed hub -> ServiceApp."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy.engine import make_url

from aiaas.registry.v1 import registry_pb2_grpc
from services.common.server import ServiceApp
from services.registry.artifacts import ArtifactStore
from services.registry.core import RegistryCore
from services.registry.feed import FeedHub
from services.registry.servicer import RegistryServicer
from services.registry.settings import RegistrySettings
from services.registry.sql_store import SqlRegistryStore

SERVICE_NAME = "aiaas.registry.v1.ModelRegistry"


class RegistryApp(ServiceApp):
    """A ServiceApp that also owns the feed hub, so watch streams end before the drain starts."""

    hub: FeedHub
    store: SqlRegistryStore

    async def start(self) -> int:
        await self.hub.start()
        return await super().start()

    async def shutdown(self) -> None:
        # Watches never finish by themselves: end them first, or they would hold the drain
        # for the whole grace period. Watchers reconnect to another replica with their revision.
        await self.hub.close()
        await super().shutdown()


def _prepare_sqlite_dir(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def create_app(settings: RegistrySettings, *, configure_process: bool = True) -> RegistryApp:
    url = settings.resolved_database_url()
    _prepare_sqlite_dir(url)
    store = SqlRegistryStore(url, feed_retention=settings.feed_retention)
    artifacts = ArtifactStore(settings.resolved_artifact_dir())
    artifacts.clean_stale_uploads()
    core = RegistryCore(store, artifacts, max_artifact_bytes=settings.max_artifact_bytes)
    hub = FeedHub(store, poll_s=settings.feed_poll_s, heartbeat_s=settings.heartbeat_s)
    app = RegistryApp("registry", settings, configure_process=configure_process)
    app.hub = hub
    app.store = store
    app.add_service(SERVICE_NAME, registry_pb2_grpc.add_ModelRegistryServicer_to_server, RegistryServicer(core, hub))

    async def close_store() -> None:
        await asyncio.to_thread(store.close)

    app.on_shutdown(close_store)
    return app
