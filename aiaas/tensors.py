"""The tensor description every part of aiaas shares (registry, inference, gateway, pipeline)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, KServe datatype (FP32, INT64, BYTES...) and shape.

    With batching the first dimension is the batch (-1); -1 marks any variable dimension.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
