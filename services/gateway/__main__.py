"""`python -m services.gateway [--flags]`: the public door on port 8001."""

from __future__ import annotations

import sys

from services.common.main import serve_main
from services.gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> int:
    return serve_main("gateway", GatewaySettings, argv)


if __name__ == "__main__":
    sys.exit(main())
