"""TorchServe handler for the side-by-side benchmark (`bench.side_by_side`); runs inside TorchServe.

BaseHandler loads the TorchScript file from the .mar; each request's gRPC input "data" holds one
request's rows as raw little-endian FP32 bytes. The rows of a batch are stacked, run at once and cut
back into one raw answer per request. Torch threads come from SBS_TORCH_THREADS (default 2).
"""

import os

import torch
from ts.torch_handler.base_handler import BaseHandler


class MLPHandler(BaseHandler):
    def initialize(self, context):  # type: ignore[no-untyped-def]
        torch.set_num_threads(int(os.environ.get("SBS_TORCH_THREADS", "2")))
        super().initialize(context)
        self._features = None

    def preprocess(self, data):  # type: ignore[no-untyped-def]
        parts, self._rows = [], []
        for request in data:
            raw = request.get("data")
            if raw is None:
                raw = request.get("body")
            x = torch.frombuffer(bytearray(raw), dtype=torch.float32)
            parts.append(x)
            self._rows.append(x.numel())
        return torch.cat(parts)

    def inference(self, data, *args, **kwargs):  # type: ignore[no-untyped-def]
        features = self.model.state_dict()["0.weight"].shape[1] if self._features is None else self._features
        self._features = features
        with torch.inference_mode():
            return self.model(data.reshape(-1, features))

    def postprocess(self, out):  # type: ignore[no-untyped-def]
        answers, start = [], 0
        for count in self._rows:
            rows = count // self._features
            answers.append(out[start:start + rows].contiguous().numpy().tobytes())
            start += rows
        return answers
