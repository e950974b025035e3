"""`python -m services.inference [--flags]`: run the inference service until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from services.common.settings import load_settings
from services.inference.settings import InferenceSettings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(InferenceSettings, sys.argv[1:] if argv is None else argv, service="inference")
    asyncio.run(serve(settings))
    return 0


async def serve(settings: InferenceSettings) -> None:
    from services.inference.server import InferenceService

    # Built inside the running loop: grpc.aio servers and channels bind to the loop they start in.
    await InferenceService(settings).run()


if __name__ == "__main__":
    sys.exit(main())
