"""KServe datatypes <-> numpy, raw tensor bytes and the BYTES length-prefixed encoding."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.datatypes import (
    KSERVE_TO_NUMPY,
    array_to_raw,
    deserialize_bytes_tensor,
    element_size,
    numpy_to_kserve,
    raw_to_array,
    serialize_bytes_tensor,
)
from services.common.errors import InvalidArgument

FIXED = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
]


def _sample(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = KSERVE_TO_NUMPY[datatype]
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def test_every_protocol_datatype_is_mapped() -> None:
    assert set(KSERVE_TO_NUMPY) == set(FIXED) | {"BYTES"}
    assert KSERVE_TO_NUMPY["BF16"] == np.dtype(np.uint16)
    assert KSERVE_TO_NUMPY["BYTES"] == np.dtype(object)


@pytest.mark.parametrize("datatype", FIXED)
def test_fixed_size_round_trip(datatype: str) -> None:
    array = _sample(datatype, (3, 4), np.random.default_rng(7))
    raw = array_to_raw(array, datatype)
    size = element_size(datatype)
    assert size is not None  # None only for BYTES
    assert len(raw) == array.size * size
    back = raw_to_array(raw, datatype, (3, 4))
    assert back.dtype == KSERVE_TO_NUMPY[datatype]
    np.testing.assert_array_equal(back, array)


def test_raw_to_array_is_zero_copy() -> None:
    raw = np.arange(6, dtype=np.float32).tobytes()
    array = raw_to_array(raw, "FP32", [2, 3])
    assert not array.flags.owndata and not array.flags.writeable


@pytest.mark.parametrize("datatype", [d for d in FIXED if d not in ("BF16", "UINT16")])
def test_numpy_to_kserve_inverts_the_table(datatype: str) -> None:
    assert numpy_to_kserve(KSERVE_TO_NUMPY[datatype]) == datatype


def test_numpy_to_kserve_special_kinds() -> None:
    assert numpy_to_kserve(np.dtype(np.uint16)) == "UINT16"
    assert numpy_to_kserve(np.dtype(object)) == "BYTES"
    assert numpy_to_kserve(np.dtype("S3")) == "BYTES"
    assert numpy_to_kserve(np.dtype("U3")) == "BYTES"
    assert numpy_to_kserve(np.dtype(">f4")) == "FP32"
    import ml_dtypes

    assert numpy_to_kserve(np.dtype(ml_dtypes.bfloat16)) == "BF16"
    with pytest.raises(InvalidArgument):
        numpy_to_kserve(np.dtype(np.complex64))


def test_bf16_from_ml_dtypes_goes_as_bit_patterns() -> None:
    import ml_dtypes

    values = np.array([1.0, -2.5, 3.140625], dtype=ml_dtypes.bfloat16)
    raw = array_to_raw(values, "BF16")
    assert raw == values.tobytes()
    bits = raw_to_array(raw, "BF16", [3])
    np.testing.assert_array_equal(bits.view(ml_dtypes.bfloat16), values)


def test_big_endian_arrays_are_sent_little_endian() -> None:
    array = np.array([1, 2, 3], dtype=">i4")
    assert array_to_raw(array, "INT32") == np.array([1, 2, 3], dtype="<i4").tobytes()


def test_element_sizes() -> None:
    assert element_size("BYTES") is None
    assert element_size("BOOL") == 1 and element_size("BF16") == 2 and element_size("FP64") == 8
    with pytest.raises(InvalidArgument, match="unknown datatype 'FLOAT32'"):
        element_size("FLOAT32")


def test_size_mismatch_message_is_precise() -> None:
    with pytest.raises(InvalidArgument) as info:
        raw_to_array(b"\x00" * 10, "FP32", [2, 2])
    assert "unexpected total byte size 10 for FP32 tensor of shape [2, 2], expected 16" in info.value.message


def test_negative_shape_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="negative"):
        raw_to_array(b"", "FP32", [-1, 2])


def test_malformed_bool_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="BOOL"):
        raw_to_array(b"\x00\x02", "BOOL", [2])


def test_dtype_mismatch_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="cannot be sent as FP32"):
        array_to_raw(np.zeros(2, dtype=np.float64), "FP32")


def test_bytes_encoding_matches_the_protocol_example() -> None:
    array = np.array([b"ab", "", "xyz"], dtype=object)
    raw = serialize_bytes_tensor(array)
    assert raw.hex() == "020000006162000000000300000078797a"
    back = deserialize_bytes_tensor(raw, 3)
    assert back.dtype == object and list(back) == [b"ab", b"", b"xyz"]


def test_bytes_round_trip_with_shape_and_random_payloads() -> None:
    rng = np.random.default_rng(3)
    items = [rng.bytes(int(n)) for n in rng.integers(0, 40, size=12)]
    array = np.array(items, dtype=object).reshape(3, 4)
    raw = array_to_raw(array, "BYTES")
    back = raw_to_array(raw, "BYTES", (3, 4))
    assert back.shape == (3, 4)
    assert back.tolist() == array.tolist()


def test_bytes_of_fixed_width_numpy_strings() -> None:
    raw = serialize_bytes_tensor(np.array([b"a", b"bcd"]))
    assert list(deserialize_bytes_tensor(raw, 2)) == [b"a", b"bcd"]


def test_empty_bytes_tensor() -> None:
    assert serialize_bytes_tensor(np.empty((0,), dtype=object)) == b""
    assert deserialize_bytes_tensor(b"", 0).shape == (0,)


@pytest.mark.parametrize(
    ("raw", "count", "fragment"),
    [
        (b"\x02\x00", 1, "no 4-byte length prefix"),
        (b"\x05\x00\x00\x00ab", 1, "declares 5 bytes"),
        (b"\x01\x00\x00\x00a\x00", 1, "1 trailing bytes"),
        (b"\x01\x00\x00\x00a", 2, "element 1 of 2"),
    ],
)
def test_malformed_bytes_are_invalid_argument(raw: bytes, count: int, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        deserialize_bytes_tensor(raw, count)
