"""What a data set file holds (columns, per-row shapes, row count) and whether it fits a model's signature.

The registry runs `inspect` and `fit` on every uploaded data set before it is stored, and
`aiaas evaluate` runs `fit` again against the version it evaluates: a mismatch is an
InvalidArgument naming the column and the dtype/shape the model expects.

Rows are examples. An input of per-row shape [4] is one list column named after the input
(Parquet: list or fixed-size list; NPZ: an array of shape [rows, 4]), or scalar columns
`x[0]`..`x[3]` (any format; row-major for higher ranks). Only the file's metadata is read for
Parquet and NPZ; a CSV file, and a Parquet list column of unknown length, are read once in
bounded batches.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from aiaas.errors import InvalidArgument
from aiaas.eval.formats import DatasetFormat

FLOATS = frozenset({"FP16", "FP32", "FP64", "BF16"})
INTEGERS = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
NUMBERS = FLOATS | INTEGERS
SCAN_BATCH_ROWS = 65_536
_SPLIT = re.compile(r"(?P<base>.+)\[(?P<index>\d+)\]")
# numpy dtype kind + itemsize -> KServe datatype.
_NUMPY_TO_KSERVE = {
    ("b", 1): "BOOL", ("i", 1): "INT8", ("i", 2): "INT16", ("i", 4): "INT32", ("i", 8): "INT64",
    ("u", 1): "UINT8", ("u", 2): "UINT16", ("u", 4): "UINT32", ("u", 8): "UINT64",
    ("f", 2): "FP16", ("f", 4): "FP32", ("f", 8): "FP64",
}


class TensorSpecLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...


@dataclasses.dataclass(frozen=True)
class Column:
    """One logical column: its values' KServe datatype ("" when none fits: a slicing feature only),
    its per-row shape (-1: list lengths differ), and the file's columns that hold it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    split: bool = False

    def describe(self) -> str:
        return f"{self.datatype or 'unsupported type'} {list(self.shape)}"


@dataclasses.dataclass(frozen=True)
class DatasetSchema:
    num_rows: int
    columns: tuple[Column, ...]

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


@dataclasses.dataclass(frozen=True)
class Fit:
    """How a data set maps onto a model: its input columns (by input name), labels and slicing features."""

    inputs: dict[str, Column]
    labels: tuple[Column, ...]
    features: tuple[Column, ...]


def row_shape(spec: TensorSpecLike, where: str) -> tuple[int, ...]:
    """The shape of one example of an input: the signature's shape without its first (example) dimension."""
    shape = tuple(int(d) for d in spec.shape)
    if not shape or shape[0] not in (-1, 1):
        raise InvalidArgument(f"input {spec.name!r} of {where} has shape {list(shape)}: evaluation needs its first "
                              "dimension to be the examples (-1, or 1 for one example per call)")
    if any(d < 0 for d in shape[1:]):
        raise InvalidArgument(f"input {spec.name!r} of {where} has a variable dimension in {list(shape)}: "
                              "evaluation batches examples, so each example needs a fixed shape")
    return shape[1:]


# --- reading what a file holds -------------------------------------------------------------------

