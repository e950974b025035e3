"""The one artifact runtime: load a model artifact and call it on numpy tensors, without ever unpickling.

Serving (`services.inference`, in a worker process or in process) and the pipeline's parity gate
(`aiaas.pipeline.artifacts.load_runner`) both load through `load_model`, so the gate measures
exactly what serves: the same loader, the same signature-driven dtype and output rules.

Every format loads through `aiaas.artifact_gate`, which refuses what can run code before any
deserializer sees it: TorchScript is scanned (archive code, then every inlined graph) around
`torch.jit.load`; a `torch.export` archive is rebuilt from its checked JSON and raw tensors
(never `torch.export.load`, which unpickles); ONNX is checked (no external data, no custom op
domains) and its checked bytes, not its path, go to `onnxruntime.InferenceSession`. The artifact
is a path or its bytes. Inputs are passed positionally in signature order (ONNX: by name);
outputs may be one tensor, a tuple/list in signature order, or a dict by name, and come back as
the signature's datatypes (numpy has no bfloat16: BF16 travels as its uint16 bit patterns).

Needs numpy, and torch or onnxruntime for the format it loads (imported when a model loads), so
it belongs to the full distribution, not the client one.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from aiaas import artifact_gate
from aiaas.errors import AiaasError, FailedPrecondition, Internal, InvalidArgument
from aiaas.formats import SERVABLE_FORMATS, ArtifactFormat

# The formats that load here (aiaas.formats is where a format is declared).
FORMATS = SERVABLE_FORMATS
# Checkpoint directories load through aiaas.lm instead.
_MULTI_FILE_FORMATS = frozenset(f.value for f in ArtifactFormat if f.multi_file)

# KServe v2 datatype -> the numpy dtype a tensor of it has in memory.
KSERVE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.uint16),  # bit patterns; see module docstring
    "BYTES": np.dtype(object),
}

Artifact = str | os.PathLike[str] | bytes


class TensorSpecLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclasses.dataclass(frozen=True)
class TensorSig:
    """A picklable copy of a signature entry (full shape: with batching, dim 0 is the batch, -1)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def signature_of(specs: Sequence[TensorSpecLike]) -> tuple[TensorSig, ...]:
    sigs = tuple(TensorSig(s.name, s.datatype, tuple(int(d) for d in s.shape)) for s in specs)
    for sig in sigs:
        if sig.datatype not in KSERVE_TO_NUMPY:
            raise InvalidArgument(f"tensor '{sig.name}' has unknown datatype '{sig.datatype}'")
    return sigs


def parse_device(device: str) -> str:
    """'' or 'cpu' -> 'cpu'; 'cuda' / 'cuda:N' checked against what torch can see."""
    device = (device or "cpu").strip().lower()
    if device == "cpu":
        return device
    if device == "cuda":
        device = "cuda:0"
    head, _, index = device.partition(":")
    if head != "cuda" or not index.isdigit():
        raise InvalidArgument(f"unknown device '{device}'; expected 'cpu' or 'cuda:N'")
    import torch

    if not torch.cuda.is_available():
        raise FailedPrecondition(f"device {device} requested but CUDA is not available on this node")
    if int(index) >= torch.cuda.device_count():
        raise FailedPrecondition(
            f"device {device} requested but this node has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


class LoadedModel(Protocol):
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]

    def run(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int, int, int]:
        """Outputs by name (declared dtypes), and compute input / infer / output nanoseconds."""
        ...


def load_model(
    artifact: Artifact,
    format: str,
    inputs: Sequence[TensorSpecLike],
    outputs: Sequence[TensorSpecLike],
    *,
    device: str = "cpu",
    threads: int | None = None,
) -> LoadedModel:
    in_sigs, out_sigs = signature_of(inputs), signature_of(outputs)
    if format in _MULTI_FILE_FORMATS:
        raise InvalidArgument(f"{format} checkpoints are generative models, not tensor models: load them with "
                              "aiaas.lm.load_causal_lm")
    if format not in FORMATS:
        raise InvalidArgument(f"unknown model format '{format}'; expected one of {', '.join(FORMATS)}")
    if not isinstance(artifact, (bytes, bytearray)) and not os.path.isfile(artifact):
        raise FailedPrecondition(f"model artifact {os.fspath(artifact)} does not exist")
    device = parse_device(device)
    if format == "onnx":
        return OnnxModel(artifact, in_sigs, out_sigs, device, threads)
    return TorchModel(artifact, format, in_sigs, out_sigs, device, threads)


