"""Shared-memory slabs that carry tensors between the service and its worker processes.

A slab is one `multiprocessing.shared_memory` segment. Tensors are packed into it at 64-byte
aligned offsets; only a small tuple of metadata per tensor (name, dtype, shape, offset, size)
crosses the pipe. BYTES tensors travel as their length-prefixed serialization.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from multiprocessing import shared_memory

import numpy as np

from services.inference.datatypes import deserialize_bytes_tensor, serialize_bytes_tensor

ALIGN = 64
OBJECT = "|O"  # dtype.str of BYTES tensors (numpy object arrays)

# (name, numpy dtype str, shape, offset, nbytes)
TensorMeta = tuple[str, str, tuple[int, ...], int, int]


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Slab:
    """One shared-memory segment; `owner` unlinks it on close."""

    def __init__(self, segment: shared_memory.SharedMemory, owner: bool) -> None:
        self._segment = segment
        self.owner = owner
        self.name = segment.name
        self.size = segment.size
        buf = segment.buf
        if buf is None:
            raise OSError(f"shared memory {segment.name} has no mapping")
        self.buf: memoryview = buf

    @classmethod
    def create(cls, size: int, prefix: str = "aiaas") -> Slab:
        name = f"{prefix}_{secrets.token_hex(8)}"
        return cls(shared_memory.SharedMemory(name=name, create=True, size=max(ALIGN, size)), owner=True)

    @classmethod
    def attach(cls, name: str, *, owner: bool = False) -> Slab:
        return cls(shared_memory.SharedMemory(name=name), owner=owner)

    def close(self) -> None:
        """Unmap (and unlink when owned). Views into `buf` must be gone first."""
        self.buf = memoryview(b"")  # drop our view of the mapping
        try:
            self._segment.close()
        except BufferError:
            pass  # a view still exists; the mapping goes when it is collected
        if self.owner:
            self.owner = False
            try:
                self._segment.unlink()
            except FileNotFoundError:
                pass


def _payloads(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray | bytes]]:
    return [
        (name, serialize_bytes_tensor(array) if array.dtype.hasobject else array)
        for name, array in arrays.items()
    ]


class Packed:
    """Arrays ready to be written: fixed-size ones as they are, BYTES ones serialized."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.items = _payloads(arrays)
        self.shapes = {name: array.shape for name, array in arrays.items()}
        self.nbytes = sum(_aligned(len(p) if isinstance(p, bytes) else p.nbytes) for _, p in self.items)

    def write(self, buf: memoryview) -> list[TensorMeta]:
        metas: list[TensorMeta] = []
        offset = 0
        for name, payload in self.items:
            if isinstance(payload, bytes):
                size = len(payload)
                buf[offset : offset + size] = payload
                metas.append((name, OBJECT, self.shapes[name], offset, size))
            else:
                size = payload.nbytes
                if size:
                    flat = np.ascontiguousarray(payload).reshape(-1).view(np.uint8)
                    buf[offset : offset + size] = flat.data
                metas.append((name, payload.dtype.str, payload.shape, offset, size))
            offset += _aligned(size)
        return metas


def views(buf: memoryview, metas: Sequence[TensorMeta]) -> dict[str, np.ndarray]:
    """Arrays over the slab (zero copy; BYTES tensors are decoded into object arrays)."""
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, shape, offset, size in metas:
        if dtype == OBJECT:
            flat = deserialize_bytes_tensor(buf[offset : offset + size], math.prod(shape))
            arrays[name] = flat.reshape(shape)
        elif not size:
            arrays[name] = np.empty(shape, np.dtype(dtype))
        else:
            arrays[name] = np.ndarray(shape, np.dtype(dtype), buffer=buf, offset=offset)
    return arrays


def copies(buf: memoryview, metas: Sequence[TensorMeta]) -> dict[str, np.ndarray]:
    """Arrays copied out of the slab, so the slab can be reused at once."""
    arrays = views(buf, metas)
    return {name: a.copy() if a.dtype != object else a for name, a in arrays.items()}
