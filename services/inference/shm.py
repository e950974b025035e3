"""Shared-memory slabs that carry tensors between the service and its worker processes.

A slab is one `multiprocessing.shared_memory` segment, always created (and unlinked) by the
service. The worker never opens one by name: the service passes the descriptor over the Unix
socket (SCM_RIGHTS) and the worker maps it (`MappedSlab`), so a sandboxed worker needs no access
to /dev/shm, and cannot reach another worker's slabs. Tensors are packed at 64-byte aligned
offsets; only a small tuple of metadata per tensor (name, dtype, shape, offset, size) crosses the
pipe. BYTES tensors travel as their length-prefixed serialization.
"""

from __future__ import annotations

import math
import mmap
import os
import secrets
import socket
from collections.abc import Collection, Mapping, Sequence
from multiprocessing import shared_memory
from multiprocessing.connection import Connection

import numpy as np

from services.common.datatypes import (
    KSERVE_TO_NUMPY,
    MAX_RANK,
    deserialize_bytes_tensor,
    serialize_bytes_tensor,
)
from services.common.errors import AiaasError

ALIGN = 64
OBJECT = "|O"  # dtype.str of BYTES tensors (numpy object arrays)
_FIXED = {dtype.str for name, dtype in KSERVE_TO_NUMPY.items() if name != "BYTES"}

# (name, numpy dtype str, shape, offset, nbytes)
TensorMeta = tuple[str, str, tuple[int, ...], int, int]


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Slab:
    """One shared-memory segment the service created; `owner` unlinks it on close."""

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

    @property
    def fd(self) -> int:
        """The segment's descriptor, to pass to a worker (SharedMemory keeps it open until close)."""
        return int(self._segment._fd)  # type: ignore[attr-defined]

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


class MappedSlab:
    """A worker's mapping of a slab whose descriptor the service passed; closing only unmaps."""

    def __init__(self, name: str, fd: int) -> None:
        try:
            self.size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)  # the mapping holds its own reference
        self.name = name
        self.buf: memoryview = memoryview(self._map)

    def close(self) -> None:
        """Unmap. Views into `buf` must be gone first; if one lingers, the mapping goes with it."""
        buf, self.buf = self.buf, memoryview(b"")
        try:
            buf.release()
            self._map.close()
        except BufferError:
            pass  # a view still exists; the mapping goes when it is collected


def send_fds(conn: Connection, fds: Sequence[int]) -> None:
    """Pass descriptors over the connection's Unix socket, after the message that names them."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        socket.send_fds(sock, [b"F"], list(fds))


def receive_fds(sock: socket.socket, count: int) -> list[int]:
    """The `count` descriptors `send_fds` passed; OSError when they did not all arrive."""
    data, fds, _, _ = socket.recv_fds(sock, 1, count)
    if data != b"F" or len(fds) != count:
        for fd in fds:
            os.close(fd)
        raise OSError(f"expected {count} shared-memory descriptor(s), got {len(fds)}")
    return fds


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


def copies(buf: memoryview, metas: Sequence[TensorMeta], names: Collection[str]) -> dict[str, np.ndarray]:
    """Arrays copied out of the slab, so the slab can be reused at once.

    The metas come from a worker running model code: each is checked against the slab and the
    expected output `names` before anything is read or allocated (ValueError if one is wrong).
    """
    try:
        arrays = views(buf, [_checked(meta, len(buf), names) for meta in metas])
    except AiaasError as exc:  # a BYTES payload that does not decode
        raise ValueError(exc.message) from None
    return {name: a.copy() if a.dtype != object else a for name, a in arrays.items()}


def _checked(meta: object, size: int, names: Collection[str]) -> TensorMeta:
    if not isinstance(meta, (list, tuple)) or len(meta) != 5:
        raise ValueError(f"output description {str(meta)[:100]!r} is not (name, dtype, shape, offset, size)")
    name, dtype, shape, offset, nbytes = meta
    if name not in names:
        raise ValueError(f"output {str(name)[:100]!r} is not in the signature")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK or \
            not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"output '{name}' has shape {str(shape)[:100]}")
    if not (isinstance(offset, int) and isinstance(nbytes, int) and 0 <= offset and 0 <= nbytes <= size - offset):
        raise ValueError(f"output '{name}' lies outside the {size} byte slab (offset {offset}, {nbytes} bytes)")
    if dtype != OBJECT and (dtype not in _FIXED or math.prod(shape) * np.dtype(dtype).itemsize != nbytes):
        raise ValueError(f"output '{name}' of dtype {str(dtype)[:20]} and shape {list(shape)} is not {nbytes} bytes")
    return name, dtype, tuple(shape), offset, nbytes
