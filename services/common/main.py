"""`python -m services.<name>`: read the settings, then build the service with `create_service` and run it.

The server module is imported only once the settings are read, so `--help` and a bad flag answer
without loading grpc servers, model runtimes or clients.
"""

from __future__ import annotations

import importlib
import os
import sys

from services.common import eventloop
from services.common.errors import AiaasError
from services.common.settings import ServerSettings, load_settings


def serve_main(service: str, settings_cls: type[ServerSettings], argv: list[str] | None = None) -> int:
    """Run `services.<service>.server.create_service(settings)` until SIGTERM/SIGINT; 2 on bad settings."""
    try:
        settings = load_settings(settings_cls, sys.argv[1:] if argv is None else argv, service=service)
    except AiaasError as exc:
        print(f"{service}: {exc.message}", file=sys.stderr)
        return 2
    create_service = importlib.import_module(f"services.{service}.server").create_service

    async def serve() -> None:
        # grpc.aio servers and channels bind to the loop they are made in: build the service inside it.
        await create_service(settings).run()

    # Child processes (gateway processes, inference frontends) take the same loop from the environment.
    os.environ[eventloop.ENV] = settings.event_loop
    eventloop.run(serve(), settings.event_loop)
    return 0
