"""Assembling a multi-file version (a checkpoint) on disk from a DownloadFiles stream, resumably.

Each file is written to a hidden partial file beside its final name (`.NAME.part`), hashed as it
arrives and renamed into place only once its size and sha256 match the version's manifest. A
partial file left by an interrupted download is where the next download resumes: its bytes are
hashed again, and the registry sends the rest from that offset.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from aiaas import manifest
from aiaas.errors import DataLoss, FailedPrecondition, Internal
from aiaas.registry.v1 import registry_pb2 as pb

PARTIAL_SUFFIX = ".part"

Progress = Callable[[int, int], None]


def partial_path(final: Path) -> Path:
    """Where a file's bytes gather until it is verified: hidden, so directory scans skip it."""
    return final.with_name(f".{final.name}{PARTIAL_SUFFIX}")


class FilesDownload:
    """One download of `version`'s files into `dest`: `resume_point`, then `receive` each message, `finish`."""

    def __init__(self, version: pb.ModelVersion, dest: Path, progress: Progress | None = None) -> None:
        self.version = version
        self.dest = dest
        self.progress = progress
        self.total = sum(f.size for f in version.files)
        self.received = 0
        self._files = {f.path: f for f in version.files}
        self._current: pb.ArtifactFile | None = None
        self._handle: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._done: set[str] = set()
        self._check_dest()

    def _check_dest(self) -> None:
        if self.dest.exists() and not self.dest.is_dir():
            raise FailedPrecondition(f"{self.dest} exists and is not a directory")
        self.dest.mkdir(parents=True, exist_ok=True)
        foreign = sorted(set(manifest.files_in(self.dest)) - set(self._files))
        if foreign:
            raise FailedPrecondition(
                f"{self.dest} holds files that are not part of version {self.version.version} of model "
                f"{self.version.model!r} ({', '.join(foreign[:3])}); download into a new or empty directory")

    def resume_point(self) -> tuple[str, int] | None:
        """The (file, offset) to start from: files already complete and intact are kept; None when all are."""
        for listed in self.version.files:
            final = self.dest / listed.path
            if final.is_file() and manifest.hash_file(final) == (listed.sha256, listed.size):
                self._done.add(listed.path)
                self._advance(listed.size)
                continue
            partial = partial_path(final)
            offset = partial.stat().st_size if partial.is_file() else 0
            if offset > listed.size:
                partial.unlink()
                offset = 0
            return listed.path, offset
        return None

    def _advance(self, count: int) -> None:
        self.received += count
        if self.progress is not None:
            self.progress(self.received, self.total)

    def receive(self, message: pb.DownloadFilesResponse) -> None:
        kind = message.WhichOneof("payload")
        if kind == "version":
            if message.version.artifact_sha256 != self.version.artifact_sha256:
                raise Internal("the download is of another version than the one asked for")
        elif kind == "file":
            self._start(message.file.path, message.file.offset)
        elif kind == "chunk":
            if self._handle is None:
                raise Internal("the download sent data before naming its file")
            self._handle.write(message.chunk)
            self._hash.update(message.chunk)
            self._advance(len(message.chunk))

    def _start(self, path: str, offset: int) -> None:
        self._complete()
        listed = self._files.get(path)
        if listed is None:
            raise Internal(f"the download sent file {path!r}, which the version does not list")
        partial = partial_path(self.dest / listed.path)
        partial.parent.mkdir(parents=True, exist_ok=True)
        self._hash = hashlib.sha256()
        if offset:
            self._hash_prefix(partial, offset)
        handle = partial.open("r+b" if offset else "wb")
        handle.seek(offset)
        handle.truncate()
        self._current, self._handle = listed, handle
        self._advance(offset)

    def _hash_prefix(self, partial: Path, offset: int) -> None:
        remaining = offset
        with partial.open("rb") as before:
            while remaining:
                block = before.read(min(manifest.READ_BYTES, remaining))
                if not block:
                    raise DataLoss(f"{partial} is shorter than the offset {offset} the download resumes at")
                self._hash.update(block)
                remaining -= len(block)

    def _complete(self) -> None:
        """Verify the file being written and rename it into place; a mismatch removes it."""
        listed, handle = self._current, self._handle
        if listed is None or handle is None:
            return
        self._current = self._handle = None
        size = handle.tell()
        handle.close()
        partial = partial_path(self.dest / listed.path)
        if size != listed.size or self._hash.hexdigest() != listed.sha256:
            partial.unlink(missing_ok=True)
            raise DataLoss(f"downloaded file {listed.path!r} does not match its sha256 {listed.sha256} ({size} "
                           f"bytes, expected {listed.size}); its partial copy was removed: download again")
        os.replace(partial, self.dest / listed.path)
        self._done.add(listed.path)

    def finish(self) -> None:
        self._complete()
        missing = [f.path for f in self.version.files if f.path not in self._done]
        if missing:
            raise Internal(f"the download ended before file {missing[0]!r}")

    def close(self) -> None:
        """Leave the partial file where it is (the next download resumes it), closed."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
