"""`python -m services.inference [--flags]`: run the inference service until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from services.common.settings import load_settings
from services.inference.settings import InferenceSettings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(InferenceSettings, sys.argv[1:] if argv is None else argv, service="inference")
    from services.inference.server import InferenceService

    asyncio.run(InferenceService(settings).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