_TORCH_DTYPES: dict[str, Any] = {}


def torch_dtype(datatype: str) -> Any:
    import torch

    if not _TORCH_DTYPES:
        _TORCH_DTYPES.update(
            BOOL=torch.bool, UINT8=torch.uint8, UINT16=torch.uint16, UINT32=torch.uint32,
            UINT64=torch.uint64, INT8=torch.int8, INT16=torch.int16, INT32=torch.int32,
            INT64=torch.int64, FP16=torch.float16, FP32=torch.float32, FP64=torch.float64,
            BF16=torch.bfloat16,
        )  # fmt: skip
    return _TORCH_DTYPES[datatype]


class TorchModel:
    """A TorchScript module or a `torch.export` program, called under inference_mode."""

    def __init__(self, artifact: Artifact, format: str, inputs: tuple[TensorSig, ...],
                 outputs: tuple[TensorSig, ...], device: str, threads: int | None) -> None:
        import torch

        _refuse_datatype(inputs + outputs, "BYTES", "which torch cannot hold; serve string models as ONNX")
        # Arrays decoded from request bytes are read-only views; the model never writes to inputs.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if threads:
            torch.set_num_threads(threads)
        self.inputs, self.outputs = inputs, outputs
        self._torch = torch
        self._device = torch.device(device)
        self._on_cpu = device == "cpu"
        try:
            if format == "torchscript":
                module = artifact_gate.load_torchscript(artifact, map_location=self._device)
            else:
                module = artifact_gate.load_torch_export(artifact).module()
                if not self._on_cpu:
                    module = module.to(self._device)
        except AiaasError:
            raise
        except artifact_gate.UnsafeArtifact as exc:
            raise InvalidArgument(f"cannot load {format} artifact: refused: {exc}") from None
        except Exception as exc:
            raise InvalidArgument(f"cannot load {format} artifact: {_first_line(exc)}") from exc
        self._module = module
        self._bf16_in = tuple(s.datatype == "BF16" for s in inputs)
        self._numpy_out = tuple(KSERVE_TO_NUMPY[s.datatype] for s in outputs)

    def run(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int, int, int]:
        torch = self._torch
        t0 = time.perf_counter_ns()
        tensors = []
        for sig, bf16 in zip(self.inputs, self._bf16_in, strict=True):
            tensor = torch.from_numpy(inputs[sig.name])
            if bf16:
                tensor = tensor.view(torch.bfloat16)
            if not self._on_cpu:
                tensor = tensor.to(self._device, non_blocking=True)
            tensors.append(tensor)
        t1 = time.perf_counter_ns()
        try:
            with torch.inference_mode():
                result = self._module(*tensors)
            if not self._on_cpu:
                torch.cuda.synchronize(self._device)
        except Exception as exc:
            raise Internal(f"model execution failed: {_first_line(exc)}") from exc
        t2 = time.perf_counter_ns()
        outputs = {
            sig.name: _to_numpy(tensor, dtype, sig)
            for sig, dtype, tensor in zip(self.outputs, self._numpy_out, self._match(result), strict=True)
        }
        return outputs, t1 - t0, t2 - t1, time.perf_counter_ns() - t2

    def _match(self, result: Any) -> list[Any]:
        names = [s.name for s in self.outputs]
        if isinstance(result, Mapping):
            missing = [n for n in names if n not in result]
            if missing:
                raise Internal(f"model returned outputs {sorted(result)}, missing {missing}")
            return [result[n] for n in names]
        values = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(values) < len(names):
            raise Internal(f"model returned {len(values)} output(s) but the signature declares {len(names)}")
        return values[: len(names)]


def _to_numpy(tensor: Any, dtype: np.dtype, sig: TensorSig) -> np.ndarray:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise Internal(f"model output '{sig.name}' is {type(tensor).__name__}, not a tensor")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if sig.datatype == "BF16":
        if tensor.dtype != torch.bfloat16:
            tensor = tensor.to(torch.bfloat16)
        return tensor.view(torch.int16).numpy().view(np.uint16)
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    array = tensor.numpy()
    return array if array.dtype == dtype else array.astype(dtype)


