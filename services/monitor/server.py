"""Composition root of the monitor: `create_service(settings)` wires window store, control plane, core,
servicer and the evaluation loop on a `ServiceApp`."""

from __future__ import annotations

import asyncio
import logging

from aiaas.monitor.v1 import monitor_pb2_grpc
from services.common.server import Service, ServiceApp
from services.monitor.alerts import AlertHub
from services.monitor.control import ControlPlane, MemoryControlPlane
from services.monitor.core import MonitorCore
from services.monitor.prom import PrometheusExport
from services.monitor.servicer import MonitorServicer
from services.monitor.settings import MonitorSettings
from services.monitor.windows import MemoryWindowStore, RedisWindowStore, WindowStore

log = logging.getLogger("aiaas.monitor")

SERVICE_NAME = "aiaas.monitor.v1.Monitor"


def _window_store(settings: MonitorSettings) -> WindowStore:
    if settings.redis_url:
        return RedisWindowStore(settings.redis_url, settings.bucket_s, settings.retention_s)
    return MemoryWindowStore(settings.bucket_s, settings.retention_s)


def _control_plane(settings: MonitorSettings) -> ControlPlane:
    if settings.registry_url:
        from services.monitor.registry_link import RegistryControlPlane

        return RegistryControlPlane(settings.registry_url, identity=settings.client_identity())
    return MemoryControlPlane()


class MonitorService(Service[MonitorCore]):
    """The monitor's server and core, and the evaluation loop that runs while it serves."""

    def __init__(self, app: ServiceApp, core: MonitorCore) -> None:
        super().__init__(app, core)
        self._stop: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def prepare(self) -> None:
        try:
            await self.core.refresh_control()
        except Exception:  # the registry may come up later; the loop retries
            log.warning("registry not reachable at start-up; SLOs and baselines load when it is", exc_info=True)

    async def start(self) -> int:
        port = await super().start()
        self._stop = asyncio.Event()
        self._loop_task = asyncio.create_task(self.core.run(self._stop), name="monitor-evaluation")
        return port

    async def close(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._loop_task is not None:
            await self._loop_task
        await self.core.close()


def create_service(settings: MonitorSettings, *, configure_process: bool = True) -> MonitorService:
    """Wire the monitor; call inside the running event loop. Prometheus export only in a configured process."""
    app = ServiceApp("monitor", settings, configure_process=configure_process)
    alerts = AlertHub(settings.alert_history, settings.subscriber_queue)
    core = MonitorCore(settings, _window_store(settings), _control_plane(settings), alerts,
                       PrometheusExport() if configure_process else None)
    app.add_service(SERVICE_NAME, monitor_pb2_grpc.add_MonitorServicer_to_server, MonitorServicer(core))
    return MonitorService(app, core)