def inspect(path: str | Path, fmt: DatasetFormat) -> DatasetSchema:
    """The columns and row count of a data set file; InvalidArgument when it is not a readable one."""
    if fmt is DatasetFormat.NPZ:
        return _inspect_npz(Path(path))
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - the eval extra is part of dev
        raise InvalidArgument("reading Parquet and CSV data sets needs pyarrow: pip install 'aiaas[eval]'") from None
    try:
        if fmt is DatasetFormat.PARQUET:
            return _inspect_parquet(Path(path))
        return _inspect_csv(Path(path))
    except (pa.ArrowException, OSError) as exc:
        raise InvalidArgument(f"the data set is not a readable {fmt.value} file: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def arrow_layout(arrow_type: Any) -> tuple[str, tuple[int, ...]]:
    """(KServe datatype, per-row shape) of an Arrow type; shape -1 for a variable-length list."""
    import pyarrow as pa

    shape: list[int] = []
    while True:
        if pa.types.is_fixed_size_list(arrow_type):
            shape.append(arrow_type.list_size)
        elif pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
            shape.append(-1)
        else:
            break
        arrow_type = arrow_type.value_type
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if -1 in shape[1:]:
        return "", tuple(shape)  # lists of lists of any length: nothing batches them
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_binary(arrow_type) \
            or pa.types.is_large_binary(arrow_type):
        return "BYTES", tuple(shape)
    if pa.types.is_boolean(arrow_type):
        return "BOOL", tuple(shape)
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        dtype = np.dtype(arrow_type.to_pandas_dtype())
        return _NUMPY_TO_KSERVE.get((dtype.kind, dtype.itemsize), ""), tuple(shape)
    return "", tuple(shape)


def _inspect_parquet(path: Path) -> DatasetSchema:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path, pre_buffer=False)  # see reader.py: bounded memory
    columns = []
    variable = []
    for field in parquet.schema_arrow:
        datatype, shape = arrow_layout(field.type)
        columns.append(Column(field.name, datatype, shape, (field.name,)))
        if shape[:1] == (-1,) and datatype:
            variable.append(field.name)
    if variable:
        lengths = _list_lengths(parquet.iter_batches(batch_size=SCAN_BATCH_ROWS, columns=variable), variable)
        columns = [dataclasses.replace(c, shape=(lengths[c.name], *c.shape[1:])) if c.name in lengths else c
                   for c in columns]
    return DatasetSchema(parquet.metadata.num_rows, _group_split_columns(columns))


def _list_lengths(batches: Iterable[Any], names: Sequence[str]) -> dict[str, int]:
    """Per variable-list column, its one list length, or -1 when rows differ (one pass, bounded batches)."""
    import pyarrow.compute as pc

    seen: dict[str, set[int]] = {name: set() for name in names}
    for batch in batches:
        for name in names:
            if len(seen[name]) > 1:
                continue
            found = pc.unique(pc.list_value_length(batch.column(name)).drop_null()).to_pylist()
            seen[name].update(int(v) for v in found)
    return {name: next(iter(lengths)) if len(lengths) == 1 else -1 for name, lengths in seen.items()}


def _inspect_csv(path: Path) -> DatasetSchema:
    import pyarrow.csv as pacsv

    rows = 0
    with pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 20)) as reader:
        schema = reader.schema
        for batch in reader:
            rows += batch.num_rows
    columns = []
    for field in schema:
        datatype, shape = arrow_layout(field.type)
        columns.append(Column(field.name, datatype, shape, (field.name,)))
    return DatasetSchema(rows, _group_split_columns(columns))


def npz_members(path: Path) -> Iterator[tuple[str, zipfile.ZipInfo]]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.filename.endswith(".npy"):
                yield info.filename[:-4], info


def read_npy_header(handle: Any, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of one .npy member, refusing what would need pickle."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        raise InvalidArgument(f"array {name!r} has an unknown .npy format version {version}")
    if dtype.hasobject or dtype.kind == "V":
        raise InvalidArgument(f"array {name!r} holds Python objects or records ({dtype}); only numbers, booleans "
                              "and fixed-width strings are read (never pickle)")
    if not shape:
        raise InvalidArgument(f"array {name!r} is a scalar; each array needs one row per example")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def numpy_datatype(dtype: np.dtype) -> str:
    if dtype.kind in "US":
        return "BYTES"
    return _NUMPY_TO_KSERVE.get((dtype.kind, dtype.itemsize), "")


def _inspect_npz(path: Path) -> DatasetSchema:
    columns = []
    rows: dict[str, int] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name, info in npz_members(path):
                with archive.open(info) as handle:
                    shape, _, dtype = read_npy_header(handle, name)
                rows[name] = shape[0]
                columns.append(Column(name, numpy_datatype(dtype), shape[1:], (name,)))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidArgument(f"the data set is not a readable npz file: {_first_line(exc)}") from None
    if not columns:
        raise InvalidArgument("the npz file holds no arrays")
    if len(set(rows.values())) > 1:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(rows.items()))
        raise InvalidArgument(f"the npz arrays disagree on the number of rows ({counts})")
    return DatasetSchema(next(iter(rows.values())), _group_split_columns(columns))


