"""The data set formats of aiaas: their names, file suffixes and registry proto values (said once)."""

from __future__ import annotations

import enum
import functools
from pathlib import Path

from aiaas.errors import InvalidArgument
from aiaas.registry.v1 import evaluation_pb2


class DatasetFormat(enum.Enum):
    PARQUET = "parquet"
    CSV = "csv"
    NPZ = "npz"

    @property
    def pb(self) -> evaluation_pb2.DatasetFormat:
        """The `aiaas.registry.v1.DatasetFormat` value: DATASET_FORMAT_<NAME>."""
        return _pb_by_format()[self]

    @classmethod
    def from_pb(cls, value: int) -> DatasetFormat:
        found = {int(v): f for f, v in _pb_by_format().items()}.get(int(value))
        if found is None:
            if not value:
                raise InvalidArgument(f"data set format is required: {', '.join(DATASET_FORMATS)}")
            raise InvalidArgument(f"unknown data set format {value}; expected one of {', '.join(DATASET_FORMATS)}")
        return found

    @classmethod
    def parse(cls, value: str | DatasetFormat) -> DatasetFormat:
        if isinstance(value, DatasetFormat):
            return value
        key = value.strip().lower().lstrip(".")
        try:
            return cls(_ALIASES.get(key, key))
        except ValueError:
            raise InvalidArgument(f"unknown data set format {value!r}; choose one of "
                                  f"{', '.join(DATASET_FORMATS)}") from None

    @classmethod
    def of_path(cls, path: str | Path) -> DatasetFormat:
        """The format a file's suffix names (.parquet/.pq, .csv, .npz)."""
        suffix = Path(path).suffix
        if not suffix:
            raise InvalidArgument(f"cannot tell the format of {str(path)!r} from its name: give --format "
                                  f"({', '.join(DATASET_FORMATS)})")
        return cls.parse(suffix)


_ALIASES = {"pq": "parquet"}


@functools.cache
def _pb_by_format() -> dict[DatasetFormat, evaluation_pb2.DatasetFormat]:
    return {fmt: evaluation_pb2.DatasetFormat.Value("DATASET_FORMAT_" + fmt.name) for fmt in DatasetFormat}


DATASET_FORMATS: tuple[str, ...] = tuple(f.value for f in DatasetFormat)
