"""Read a data set in batches of examples with bounded memory: model inputs, labels and slicing features.

Parquet is read by row groups (`ParquetFile.iter_batches`), CSV by blocks (pyarrow's streaming
reader), NPZ member by member from the zip stream (`.npy` headers parsed, rows read in chunks,
nothing unpickled). Whatever the file's own block sizes, batches come out `rows` examples long
(the last one shorter), so memory is bounded by the batch, not the file.
"""

from __future__ import annotations

import dataclasses
import math
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aiaas.errors import InvalidArgument
from aiaas.eval.formats import DatasetFormat
from aiaas.eval.schema import Column, Fit, npz_members, read_npy_header

ARROW_BLOCK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """Where one model input comes from and what it must become."""

    name: str
    column: Column
    dtype: np.dtype
    shape: tuple[int, ...]


@dataclasses.dataclass
class Batch:
    """`rows` consecutive examples, starting at row `start`."""

    start: int
    rows: int
    inputs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    features: dict[str, np.ndarray]


def _cast(values: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    if dtype == object:
        return np.array([v if isinstance(v, bytes) else str(v).encode() for v in values.reshape(-1)],
                        dtype=object).reshape(values.shape)
    if dtype.kind in "iu" and values.dtype.kind in "iu" and values.size and not np.can_cast(values.dtype, dtype):
        info = np.iinfo(dtype)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise InvalidArgument(f"{where} holds {low if low < info.min else high}, outside {dtype.name}")
    return values.astype(dtype, copy=False)


class DatasetReader:
    """Batches of one data set file laid out by `fit` (model inputs in `inputs`' dtypes and shapes)."""

    def __init__(self, path: str | Path, fmt: DatasetFormat, fit: Fit, inputs: Sequence[InputPlan]) -> None:
        self.path = Path(path)
        self.format = fmt
        self.fit = fit
        self.inputs = tuple(inputs)

    def _sources(self) -> list[str]:
        columns = [p.column for p in self.inputs] + list(self.fit.labels) + list(self.fit.features)
        return [source for column in columns for source in column.sources]

    def batches(self, rows: int) -> Iterator[Batch]:
        if rows < 1:
            raise InvalidArgument(f"batch size must be at least 1, got {rows}")
        start = 0
        for columns in _rebatch(self._column_chunks(rows), rows):
            count = len(next(iter(columns.values())))
            yield self._batch(start, count, columns)
            start += count

    def _column_chunks(self, rows: int) -> Iterator[dict[str, np.ndarray]]:
        if self.format is DatasetFormat.NPZ:
            yield from _npz_chunks(self.path, self._sources(), rows)
        elif self.format is DatasetFormat.PARQUET:
            import pyarrow.parquet as pq

            # pre_buffer (the default) coalesces column chunks ahead across row groups and keeps them:
            # reading four columns of 400,000 rows held 124 MiB. Without it, a row group at a time.
            with pq.ParquetFile(self.path, pre_buffer=False) as parquet:
                for batch in parquet.iter_batches(batch_size=rows, columns=self._sources()):
                    yield self._arrow_columns(batch)
        else:
            import pyarrow.csv as pacsv

            options = pacsv.ConvertOptions(include_columns=self._sources())
            with pacsv.open_csv(self.path, read_options=pacsv.ReadOptions(block_size=ARROW_BLOCK_BYTES),
                                convert_options=options) as reader:
                for batch in reader:
                    yield self._arrow_columns(batch)

    def _arrow_columns(self, batch: Any) -> dict[str, np.ndarray]:
        return {name: _arrow_to_numpy(batch.column(name), name) for name in batch.schema.names}

    def _batch(self, start: int, count: int, columns: Mapping[str, np.ndarray]) -> Batch:
        inputs = {}
        for plan in self.inputs:
            where = f"column {plan.column.name!r} (rows {start}..{start + count - 1})"
            if plan.column.split:
                values = np.stack([columns[s] for s in plan.column.sources], axis=1)
            else:
                values = columns[plan.column.sources[0]]
            _refuse_missing(values, where)
            inputs[plan.name] = _cast(values, plan.dtype, where).reshape(count, *plan.shape)
        labels = {}
        for column in self.fit.labels:
            values = columns[column.name]
            _refuse_missing(values, f"label column {column.name!r} (rows {start}..{start + count - 1})")
            labels[column.name] = values
        features = {c.name: _feature_values(c, columns) for c in self.fit.features}
        return Batch(start, count, inputs, labels, features)


def _feature_values(column: Column, columns: Mapping[str, np.ndarray]) -> np.ndarray:
    if column.split:
        return np.stack([columns[s] for s in column.sources], axis=1)
    return columns[column.sources[0]]


def _refuse_missing(values: np.ndarray, where: str) -> None:
    if values.dtype == object and any(v is None for v in values.reshape(-1)):
        raise InvalidArgument(f"{where} has a missing value")
    if values.dtype.kind == "f" and np.isnan(values).any():
        raise InvalidArgument(f"{where} has a missing (NaN) value")


def _arrow_to_numpy(array: Any, name: str) -> np.ndarray:
    """An Arrow column as numpy: lists flattened to [rows, length...], nulls as None / NaN."""
    import pyarrow as pa

    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    shape: list[int] = []
    rows = len(array)
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) \
            or pa.types.is_fixed_size_list(array.type):
        if array.null_count:
            raise InvalidArgument(f"column {name!r} has a missing value")
        lengths = array.value_lengths() if not pa.types.is_fixed_size_list(array.type) else None
        flat = array.flatten()
        if lengths is not None:
            found = set(lengths.to_numpy(zero_copy_only=False).tolist())
            if len(found) > 1:
                raise InvalidArgument(f"column {name!r} holds lists of different lengths ({sorted(found)[:5]})")
            width = found.pop() if found else 0
        else:
            width = array.type.list_size
        shape.append(int(width))
        array = flat
    values = array.to_numpy(zero_copy_only=False)
    return values.reshape(rows, *shape) if shape else values


