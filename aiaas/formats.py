"""The artifact formats of aiaas: their names, their registry proto values, and what serves them.

Adding a format is a member here (name, proto value, whether inference serves it, its Triton
platform) plus its loader and gate check; every service, the SDK and the pipeline read this table.
"""

from __future__ import annotations

import enum
import functools
from typing import TYPE_CHECKING

from aiaas.errors import InvalidArgument

if TYPE_CHECKING:
    from aiaas.registry.v1.registry_pb2 import ArtifactFormat as PbFormat


class ArtifactFormat(enum.Enum):
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch_export"
    ONNX = "onnx"
    # Weights only: stored and converted by the pipeline, never served.
    SAFETENSORS = "safetensors"
    # A Hugging Face causal language model checkpoint: a directory of files (aiaas.manifest), loaded
    # by aiaas.lm for the generative engine, not by the tensor runtime.
    HF_CAUSAL_LM = "hf_causal_lm"

    @property
    def pb(self) -> PbFormat:
        """The `aiaas.registry.v1.ArtifactFormat` value."""
        return _pb_by_format()[self]

    @property
    def servable(self) -> bool:
        """Whether the inference service loads artifacts of this format."""
        return self in _PLATFORM_BY_FORMAT

    @property
    def multi_file(self) -> bool:
        """Whether a version of this format is a directory of files stored as a manifest."""
        return self in _MULTI_FILE

    @property
    def platform(self) -> str:
        """The platform name the v2 protocol reports for a model of this format."""
        return _PLATFORM_BY_FORMAT.get(self, self.value)

    @classmethod
    def from_pb(cls, value: int) -> ArtifactFormat:
        try:
            return {int(v): f for f, v in _pb_by_format().items()}[int(value)]
        except KeyError:
            if not value:
                raise InvalidArgument(f"format is required: {', '.join(FORMATS)}") from None
            raise InvalidArgument(f"unknown artifact format {value}; expected one of {', '.join(FORMATS)}") from None

    @classmethod
    def parse(cls, value: str | ArtifactFormat) -> ArtifactFormat:
        """A format from its name or a common alias (ts, jit, export, pt2, torch-export)."""
        if isinstance(value, ArtifactFormat):
            return value
        key = value.strip().lower()
        key = _ALIASES.get(key, key.replace("-", "_"))
        try:
            return cls(key)
        except ValueError:
            raise InvalidArgument(f"unknown format {value!r}; choose one of {', '.join(SERVABLE_FORMATS)}") from None




@functools.cache
def _pb_by_format() -> dict[ArtifactFormat, PbFormat]:
    """Each format's `aiaas.registry.v1.ArtifactFormat` value: ARTIFACT_FORMAT_<NAME>.

    Imported on first use, so the artifact gate (stdlib only, run in sandboxed workers) can read
    this module without loading protobuf.
    """
    from aiaas.registry.v1 import registry_pb2

    return {fmt: getattr(registry_pb2, "ARTIFACT_FORMAT_" + fmt.name) for fmt in ArtifactFormat}
_PLATFORM_BY_FORMAT = {
    ArtifactFormat.TORCHSCRIPT: "pytorch_libtorch",
    ArtifactFormat.TORCH_EXPORT: "pytorch_libtorch",
    ArtifactFormat.ONNX: "onnxruntime_onnx",
}
_MULTI_FILE = frozenset({ArtifactFormat.HF_CAUSAL_LM})
_ALIASES = {"ts": "torchscript", "jit": "torchscript", "export": "torch_export", "pt2": "torch_export"}

# Every format the registry stores (and the artifact gate checks), by name.
FORMATS: tuple[str, ...] = tuple(f.value for f in ArtifactFormat)
# The formats the inference service loads.
SERVABLE_FORMATS: tuple[str, ...] = tuple(f.value for f in ArtifactFormat if f.servable)
# A model the inference service delegates to a remote Triton server (not an artifact format).
TRITON = "triton"


def platform_of(format: str) -> str:
    """The v2 platform of a served format name ("triton" and unknown names stay themselves)."""
    try:
        return ArtifactFormat(format).platform
    except ValueError:
        return format
