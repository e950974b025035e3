"""`python -m services.monitor [--flags]`: run the monitor until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from services.common.settings import load_settings
from services.monitor.settings import MonitorSettings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(MonitorSettings, sys.argv[1:] if argv is None else argv, service="monitor")
    from services.monitor.server import MonitorService

    async def serve() -> None:
        # grpc.aio objects bind to the loop they are made in: make them inside it.
        await MonitorService(settings).run()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