def _rebatch(chunks: Iterator[dict[str, np.ndarray]], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Chunks of any length in, chunks of exactly `rows` out (the last one shorter)."""
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    for chunk in chunks:
        count = len(next(iter(chunk.values()))) if chunk else 0
        if not count:
            continue
        pending.append(chunk)
        held += count
        while held >= rows:
            joined = _join(pending)
            yield {k: v[:rows] for k, v in joined.items()}
            rest = {k: v[rows:] for k, v in joined.items()}
            held -= rows
            pending = [rest] if held else []
    if held:
        yield _join(pending)


def _join(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(chunks) == 1:
        return chunks[0]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _npz_chunks(path: Path, names: Sequence[str], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Each wanted .npy member read `rows` rows at a time, in lockstep, straight from the zip stream."""
    members = dict(npz_members(path))
    with zipfile.ZipFile(path) as archive:
        streams: dict[str, Any] = {}
        try:
            layouts = {}
            for name in names:
                if name not in members:
                    raise InvalidArgument(f"the npz file has no array {name!r}")
                handle = archive.open(members[name])
                streams[name] = handle
                shape, fortran, dtype = read_npy_header(handle, name)
                if fortran and len(shape) > 1:
                    # Column-major rows are not contiguous: this one array is read whole.
                    streams[name] = np.asfortranarray(np.frombuffer(handle.read(), dtype=dtype)
                                                      .reshape(shape, order="F"))
                layouts[name] = (shape, dtype)
            total = next(iter(layouts.values()))[0][0] if layouts else 0
            for start in range(0, total, rows):
                count = min(rows, total - start)
                yield {name: _npz_rows(streams[name], layouts[name], start, count) for name in names}
        finally:
            for stream in streams.values():
                if hasattr(stream, "close"):
                    stream.close()


def _npz_rows(stream: Any, layout: tuple[tuple[int, ...], np.dtype], start: int, count: int) -> np.ndarray:
    shape, dtype = layout
    if isinstance(stream, np.ndarray):
        return np.ascontiguousarray(stream[start:start + count])
    per_row = math.prod(shape[1:]) * dtype.itemsize
    data = stream.read(per_row * count)
    if len(data) != per_row * count:
        raise InvalidArgument(f"the npz array ends after row {start + len(data) // max(per_row, 1)}, "
                              f"its header says {shape[0]} rows")
    values = np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])
    if dtype.kind in "US":
        return np.array([v.encode() if isinstance(v, str) else bytes(v) for v in values.reshape(-1)],
                        dtype=object).reshape(values.shape)
    return values
