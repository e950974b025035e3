"""The manifest of a multi-file artifact (a checkpoint directory): each file's path, sha256 and size.

The registry stores every file as its own content-addressed blob and the manifest as the version's
artifact. `encode` is the one canonical form (sorted, compact JSON), so the SDK and the registry
compute the same sha256 for the same files. Stdlib only: the artifact gate and the client package
read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from aiaas.errors import InvalidArgument

MAX_FILES = 1000
MAX_PATH_CHARS = 255
MAX_DEPTH = 4
READ_BYTES = 4 * 1024 * 1024
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Hidden names ('.cache', '.gitattributes') are not part of a checkpoint: scans skip them.
_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclasses.dataclass(frozen=True, order=True)
class ManifestFile:
    """One file of a multi-file artifact."""

    path: str
    sha256: str
    size: int


def check_path(path: str) -> str:
    """A relative path of '/'-separated names of [A-Za-z0-9._-] (not starting with '.'), at most 4 deep."""
    parts = path.split("/")
    if (not path or len(path) > MAX_PATH_CHARS or len(parts) > MAX_DEPTH
            or not all(_PART_RE.fullmatch(part) for part in parts)):
        raise InvalidArgument(
            f"file path {path[:80]!r} is invalid: use '/'-separated names of A-Z a-z 0-9 . _ - (not starting with "
            f"'.'), at most {MAX_DEPTH} deep and {MAX_PATH_CHARS} characters")
    return path


def check_files(files: Iterable[ManifestFile]) -> tuple[ManifestFile, ...]:
    """The files, validated and sorted by path: the order in which they are stored and streamed."""
    found = sorted(files)
    if not found:
        raise InvalidArgument("a multi-file artifact needs at least one file")
    if len(found) > MAX_FILES:
        raise InvalidArgument(f"the artifact has {len(found)} files; the limit is {MAX_FILES}")
    seen: set[str] = set()
    for item in found:
        check_path(item.path)
        if item.path in seen:
            raise InvalidArgument(f"file {item.path!r} is listed twice")
        seen.add(item.path)
        if not _SHA256_RE.fullmatch(item.sha256):
            raise InvalidArgument(f"file {item.path!r}: sha256 must be 64 lowercase hex characters")
        if item.size < 0:
            raise InvalidArgument(f"file {item.path!r}: size must be >= 0, got {item.size}")
    folders = {"/".join(p.split("/")[:depth]) for p in seen for depth in range(1, p.count("/") + 1)}
    clash = sorted(seen & folders)
    if clash:
        raise InvalidArgument(f"{clash[0]!r} is listed as a file and used as a folder")
    return tuple(found)


def encode(files: Iterable[ManifestFile]) -> bytes:
    """The canonical manifest: compact JSON of the files sorted by path."""
    listed = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in check_files(files)]
    return json.dumps({"files": listed}, sort_keys=True, separators=(",", ":")).encode()


def digest(files: Iterable[ManifestFile]) -> tuple[str, int]:
    """The sha256 and size of the canonical manifest: a multi-file version's artifact_sha256 and artifact_size."""
    data = encode(files)
    return hashlib.sha256(data).hexdigest(), len(data)


def decode(data: bytes) -> tuple[ManifestFile, ...]:
    try:
        listed = json.loads(data)["files"]
        files = [ManifestFile(str(f["path"]), str(f["sha256"]), int(f["size"])) for f in listed]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"not a manifest of files ({exc})") from None
    return check_files(files)


def total_size(files: Iterable[ManifestFile]) -> int:
    return sum(f.size for f in files)


def hash_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """sha256 and size of a file, read in bounded blocks."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(READ_BYTES):
            sha.update(block)
            size += len(block)
    return sha.hexdigest(), size


def files_in(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """The regular files under `directory` by manifest path, hidden names skipped.

    Symbolic links to files are followed (a Hugging Face cache snapshot is made of them); linked
    folders, devices, sockets and pipes are refused.
    """
    root = Path(directory)
    if not root.is_dir():
        raise InvalidArgument(f"{root} is not a directory")
    found: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(root):
        here = Path(folder)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in subfolders:
            if (here / name).is_symlink():
                raise InvalidArgument(f"{here / name} is a symbolic link to a folder; copy the folder in")
        for name in sorted(n for n in names if not n.startswith(".")):
            path = here / name
            try:
                mode = path.stat().st_mode
            except FileNotFoundError:
                raise InvalidArgument(f"{path} is a dangling symbolic link") from None
            if not stat.S_ISREG(mode):
                raise InvalidArgument(f"{path} is not a regular file")
            found[check_path(path.relative_to(root).as_posix())] = path
    if len(found) > MAX_FILES:
        raise InvalidArgument(f"{root} holds {len(found)} files; the limit is {MAX_FILES}")
    return found


def scan(directory: str | os.PathLike[str]) -> tuple[tuple[ManifestFile, ...], dict[str, Path]]:
    """The manifest of a directory (every file hashed) and where each of its files is."""
    located = files_in(directory)
    files = [ManifestFile(path, *hash_file(local)) for path, local in located.items()]
    return check_files(files), located
