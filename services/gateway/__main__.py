"""`python -m services.gateway [--flags]`: the public door on port 8001."""

from __future__ import annotations

import asyncio
import sys

from services.common.settings import load_settings
from services.gateway.server import build_gateway
from services.gateway.settings import GatewaySettings


async def _main(argv: list[str]) -> None:
    settings = load_settings(GatewaySettings, argv, service="gateway")
    await build_gateway(settings).run()


def main() -> None:
    asyncio.run(_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
