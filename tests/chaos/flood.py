"""Overload one inference replica: `concurrency` closed-loop clients sending `rows`-row requests
straight to it (past the gateways) for `seconds`; prints {status: count} as JSON.

`python -m tests.chaos.flood --target 127.0.0.1:PORT --model NAME --seconds 8 --concurrency 48 --rows 128`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

import numpy as np
import tritonclient.grpc.aio as tca

from tests.chaos.load import status_of


async def flood(target: str, model: str, seconds: float, concurrency: int, rows: int) -> dict[str, int]:
    client = tca.InferenceServerClient(target)
    counts: Counter[str] = Counter()
    data = np.random.default_rng(7).standard_normal((rows, 4)).astype(np.float32)
    deadline = time.monotonic() + seconds

    async def sender() -> None:
        while time.monotonic() < deadline:
            tensor = tca.InferInput("input", [rows, 4], "FP32")
            tensor.set_data_from_numpy(data)
            try:
                await client.infer(model, [tensor], client_timeout=30)
            except Exception as exc:  # noqa: BLE001 - every refusal is counted by its status
                counts[status_of(exc)] += 1
                await asyncio.sleep(0.005)
                continue
            counts["OK"] += 1

    try:
        await asyncio.gather(*(sender() for _ in range(concurrency)))
    finally:
        await client.close()
    return dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--rows", type=int, default=128)
    args = parser.parse_args()
    if args.seconds <= 0 or args.concurrency < 1 or args.rows < 1:
        parser.error("--seconds, --concurrency and --rows must be positive")
    print(json.dumps(asyncio.run(flood(args.target, args.model, args.seconds, args.concurrency, args.rows))))


if __name__ == "__main__":
    main()
