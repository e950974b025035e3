"""`python -m services.inference [--flags]`: run the inference service until SIGTERM."""

from __future__ import annotations

import sys

from services.common.main import serve_main
from services.inference.settings import InferenceSettings


def main(argv: list[str] | None = None) -> int:
    return serve_main("inference", InferenceSettings, argv)


if __name__ == "__main__":
    sys.exit(main())
