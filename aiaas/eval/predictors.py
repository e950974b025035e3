"""The two ways examples reach a model version: through the inference service that serves it (KServe v2
over tritonclient, several batches in flight), or in process through `aiaas.runtime.load_model`,
the loader every inference worker uses. Both take and return numpy arrays by tensor name."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from aiaas import runtime
from aiaas.errors import FailedPrecondition, NotFound, Unavailable, error_from_rpc
from aiaas.eval.schema import TensorSpecLike
from aiaas.identity import ClientIdentity

SERVING = "serving"
IN_PROCESS = "in-process"
MAX_MESSAGE_BYTES = 2**31 - 1


class Predictor(Protocol):
    path: str
    # How many batches may be in flight at once (the serving path overlaps them).
    concurrency: int

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class InProcessPredictor:
    """A version loaded here by the serving loader (artifact gate, signature-typed outputs)."""

    path = IN_PROCESS
    concurrency = 1

    def __init__(self, artifact: str | os.PathLike[str] | bytes, fmt: str, inputs: Sequence[TensorSpecLike],
                 outputs: Sequence[TensorSpecLike], *, device: str = "cpu", threads: int | None = None) -> None:
        if not isinstance(artifact, bytes):
            artifact = str(Path(artifact))
        # Registry TensorSpec messages: their repeated shape reads as runtime's tuple.
        self.model = runtime.load_model(artifact, fmt, list(inputs), list(outputs),  # type: ignore[arg-type]
                                        device=device, threads=threads)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {s.name: runtime.bf16_bits(inputs[s.name]) if s.datatype == "BF16" and inputs[s.name].dtype != np.uint16
                 else inputs[s.name] for s in self.model.inputs}
        outputs, _, _, _ = self.model.run(feeds)
        return {s.name: runtime.bf16_floats(outputs[s.name]) if s.datatype == "BF16" else outputs[s.name]
                for s in self.model.outputs}

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


class ServingPredictor:
    """The version as the inference service at `url` serves it (`model_version` pinned)."""

    path = SERVING

    def __init__(self, url: str, model: str, version: int, inputs: Sequence[TensorSpecLike],
                 outputs: Sequence[TensorSpecLike], *, identity: ClientIdentity | None = None,
                 concurrency: int = 4, timeout_s: float = 120.0) -> None:
        import tritonclient.grpc as tc

        identity = identity or ClientIdentity.from_env()
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), *identity.options()]
        self._tc = tc
        self.client = tc.InferenceServerClient(url, creds=identity.credentials(), channel_args=options)
        self.headers = dict(identity.metadata()) or None
        self.url, self.model, self.version = url, model, version
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.concurrency = max(1, concurrency)
        self.timeout_s = timeout_s

    def ready(self) -> bool:
        """Whether the service has this version loaded and ready."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self.client.is_model_ready(self.model, str(self.version), headers=self.headers))
        except InferenceServerException as exc:
            error = error_from_rpc(exc, f"asking {self.url} whether {self.model} version {self.version} is ready")
            if isinstance(error, (NotFound, Unavailable)):  # a version it does not know, or one still loading
                return False
            raise error from None

    def require_ready(self) -> None:
        if not self.ready():
            raise FailedPrecondition(
                f"{self.model} version {self.version} is not loaded by the inference service at {self.url}: load it "
                f"(aiaas inference load {self.model} --version {self.version}) or evaluate in process (--path "
                "in-process)")

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException

        tc = self._tc
        request: list[Any] = []
        for spec in self.inputs:
            array = inputs[spec.name]
            tensor = tc.InferInput(spec.name, list(array.shape), spec.datatype)
            tensor.set_data_from_numpy(array)
            request.append(tensor)
        wanted = [tc.InferRequestedOutput(s.name) for s in self.outputs]
        try:
            result = self.client.infer(self.model, request, model_version=str(self.version), outputs=wanted,
                                       headers=self.headers, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise error_from_rpc(exc, f"{self.model} version {self.version} at {self.url}") from None
        return {s.name: result.as_numpy(s.name) for s in self.outputs}

    def close(self) -> None:
        self.client.close()
