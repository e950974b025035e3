"""`python -m services.monitor [--flags]`: run the monitor until SIGTERM."""

from __future__ import annotations

import sys

from services.common.main import serve_main
from services.monitor.settings import MonitorSettings


def main(argv: list[str] | None = None) -> int:
    return serve_main("monitor", MonitorSettings, argv)


if __name__ == "__main__":
    sys.exit(main())
