"""Content-addressed artifact store: one file per distinct content at <root>/sha256/ab/cdef...

A multi-file version (a checkpoint directory) is one blob per file plus one for its manifest.

An upload goes to a temporary file under <root>/tmp (same file system), hashed as it is
written, fsynced, and renamed into place only once its hash is known to match; identical
content already stored is kept and the temporary file dropped. Reads verify the hash.

Replicas may share the directory: the registry places and removes blob files only inside the
database transaction that records or forgets their references (RegistryStore.create_version and
collect_blob), never under a lock of this process alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path

from aiaas import manifest
from aiaas.manifest import ManifestFile
from services.common.errors import Aborted, DataLoss, InvalidArgument

log = logging.getLogger("aiaas.registry.artifacts")

UPLOAD_PREFIX = "upload-"
UPLOAD_SUFFIX = ".part"
# How often a multi-file upload touches its completed files, well within any upload_stale_after_s.
TOUCH_EVERY_S = 10.0


class PendingArtifact:
    """An upload in progress: write chunks, `seal`, `place` (inside the version's transaction), then `discard`
    (which also drops a copy the store did not need); `commit` does the three at once."""

    def __init__(self, store: ArtifactStore, expected_sha256: str, expected_size: int, label: str = "") -> None:
        self.store = store
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        # Names the file in messages ("file 'config.json'") when it is one of a version's files.
        self.label = label
        self.size = 0
        self._hash = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, suffix=UPLOAD_SUFFIX, dir=store.tmp_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        # Whether `place` moved this upload's file into the store (else the content was there already).
        self.placed = False
        store._track(self)

    def write(self, chunk: bytes | memoryview) -> None:
        if self.size + len(chunk) > self.expected_size:
            raise InvalidArgument(f"received more than the declared artifact_size of {self.expected_size} bytes")
        self._file.write(chunk)
        # Reach the file now, so its mtime shows a live upload to the sweepers of every replica.
        self._file.flush()
        self._hash.update(chunk)
        self.size += len(chunk)

    def verify(self, check_content: Callable[[Path], None] | None = None) -> None:
        """Size and sha256 as declared, then `check_content` (the artifact gate) on the complete file.

        Whatever this raises means nothing is stored; the caller discards the upload.
        """
        if self.size != self.expected_size:
            if self.label:
                raise InvalidArgument(f"the stream ended after {self.size} bytes of {self.label}, whose listed size "
                                      f"is {self.expected_size}; nothing was stored")
            raise InvalidArgument(f"the stream ended after {self.size} bytes, but artifact_size declared "
                                  f"{self.expected_size}; nothing was stored")
        digest = self._hash.hexdigest()
        if digest != self.expected_sha256:
            raise InvalidArgument(f"{self.label or 'artifact'} sha256 mismatch: declared {self.expected_sha256}, "
                                  f"received {digest}; nothing was stored")
        self._file.flush()
        if check_content is not None:
            check_content(self.path)

    def seal(self) -> None:
        """Verify and make durable; the temporary file stays (and is spared by sweepers) until `discard`."""
        self.verify()
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()

    def place(self) -> None:
        """Move the sealed file into the store unless the content is there already (then `placed` stays False).

        The caller holds what keeps the blob from being removed meanwhile (its row, in the registry)."""
        if not self._file.closed:
            raise RuntimeError("seal the upload before placing it")
        target = self.store.path_for(self.expected_sha256)
        if target.is_file():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.path, target)
        except FileNotFoundError:
            raise Aborted("this upload's temporary file was removed (the upload was cancelled, or another "
                          "replica's sweeper saw it untouched longer than upload_stale_after_s); nothing was "
                          "stored: retry the upload") from None
        self.placed = True
        _fsync_dir(target.parent)

    def placed_blobs(self) -> list[str]:
        """The blobs `place` put into the store (to remove again if the version does not commit)."""
        return [self.expected_sha256] if self.placed else []

    def commit(self) -> bool:
        """Seal, place and discard at once (no other writer); returns True when the content was already stored."""
        self.seal()
        self.place()
        self.discard()
        return not self.placed

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.store._untrack(self)
        self.path.unlink(missing_ok=True)


class PendingFiles:
    """An upload of a multi-file version: its manifest (known from the header) and the listed files, whose
    bytes arrive one file after the other. The same steps as `PendingArtifact`, over all of them at once."""

    def __init__(self, store: ArtifactStore, manifest_sha256: str, manifest_bytes: bytes,
                 files: Sequence[ManifestFile], *, touch_every_s: float = TOUCH_EVERY_S) -> None:
        self.store = store
        self.files = tuple(files)
        self.touch_every_s = touch_every_s
        self._parts: list[PendingArtifact] = []
        self._manifest = store.begin(manifest_sha256, len(manifest_bytes))
        self._manifest.write(manifest_bytes)
        self._touched = time.monotonic()

    @property
    def placed(self) -> bool:
        return any(part.placed for part in self._all())

    def _all(self) -> list[PendingArtifact]:
        return [self._manifest, *self._parts]

    def _open_next(self) -> PendingArtifact:
        listed = self.files[len(self._parts)]
        part = self.store.begin(listed.sha256, listed.size, label=f"file {listed.path!r}")
        self._parts.append(part)
        return part

    def write(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        while view:
            part = self._parts[-1] if self._parts else None
            if part is None or part.size == part.expected_size:
                if len(self._parts) == len(self.files):
                    raise InvalidArgument(f"received more bytes than the listed files hold "
                                          f"({manifest.total_size(self.files)} in all); nothing was stored")
                part = self._open_next()
            room = part.expected_size - part.size
            part.write(view[:room])
            view = view[room:]
        self._keep_alive()

    def _keep_alive(self) -> None:
        """Touch the files already complete, so that other replicas' sweepers (which judge by age) spare them
        while later files arrive."""
        now = time.monotonic()
        if now - self._touched < self.touch_every_s:
            return
        self._touched = now
        for part in self._all()[:-1]:
            with contextlib.suppress(FileNotFoundError):  # `place` reports it
                os.utime(part.path)

    def verify(self, check_content: Callable[[Mapping[str, Path]], None] | None = None) -> None:
        """Every file's size and sha256 as listed, then `check_content` on {path in the version: file on disk}."""
        while len(self._parts) < len(self.files):
            self._open_next()
        for part in self._all():
            part.verify()
        if check_content is not None:
            check_content({listed.path: part.path for listed, part in zip(self.files, self._parts, strict=True)})

    def seal(self) -> None:
        self.verify()
        for part in self._all():
            part.seal()

    def place(self) -> None:
        for part in self._all():
            part.place()

    def placed_blobs(self) -> list[str]:
        return [sha for part in self._all() for sha in part.placed_blobs()]

    def discard(self) -> None:
        for part in self._all():
            part.discard()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # Uploads of this process not yet discarded; weak, so a leaked one is swept like a dead replica's.
        self._live: weakref.WeakSet[PendingArtifact] = weakref.WeakSet()
        self._live_lock = threading.Lock()

    def _track(self, pending: PendingArtifact) -> None:
        with self._live_lock:
            self._live.add(pending)

    def _untrack(self, pending: PendingArtifact) -> None:
        with self._live_lock:
            self._live.discard(pending)

    def live_uploads(self) -> set[Path]:
        """Temporary files of this process's uploads in progress."""
        with self._live_lock:
            return {pending.path for pending in list(self._live)}

    def path_for(self, sha256: str) -> Path:
        return self.blob_dir / sha256[:2] / sha256[2:]

    def begin(self, expected_sha256: str, expected_size: int, label: str = "") -> PendingArtifact:
        return PendingArtifact(self, expected_sha256, expected_size, label)

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def remove(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)

    def read(self, sha256: str, size: int, chunk_size: int, offset: int = 0) -> Iterator[bytes]:
        """Yield the artifact in chunks from `offset`; raise DataLoss at the end when it no longer matches.

        Read from 0 it is checked against its hash; from an offset (a resumed download) only its size is,
        since the bytes before it are not read: the client verifies the whole file.
        """
        path = self.path_for(sha256)
        digest = hashlib.sha256()
        total = offset
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise DataLoss(f"artifact {sha256} is missing from the artifact store") from None
        with handle:
            handle.seek(offset)
            while chunk := handle.read(chunk_size):
                if not offset:
                    digest.update(chunk)
                total += len(chunk)
                yield chunk
        if total != size or (not offset and digest.hexdigest() != sha256):
            log.error("artifact %s is corrupt (size %d, expected %d)", sha256, total, size)
            raise DataLoss(f"artifact {sha256} is corrupt in the artifact store (size {total}, expected {size})")

    def clean_stale_uploads(self, older_than_s: float, spare: Collection[Path] = ()) -> int:
        """Remove upload temporary files untouched for `older_than_s`, except those in `spare`.

        Other replicas sharing this directory may be uploading now: their files are told apart by age
        only, so `older_than_s` must stay well above the idle timeout after which an upload is aborted.
        """
        removed = 0
        cutoff = time.time() - older_than_s
        for path in self.tmp_dir.glob(f"{UPLOAD_PREFIX}*{UPLOAD_SUFFIX}"):
            if path in spare:
                continue
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed %d stale upload file(s) untouched for over %gs from %s", removed, older_than_s,
                     self.tmp_dir)
        return removed

    def sweep_dead_uploads(self, older_than_s: float) -> int:
        """`clean_stale_uploads`, sparing the uploads this process is still writing."""
        return self.clean_stale_uploads(older_than_s, spare=self.live_uploads())