class OnnxModel:
    """An onnxruntime session fed by name."""

    def __init__(self, artifact: Artifact, inputs: tuple[TensorSig, ...], outputs: tuple[TensorSig, ...],
                 device: str, threads: int | None) -> None:
        import onnxruntime as ort

        _refuse_datatype(inputs + outputs, "BF16", "which onnxruntime cannot exchange with numpy; "
                         "serve BF16 models as TorchScript or torch.export")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: load-time advice (unused initializers...) is noise here
        options.intra_op_num_threads = threads or 1
        options.inter_op_num_threads = 1
        providers: list[Any] = ["CPUExecutionProvider"]
        if device != "cpu":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.split(":")[1])}))
        try:
            model_bytes = artifact_gate.onnx_model_bytes(artifact)
        except artifact_gate.UnsafeArtifact as exc:
            raise InvalidArgument(f"cannot load onnx artifact: refused: {exc}") from None
        try:
            self._session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
        except Exception as exc:
            raise InvalidArgument(f"cannot load onnx artifact: {_first_line(exc)}") from exc
        if device != "cpu" and "CUDAExecutionProvider" not in self._session.get_providers():
            raise FailedPrecondition(f"device {device} requested but onnxruntime has no CUDA provider here")
        model_inputs = {i.name for i in self._session.get_inputs()}
        model_outputs = {o.name for o in self._session.get_outputs()}
        unknown = [s.name for s in inputs if s.name not in model_inputs]
        unknown += [s.name for s in outputs if s.name not in model_outputs]
        if unknown:
            raise InvalidArgument(
                f"signature names {unknown} are not in the ONNX graph "
                f"(inputs {sorted(model_inputs)}, outputs {sorted(model_outputs)})"
            )
        self.inputs, self.outputs = inputs, outputs
        self._output_names = [s.name for s in outputs]
        self._numpy_out = tuple(KSERVE_TO_NUMPY[s.datatype] for s in outputs)

    def run(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int, int, int]:
        t0 = time.perf_counter_ns()
        feeds = {}
        for sig in self.inputs:
            array = inputs[sig.name]
            feeds[sig.name] = _strings_in(array, sig) if sig.datatype == "BYTES" else array
        t1 = time.perf_counter_ns()
        try:
            results = self._session.run(self._output_names, feeds)
        except Exception as exc:
            raise Internal(f"model execution failed: {_first_line(exc)}") from exc
        t2 = time.perf_counter_ns()
        outputs = {}
        for sig, dtype, array in zip(self.outputs, self._numpy_out, results, strict=True):
            if sig.datatype == "BYTES":
                outputs[sig.name] = _strings_out(array)
            else:
                outputs[sig.name] = array if array.dtype == dtype else array.astype(dtype)
        return outputs, t1 - t0, t2 - t1, time.perf_counter_ns() - t2


def bf16_bits(array: np.ndarray) -> np.ndarray:
    """Float values as the uint16 bit patterns of their bfloat16 rounding: how BF16 travels through numpy."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16)
    return tensor.view(torch.int16).numpy().view(np.uint16)


def bf16_floats(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) as float32 values."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float().numpy()


def _strings_in(array: np.ndarray, sig: TensorSig) -> np.ndarray:
    """onnxruntime string tensors hold str: decode each element as UTF-8."""
    try:
        decoded = [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in array.flat]
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"input '{sig.name}': ONNX string tensors must be valid UTF-8 ({exc})") from exc
    return np.array(decoded, dtype=object).reshape(array.shape)


def _strings_out(array: np.ndarray) -> np.ndarray:
    encoded = [item.encode("utf-8") if isinstance(item, str) else bytes(item) for item in array.flat]
    result = np.empty(len(encoded), dtype=object)
    result[:] = encoded
    return result.reshape(array.shape)


def _refuse_datatype(sigs: tuple[TensorSig, ...], datatype: str, why: str) -> None:
    """InvalidArgument naming the first tensor of `datatype`: a runtime that cannot hold it says `why`."""
    for sig in sigs:
        if sig.datatype == datatype:
            raise InvalidArgument(f"tensor '{sig.name}' is {datatype}, {why}")


def _first_line(exc: BaseException) -> str:
    """The head of an error, plus its last line when torch buries the cause under a traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return text[:500]
