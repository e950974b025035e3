"""`python -m services.registry [--port 50051] [--database-url URL] [--artifact-dir DIR] ...`"""

from __future__ import annotations

import sys

from services.common.main import serve_main
from services.registry.settings import RegistrySettings


def main(argv: list[str] | None = None) -> int:
    return serve_main("registry", RegistrySettings, argv)


if __name__ == "__main__":
    sys.exit(main())
