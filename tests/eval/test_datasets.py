"""Data set files: what `inspect` finds in Parquet, CSV and NPZ, how `fit` maps them onto a signature (and
what it says when they do not fit), and batches read back exactly, with bounded memory."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from aiaas.errors import InvalidArgument
from aiaas.eval.formats import DatasetFormat
from aiaas.eval.reader import DatasetReader, InputPlan
from aiaas.eval.schema import fit, inspect
from aiaas.tensors import TensorSpec

X = TensorSpec("x", "FP32", (-1, 4))


def rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n),
            np.array(["fr", "de", "us"], dtype=object)[rng.integers(0, 3, n)])


def read_all(path: Path, fmt: DatasetFormat, batch: int) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    schema = inspect(path, fmt)
    found = fit(schema, [X], ["y"], "m version 1")
    reader = DatasetReader(path, fmt, found, [InputPlan("x", found.inputs["x"], np.dtype(np.float32), (4,))])
    sizes, xs, ys, countries = [], [], [], []
    for b in reader.batches(batch):
        sizes.append(b.rows)
        xs.append(b.inputs["x"])
        ys.append(b.labels["y"])
        countries.append(b.features["country"])
    return sizes, np.concatenate(xs), np.concatenate(ys), np.concatenate(countries)


@pytest.mark.parametrize("layout", ["fixed_size_list", "list", "split"])
def test_parquet_layouts_read_back_in_exact_batches(tmp_path: Path, layout: str) -> None:
    x, y, country = rows(1000)
    if layout == "split":
        columns = {f"x[{i}]": x[:, i] for i in range(4)}
    elif layout == "list":
        columns = {"x": pa.array(list(x))}
    else:
        columns = {"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)}
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({**columns, "y": y, "country": country}), path, row_group_size=300)
    schema = inspect(path, DatasetFormat.PARQUET)
    assert schema.num_rows == 1000
    column = schema.column("x")
    assert column is not None and (column.datatype, column.shape, column.split) == ("FP32", (4,), layout == "split")
    sizes, xs, ys, countries = read_all(path, DatasetFormat.PARQUET, 128)
    assert sizes == [128] * 7 + [104]  # row groups of 300 are cut into batches of exactly 128
    assert np.array_equal(xs, x) and np.array_equal(ys, y) and list(countries) == list(country)


def test_csv_with_split_columns_across_blocks(tmp_path: Path) -> None:
    x, y, country = rows(40_000)  # well over the reader's 1 MiB blocks
    path = tmp_path / "d.csv"
    pacsv.write_csv(pa.table({**{f"x[{i}]": x[:, i] for i in range(4)}, "y": y, "country": country}), path)
    assert path.stat().st_size > 1 << 20
    schema = inspect(path, DatasetFormat.CSV)
    assert schema.num_rows == 40_000 and schema.names == ["x", "y", "country"]
    sizes, xs, ys, countries = read_all(path, DatasetFormat.CSV, 5000)
    assert sizes == [5000] * 8
    assert np.allclose(xs, x, atol=1e-6) and np.array_equal(ys, y) and list(countries) == list(country)


def test_npz_streams_member_by_member(tmp_path: Path) -> None:
    x, y, country = rows(500)
    path = tmp_path / "d.npz"
    # A Fortran-ordered array is read whole; the others row by row from the zip stream.
    np.savez_compressed(path, x=np.asfortranarray(x), y=y, country=country.astype("U2"))
    schema = inspect(path, DatasetFormat.NPZ)
    assert schema.num_rows == 500 and {c.name: c.datatype for c in schema.columns} == {
        "x": "FP32", "y": "INT64", "country": "BYTES"}
    sizes, xs, ys, countries = read_all(path, DatasetFormat.NPZ, 200)
    assert sizes == [200, 200, 100]
    assert np.array_equal(xs, x) and np.array_equal(ys, y) and [c.decode() for c in countries] == list(country)


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as handle:
        np.lib.format.write_array(handle, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidArgument, match="array 'x' holds Python objects"):
        inspect(path, DatasetFormat.NPZ)


def test_npz_row_counts_must_agree(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 4), np.float32), y=np.zeros(2))
    with pytest.raises(InvalidArgument, match=r"disagree on the number of rows \(x: 3, y: 2\)"):
        inspect(path, DatasetFormat.NPZ)


def test_what_does_not_fit_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(30, np.float32)), 3),
                             "z": ["a"] * 10, "y": np.arange(10)}), path)
    schema = inspect(path, DatasetFormat.PARQUET)
    with pytest.raises(InvalidArgument) as caught:
        fit(schema, [X, TensorSpec("z", "FP32", (-1,)), TensorSpec("w", "INT64", (-1, 2))], ["label"],
            "demo version 3")
    message = caught.value.message
    assert message.startswith("the data set does not fit demo version 3: ")
    assert "column 'x' does not fit input 'x': expected FP32 with per-row shape [4], got FP32 [3]" in message
    assert "column 'z' does not fit input 'z': expected FP32 with per-row shape [], got BYTES []" in message
    assert "no column for input 'w' (INT64, per-row shape [2]): add a column 'w' holding 2 values per row, or " \
           "columns w[0]..w[1]" in message
    assert "no label column 'label'; the data set has x, z, y" in message
    with pytest.raises(InvalidArgument, match="has a variable dimension"):
        fit(schema, [TensorSpec("x", "FP32", (-1, -1))], ["y"], "demo version 3")


def test_lists_of_different_lengths_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0, 3.0, 4.0], [1.0]] * 5), "y": np.arange(10)}), path)
    with pytest.raises(InvalidArgument, match=r"got FP64 \[-1\] \(rows hold lists of different lengths\)"):
        fit(inspect(path, DatasetFormat.PARQUET), [X], ["y"], "m version 1")


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"hello")
    with pytest.raises(InvalidArgument, match="not a readable parquet file"):
        inspect(path, DatasetFormat.PARQUET)


def test_reading_a_large_file_keeps_memory_bounded(tmp_path: Path) -> None:
    """200,000 rows of 64 floats (51 MB of inputs) and slicing features read in batches of 1,000: Arrow
    never holds more than a few row groups' worth (with Parquet's pre-buffering it held them all)."""
    path = tmp_path / "big.parquet"
    width, total = 64, 200_000
    rng = np.random.default_rng(0)
    spec = TensorSpec("x", "FP32", (-1, width))
    writer = None
    for start in range(0, total, 20_000):
        block = rng.normal(size=(20_000, width)).astype(np.float32)  # incompressible, as real inputs are
        table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), width),
                          "y": np.arange(start, start + 20_000), "country": ["fr", "de"] * 10_000,
                          "age": np.arange(20_000) % 80})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=10_000)
    assert writer is not None
    writer.close()
    found = fit(inspect(path, DatasetFormat.PARQUET), [spec], ["y"], "m version 1")
    reader = DatasetReader(path, DatasetFormat.PARQUET, found, [InputPlan("x", found.inputs["x"],
                                                                          np.dtype(np.float32), (width,))])
    base, peak, seen = pa.total_allocated_bytes(), 0, 0
    for batch in reader.batches(1000):
        peak = max(peak, pa.total_allocated_bytes() - base)
        assert batch.labels["y"][0] == seen
        seen += batch.rows
    assert seen == total
    assert peak < 12 * 1024 * 1024, f"Arrow held {peak} bytes while reading"
