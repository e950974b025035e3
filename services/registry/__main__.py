"""`python -m services.registry [--port 50051] [--database-url URL] [--artifact-dir DIR] ...`"""

from __future__ import annotations

import asyncio
import sys

from services.common.errors import AiaasError
from services.common.settings import load_settings
from services.registry.server import create_app
from services.registry.settings import RegistrySettings


async def serve(settings: RegistrySettings) -> None:
    # grpc.aio binds its server to the running loop: build the app inside it.
    app = create_app(settings)
    await app.run()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(RegistrySettings, sys.argv[1:] if argv is None else argv, service="registry")
    except AiaasError as exc:
        print(f"registry: {exc.message}", file=sys.stderr)
        return 2
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
