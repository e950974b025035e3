"""KServe v2 datatypes <-> numpy, and the wire encoding of tensors (raw bytes, BYTES length prefixes).

numpy has no bfloat16, so BF16 travels through numpy as its uint16 bit patterns; the worker views
them as torch.bfloat16. BYTES tensors are numpy object arrays of `bytes`; on the wire each element
is a 4-byte little-endian length followed by its bytes (KSERVE_V2_PROTOCOL.md §4.3).

A request's declared shapes are checked against the bytes it carries before anything is
allocated (`check_raw_size`, O(rank) per input): a shape is a claim, the raw bytes are the
evidence, and a BYTES element costs far more memory decoded than its 4-byte prefix on the wire.
The gateway runs the same checks before forwarding.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from aiaas.runtime import KSERVE_TO_NUMPY  # the runtime's table: one map of datatypes to numpy
from services.common.errors import InvalidArgument

_NUMPY_TO_KSERVE: dict[np.dtype, str] = {
    dtype: name for name, dtype in KSERVE_TO_NUMPY.items() if name not in ("BF16", "BYTES")
}

_ELEMENT_SIZE: dict[str, int] = {
    name: dtype.itemsize for name, dtype in KSERVE_TO_NUMPY.items() if name != "BYTES"
}

_LENGTH = struct.Struct("<I")
_PREFIX = _LENGTH.size

# Bounds checked before a tensor is decoded, shared by gateway and inference. Module constants
# until the services' settings carry them.
# numpy's own limit on dimensions; deeper shapes cannot be built anyway.
MAX_RANK = 64
# BYTES elements in one request, all inputs together: decoded, each costs a Python bytes
# object (~40 bytes) however short it was on the wire.
MAX_BYTES_ELEMENTS = 1 << 22
# One BYTES element.
MAX_BYTES_ELEMENT_BYTES = 64 << 20
# The BYTES tensors of one request together, length prefixes included (decoding copies them).
MAX_BYTES_REQUEST_BYTES = 1 << 30


def _check_datatype(datatype: str) -> None:
    if datatype not in KSERVE_TO_NUMPY:
        known = ", ".join(KSERVE_TO_NUMPY)
        raise InvalidArgument(f"unknown datatype '{datatype}'; expected one of {known}")


def numpy_to_kserve(dtype: np.dtype | type) -> str:
    """The KServe datatype for a numpy dtype; bytes, str and object arrays are BYTES."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    if dtype.name == "bfloat16":  # ml_dtypes.bfloat16, as tritonclient uses it
        return "BF16"
    name = _NUMPY_TO_KSERVE.get(dtype.newbyteorder("=") if dtype.byteorder == ">" else dtype)
    if name is None:
        raise InvalidArgument(f"numpy dtype {dtype} has no KServe datatype")
    return name


def element_size(datatype: str) -> int | None:
    """Bytes per element, or None for BYTES (variable length)."""
    _check_datatype(datatype)
    return _ELEMENT_SIZE.get(datatype)


def _as_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    return str(item).encode("utf-8")


def serialize_bytes_tensor(array: np.ndarray) -> bytes:
    """Row-major elements, each as a 4-byte little-endian length then its bytes."""
    pack = _LENGTH.pack
    parts: list[bytes] = []
    append = parts.append
    for item in np.asarray(array).flat:
        data = _as_bytes(item)
        append(pack(len(data)))
        append(data)
    return b"".join(parts)


def deserialize_bytes_tensor(raw: bytes | bytearray | memoryview, count: int) -> np.ndarray:
    """A flat object array of `count` bytes elements; InvalidArgument if `raw` is malformed.

    `count` is checked against `raw` and the bounds before the array is allocated.
    """
    view = memoryview(raw).cast("B")
    total = len(view)
    _check_bytes_count(count, total)
    result = np.empty(count, dtype=object)
    unpack = _LENGTH.unpack_from
    limit = MAX_BYTES_ELEMENT_BYTES
    offset = 0
    error = ""
    for index in range(count):
        if offset + 4 > total:
            error = (f"malformed BYTES tensor: element {index} of {count} has no 4-byte length prefix "
                     f"(offset {offset}, {total} bytes in all)")
            break
        (length,) = unpack(view, offset)
        offset += 4
        end = offset + length
        if end > total:
            error = (f"malformed BYTES tensor: element {index} declares {length} bytes at offset {offset} "
                     f"but only {total - offset} remain")
            break
        if length > limit:
            error = f"BYTES element {index} of {count} is {length} bytes, over the limit of {limit} per element"
            break
        result[index] = bytes(view[offset:end])
        offset = end
    else:
        if offset == total:
            return result
        error = f"malformed BYTES tensor: {total - offset} trailing bytes after {count} elements"
    # Drop what was decoded here, in this thread: the error's traceback would keep it alive
    # until whoever catches it lets go (the event loop, for a request decoded in a thread).
    del result
    raise InvalidArgument(error)


