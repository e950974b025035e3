"""bench.bench_grpc_floor: its echo servers answer ModelInfer like a server of the tiny model would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.support.servers import free_port


@pytest.mark.parametrize("kind", ["aio", "sync"])
def test_the_echo_answers_the_tiny_models_shape_and_refuses_garbage(kind: str) -> None:
    port = free_port()
    echo = subprocess.Popen([sys.executable, "-m", "bench.bench_grpc_floor", "--serve", str(port), kind],
                            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    try:
        assert echo.stdout is not None
        assert echo.stdout.readline().strip() == b"ready"
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        x = triton.InferInput("x", [1, 10], "FP32")
        x.set_data_from_numpy(np.ones((1, 10), np.float32))
        result = client.infer("tiny", [x])
        assert result.as_numpy("y").shape == (1, 10)
        # The request is parsed, as aiaas parses it: bytes that are not a ModelInferRequest fail.
        import grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError) as failed:
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff", timeout=10)
        assert failed.value.code() != grpc.StatusCode.OK
        channel.close()
        client.close()
    finally:
        echo.kill()
        echo.wait()
