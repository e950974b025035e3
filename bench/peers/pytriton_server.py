"""Triton Inference Server (bundled in nvidia-pytriton) serving TorchScript MLPs; run in its own venv.

    python pytriton_server.py --grpc-port P --http-port P --metrics-port P --threads 2 NAME=FILE.pt:IN:OUT ...

Each model: input "x" FP32 [-1, IN], output "y" FP32 [-1, OUT], dynamic batching up to 32 rows with a
2 ms queue delay, one instance, torch with --threads intra-op threads. Serves until SIGTERM.
Started by `bench.side_by_side`; the TorchScript files are the ones every server in the run loads.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    parser.add_argument("models", nargs="+", help="NAME=FILE.pt:IN:OUT")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
                          grpc_address="127.0.0.1", http_address="127.0.0.1")
    with Triton(config=config) as triton:
        for spec in args.models:
            name, _, rest = spec.partition("=")
            path, features, outputs = rest.rsplit(":", 2)
            net = torch.jit.load(path).eval()

            def make(net: torch.jit.ScriptModule):  # type: ignore[no-untyped-def]
                @batch
                def infer(x: np.ndarray) -> dict[str, np.ndarray]:
                    with torch.inference_mode():
                        return {"y": net(torch.from_numpy(x)).numpy()}
                return infer

            triton.bind(model_name=name, infer_func=make(net),
                        inputs=[Tensor(name="x", dtype=np.float32, shape=(int(features),))],
                        outputs=[Tensor(name="y", dtype=np.float32, shape=(int(outputs),))],
                        config=ModelConfig(max_batch_size=args.max_batch, batcher=DynamicBatcher(
                            max_queue_delay_microseconds=args.queue_delay_us)))
        triton.serve()


if __name__ == "__main__":
    main()