def _check_bytes_count(count: int, total: int) -> None:
    if count * _PREFIX > total:
        raise InvalidArgument(
            f"malformed BYTES tensor: {count} elements need at least {count * _PREFIX} bytes (a 4-byte length "
            f"prefix each) but {total} bytes were received: element {total // _PREFIX} of {count} has no "
            "4-byte length prefix"
        )
    if count > MAX_BYTES_ELEMENTS:
        raise InvalidArgument(
            f"BYTES tensor of {count} elements is over the limit of {MAX_BYTES_ELEMENTS} elements per request"
        )


def element_count(name: str, shape: Sequence[int], model: str = "") -> int:
    """The elements `shape` declares, in O(rank); InvalidArgument for a negative or excess dimension."""
    rank = len(shape)
    if rank > MAX_RANK:
        raise InvalidArgument(f"{_input(name, model)}: shape has {rank} dimensions, more than {MAX_RANK}")
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidArgument(f"{_input(name, model)}: negative dimension in shape {_dims(shape)}")
        count *= dim
    return count


class BytesBudget:
    """What the BYTES inputs of one request may add up to, charged input by input before decoding."""

    __slots__ = ("elements", "size")

    def __init__(self) -> None:
        self.elements = 0
        self.size = 0

    def charge(self, name: str, count: int, size: int, model: str = "") -> None:
        self.elements += count
        self.size += size
        if self.elements > MAX_BYTES_ELEMENTS:
            raise InvalidArgument(
                f"{_input(name, model)}: the request's BYTES inputs declare {self.elements} elements so far, "
                f"over the limit of {MAX_BYTES_ELEMENTS} per request")
        if self.size > MAX_BYTES_REQUEST_BYTES:
            raise InvalidArgument(
                f"{_input(name, model)}: the request's BYTES inputs hold {self.size} bytes so far, over the "
                f"limit of {MAX_BYTES_REQUEST_BYTES} per request")


def check_raw_size(name: str, datatype: str, shape: Sequence[int], size: int, budget: BytesBudget | None = None,
                   model: str = "") -> int:
    """Check the `size` bytes received for an input against its declared `shape`; returns its element count.

    A fixed-size datatype needs exactly count * element size bytes; BYTES needs a 4-byte length
    prefix per element at least, within the per-request bounds (charged to `budget`). O(rank):
    nothing is read or allocated. An unknown datatype is left to the caller to refuse.
    """
    count = element_count(name, shape, model)
    itemsize = _ELEMENT_SIZE.get(datatype)
    if itemsize is not None:
        if size != count * itemsize:
            raise InvalidArgument(
                f"{_input(name, model)}: shape {_dims(shape)} of {datatype} declares {count} elements "
                f"({count * itemsize} bytes) but raw_input_contents holds {size} bytes")
    elif datatype == "BYTES":
        if count * _PREFIX > size:
            raise InvalidArgument(
                f"{_input(name, model)}: shape {_dims(shape)} declares {count} BYTES elements, which need at "
                f"least {count * _PREFIX} bytes (a 4-byte length prefix each), but raw_input_contents holds "
                f"{size} bytes")
        (budget or BytesBudget()).charge(name, count, size, model)
    return count


def _input(name: str, model: str) -> str:
    return f"input '{name}' for model '{model}'" if model else f"input '{name}'"


def _dims(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _element_count(shape: Sequence[int], datatype: str) -> int:
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"invalid shape for {datatype} tensor: {len(shape)} dimensions, more than {MAX_RANK}")
    for dim in shape:
        if dim < 0:
            raise InvalidArgument(f"invalid shape {list(shape)} for {datatype} tensor: negative dimension")
    return math.prod(shape)


def raw_to_array(raw: bytes | bytearray | memoryview, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """The tensor in `raw` as a numpy array of `shape`: a zero-copy read-only view where possible."""
    _check_datatype(datatype)
    count = _element_count(shape, datatype)
    if datatype == "BYTES":
        return deserialize_bytes_tensor(raw, count).reshape(shape)
    dtype = KSERVE_TO_NUMPY[datatype]
    expected = count * dtype.itemsize
    size = memoryview(raw).nbytes
    if size != expected:
        raise InvalidArgument(
            f"unexpected total byte size {size} for {datatype} tensor of shape {list(shape)}, "
            f"expected {expected} ({count} elements of {dtype.itemsize} bytes)"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
    if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise InvalidArgument("malformed BOOL tensor: every byte must be 0 or 1")
    return array


def array_to_raw(array: np.ndarray, datatype: str) -> bytes:
    """The wire bytes of `array` as `datatype`: C order, little-endian, BYTES length-prefixed."""
    _check_datatype(datatype)
    if datatype == "BYTES":
        return serialize_bytes_tensor(array)
    expected = KSERVE_TO_NUMPY[datatype]
    dtype = array.dtype
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("<"))
        dtype = array.dtype
    if datatype == "BF16" and dtype.name == "bfloat16":
        array = array.view(np.uint16)
    elif dtype != expected:
        raise InvalidArgument(f"array of dtype {dtype} cannot be sent as {datatype} (needs {expected})")
    return np.ascontiguousarray(array).tobytes()