def _group_split_columns(columns: list[Column]) -> tuple[Column, ...]:
    """Scalar columns NAME[0]..NAME[k-1] of one datatype become one column NAME of shape [k]."""
    names = {c.name for c in columns}
    groups: dict[str, dict[int, Column]] = {}
    for column in columns:
        match = _SPLIT.fullmatch(column.name)
        if match and not column.shape and match["base"] not in names:
            groups.setdefault(match["base"], {})[int(match["index"])] = column
    grouped: set[str] = set()
    out: list[Column] = []
    for column in columns:
        match = _SPLIT.fullmatch(column.name)
        base = match["base"] if match else None
        parts = groups.get(base or "")
        if base is None or not parts or set(parts) != set(range(len(parts))) \
                or len({p.datatype for p in parts.values()}) != 1:
            out.append(column)
            continue
        if base not in grouped:
            grouped.add(base)
            sources = tuple(parts[i].name for i in range(len(parts)))
            out.append(Column(base, column.datatype, (len(parts),), sources, split=True))
    return tuple(out)


# --- fitting a model -----------------------------------------------------------------------------

def dtype_fits(column: str, wanted: str) -> bool:
    if wanted in FLOATS:
        return column in NUMBERS
    if wanted in INTEGERS:
        return column in INTEGERS
    return column == wanted


def shape_fits(column: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    """Same element count, laid out as wanted or flat (reshaped row-major)."""
    if -1 in column:
        return False
    return math.prod(column) == math.prod(wanted) and (column == wanted or len(column) <= 1)


def _missing_input(spec: TensorSpecLike, shape: tuple[int, ...]) -> str:
    count = math.prod(shape)
    hint = f"a column {spec.name!r}"
    if count > 1:
        hint += f" holding {count} values per row, or columns {spec.name}[0]..{spec.name}[{count - 1}]"
    return f"no column for input {spec.name!r} ({spec.datatype}, per-row shape {list(shape)}): add {hint}"


def fit(schema: DatasetSchema, inputs: Sequence[TensorSpecLike], labels: Sequence[str], where: str) -> Fit:
    """Map the data set onto a model's inputs and the label columns, or raise InvalidArgument listing
    every column that does not fit (`where` names the model version, e.g. "demo version 3")."""
    problems: list[str] = []
    found: dict[str, Column] = {}
    for spec in inputs:
        shape = row_shape(spec, where)
        column = schema.column(spec.name)
        if column is None:
            problems.append(_missing_input(spec, shape))
            continue
        if not dtype_fits(column.datatype, spec.datatype) or not shape_fits(column.shape, shape):
            problems.append(f"column {spec.name!r} does not fit input {spec.name!r}: expected {spec.datatype} "
                            f"with per-row shape {list(shape)}, got {column.describe()}"
                            + (" (rows hold lists of different lengths)" if -1 in column.shape else ""))
            continue
        found[spec.name] = column
    if not labels:
        problems.append("name at least one label column")
    label_columns = []
    for name in labels:
        column = schema.column(name)
        if column is None:
            problems.append(f"no label column {name!r}; the data set has {', '.join(schema.names)}")
        elif name in found:
            problems.append(f"column {name!r} is an input of the model; it cannot be the label too")
        elif column.shape or not column.datatype:
            problems.append(f"label column {name!r} must hold one number or string per row, got {column.describe()}")
        else:
            label_columns.append(column)
    if problems:
        raise InvalidArgument(f"the data set does not fit {where}: " + "; ".join(problems))
    taken = set(found) | set(labels)
    features = tuple(c for c in schema.columns if c.name not in taken)
    return Fit(found, tuple(label_columns), features)
