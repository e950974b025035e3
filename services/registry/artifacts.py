"""Content-addressed artifact store: one file per distinct content at <root>/sha256/ab/cdef...

An upload goes to a temporary file under <root>/tmp (same file system), hashed as it is
written, fsynced, and renamed into place only once its hash is known to match; identical
content already stored is kept and the temporary file dropped. Reads verify the hash.

Replicas may share the directory: the registry places and removes blob files only inside the
database transaction that records or forgets their references (RegistryStore.create_version and
collect_blob), never under a lock of this process alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from services.common.errors import Aborted, DataLoss, InvalidArgument

log = logging.getLogger("aiaas.registry.artifacts")

UPLOAD_PREFIX = "upload-"
UPLOAD_SUFFIX = ".part"


class PendingArtifact:
    """An upload in progress: write chunks, `seal`, `place` (inside the version's transaction), then `discard`
    (which also drops a copy the store did not need); `commit` does the three at once."""

    def __init__(self, store: ArtifactStore, expected_sha256: str, expected_size: int) -> None:
        self.store = store
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        self.size = 0
        self._hash = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, suffix=UPLOAD_SUFFIX, dir=store.tmp_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        # Whether `place` moved this upload's file into the store (else the content was there already).
        self.placed = False
        store._track(self)

    def write(self, chunk: bytes) -> None:
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
            raise InvalidArgument(f"the stream ended after {self.size} bytes, but artifact_size declared "
                                  f"{self.expected_size}; nothing was stored")
        digest = self._hash.hexdigest()
        if digest != self.expected_sha256:
            raise InvalidArgument(f"artifact sha256 mismatch: declared {self.expected_sha256}, received {digest}; "
                                  "nothing was stored")
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

    def begin(self, expected_sha256: str, expected_size: int) -> PendingArtifact:
        return PendingArtifact(self, expected_sha256, expected_size)

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def remove(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)

    def read(self, sha256: str, size: int, chunk_size: int) -> Iterator[bytes]:
        """Yield the artifact in chunks; raise DataLoss at the end when it no longer matches its hash."""
        path = self.path_for(sha256)
        digest = hashlib.sha256()
        total = 0
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise DataLoss(f"artifact {sha256} is missing from the artifact store") from None
        with handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
                total += len(chunk)
                yield chunk
        if total != size or digest.hexdigest() != sha256:
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
