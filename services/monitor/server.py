"""Composition root of the monitor: window store, control plane, core, servicer, evaluation loop."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiaas.monitor.v1 import monitor_pb2_grpc
from services.common.server import ServiceApp
from services.monitor.alerts import AlertHub
from services.monitor.control import ControlPlane, MemoryControlPlane
from services.monitor.core import MonitorCore
from services.monitor.prom import PrometheusExport
from services.monitor.servicer import MonitorServicer
from services.monitor.settings import MonitorSettings
from services.monitor.windows import MemoryWindowStore, RedisWindowStore, WindowStore

log = logging.getLogger("aiaas.monitor")

SERVICE_NAME = "aiaas.monitor.v1.Monitor"


def build_core(settings: MonitorSettings, *, prometheus: bool = True) -> MonitorCore:
    store: WindowStore
    if settings.redis_url:
        store = RedisWindowStore(settings.redis_url, settings.bucket_s, settings.retention_s)
    else:
        store = MemoryWindowStore(settings.bucket_s, settings.retention_s)
    control: ControlPlane
    if settings.registry_url:
        from services.monitor.registry_link import RegistryControlPlane

        control = RegistryControlPlane(settings.registry_url)
    else:
        control = MemoryControlPlane()
    alerts = AlertHub(settings.alert_history, settings.subscriber_queue)
    return MonitorCore(settings, store, control, alerts, PrometheusExport() if prometheus else None)


class MonitorService:
    """Everything the process runs, wired together."""

    def __init__(self, settings: MonitorSettings, *, configure_process: bool = True) -> None:
        self.settings = settings
        self.app = ServiceApp("monitor", settings, configure_process=configure_process)
        self.core = build_core(settings, prometheus=configure_process)
        self.app.add_service(SERVICE_NAME, monitor_pb2_grpc.add_MonitorServicer_to_server,
                             MonitorServicer(self.core))
        self._stop: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self.app.on_shutdown(self._close)

    async def start(self) -> int:
        try:
            await self.core.refresh_control()
        except Exception:  # the registry may come up later; the loop retries
            log.warning("registry not reachable at start-up; SLOs and baselines load when it is", exc_info=True)
        port = await self.app.start()
        self._stop = asyncio.Event()
        self._loop_task = asyncio.create_task(self.core.run(self._stop), name="monitor-evaluation")
        return port

    async def run(self) -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await self.start()
        await stopping.wait()
        await self.app.shutdown()

    async def _close(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._loop_task is not None:
            await self._loop_task
        await self.core.close()
