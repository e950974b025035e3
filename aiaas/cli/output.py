"""Shared CLI output: tables for people, JSON for scripts, a progress bar, error lines.

    from aiaas.cli import output
    output.add_json_flag(parser)
    ...
    output.emit(args, rows, ["name", "version"])      # table, or JSON with --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import IO, Any, Self

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def jsonable(value: Any) -> Any:
    """Protobuf messages, datetimes, bytes, mappings and sequences as plain JSON values."""
    if isinstance(value, struct_pb2.Struct):
        # Struct keeps every number as a double: show whole numbers (versions, sizes) as integers.
        return _whole_numbers(json_format.MessageToDict(value))
    if isinstance(value, Message):
        return json_format.MessageToDict(value, preserving_proto_field_name=True)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def print_json(value: Any, file: IO[str] | None = None) -> None:
    print(json.dumps(jsonable(value), indent=2, sort_keys=True), file=file or sys.stdout)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], file: IO[str] | None = None) -> None:
    """Left-aligned columns with an upper-case header; '(none)' when there are no rows."""
    out = file or sys.stdout
    if not rows:
        print("(none)", file=out)
        return
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [[c.upper() for c in columns], *cells]
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip(), file=out)


def emit(args: argparse.Namespace, rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
         file: IO[str] | None = None) -> None:
    if getattr(args, "json", False):
        print_json(list(rows), file)
    else:
        print_table(rows, columns, file)


def print_fields(fields: Mapping[str, Any], file: IO[str] | None = None) -> None:
    """`key: value` lines, keys aligned (one record for people)."""
    width = max((len(k) for k in fields), default=0)
    for key, value in fields.items():
        print(f"{key + ':':<{width + 1}} {_cell(value)}", file=file or sys.stdout)


def error(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


class ProgressBar:
    """A `(done, total)` callback drawing one line on a terminal; silent when not a terminal."""

    def __init__(self, label: str, file: IO[str] | None = None, width: int = 30, min_interval_s: float = 0.1) -> None:
        self.label = label
        self.file = file or sys.stderr
        self.width = width
        self.min_interval_s = min_interval_s
        self.enabled = self.file.isatty()
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < self.min_interval_s and done < total):
            return
        self._last = now
        fraction = done / total if total else 1.0
        filled = int(self.width * fraction)
        bar = "#" * filled + "." * (self.width - filled)
        self.file.write(f"\r{self.label} [{bar}] {fraction:4.0%} {human_bytes(done)}/{human_bytes(total)}")
        self.file.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.file.write("\n")
            self.file.flush()
            self._drawn = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
