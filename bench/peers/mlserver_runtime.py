"""MLServer custom runtime for the side-by-side benchmark (`bench.side_by_side`); runs inside MLServer.

Loads the TorchScript file named by the model's `parameters.uri`, runs the batch MLServer's adaptive
batcher merged, answers output "y". Torch threads come from SBS_TORCH_THREADS (default 2).
"""

import os

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class TorchMLP(MLModel):
    async def load(self) -> bool:
        torch.set_num_threads(int(os.environ.get("SBS_TORCH_THREADS", "2")))
        self._net = torch.jit.load(self.settings.parameters.uri).eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = np.ascontiguousarray(NumpyCodec.decode_input(payload.inputs[0]), dtype=np.float32)
        with torch.inference_mode():
            y = self._net(torch.from_numpy(x)).numpy()
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(name="y", payload=y)])
