"""Merge and split of the dynamic batcher, on their own."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import Internal, InvalidArgument
from services.inference.batching import merge, rows_and_key, split


def test_compatible_requests_share_a_key_and_others_do_not() -> None:
    a: dict[str, np.ndarray] = {"x": np.zeros((2, 3), np.float32), "m": np.zeros((2,), np.int64)}
    b: dict[str, np.ndarray] = {"m": np.ones((5,), np.int64), "x": np.ones((5, 3), np.float32)}
    assert rows_and_key(a, True)[0] == 2 and rows_and_key(b, True)[0] == 5
    assert rows_and_key(a, True)[1] == rows_and_key(b, True)[1]  # input order does not matter
    wider: dict[str, np.ndarray] = {"x": np.zeros((2, 4), np.float32)}
    doubles: dict[str, np.ndarray] = {"x": np.zeros((2, 3), np.float64)}
    assert rows_and_key(wider, True)[1] != rows_and_key(a, True)[1]
    assert rows_and_key(doubles, True)[1] != rows_and_key({"x": a["x"]}, True)[1]
    assert rows_and_key(a, False) == (1, None)


@pytest.mark.parametrize(("inputs", "message"), [
    ({}, "no inputs"),
    ({"x": np.float32(1)}, "no batch dimension"),
    ({"x": np.zeros((2, 1)), "y": np.zeros((3, 1))}, "disagree on the batch dimension"),
    ({"x": np.zeros((0, 1))}, ">= 1, got 0"),
])
def test_bad_requests_are_refused_with_a_reason(inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        rows_and_key(inputs, True)


@given(st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=8))
def test_split_of_merge_gives_back_each_request(rows: list[int]) -> None:
    parts = [{"x": np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 100 * i} for i, n in enumerate(rows)]
    merged = merge(parts)
    assert merged["x"].shape == (sum(rows), 2)
    outputs = {"y": merged["x"] * 2}
    back = split(outputs, rows, sum(rows))
    assert len(back) == len(parts)
    for part, answer in zip(parts, back, strict=True):
        np.testing.assert_array_equal(answer["y"], part["x"] * 2)


def test_a_lone_request_is_passed_through_without_copies() -> None:
    part = {"x": np.zeros((3, 2), np.float32)}
    assert merge([part]) is part
    outputs = {"y": np.zeros((7,))}  # not checked: the model answered exactly this request
    assert split(outputs, [3], 3)[0] is outputs


def test_a_model_returning_the_wrong_rows_is_an_internal_error() -> None:
    with pytest.raises(Internal, match="shape \\[4\\] for a batch of 5 rows"):
        split({"y": np.zeros((4,))}, [2, 3], 5)
