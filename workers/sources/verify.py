"""Integrity checks of downloaded files against the Hub's metadata."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

CHUNK_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True)
class Expected:
    """What the Hub says about a file: size, and sha256 (LFS) or git blob sha1 (small files)."""

    size: int | None
    sha256: str | None = None
    blob_id: str | None = None


@dataclass(frozen=True)
class Digests:
    size: int
    sha256: str
    git_sha1: str


class Mismatch(Exception):
    def __init__(self, what: str, actual: str, expected: str) -> None:
        super().__init__(f"{what} {actual} differs from the Hub's {expected}")
        self.what = what
        self.actual = actual
        self.expected = expected


# Files already verified in this process, keyed by identity and modification time, so resolving the
# same model twice does not hash gigabytes twice.
_verified: dict[tuple[str, int, int, int, Expected], str] = {}
_verified_lock = threading.Lock()


def digest_file(path: Path) -> Digests:
    """sha256 and git blob sha1 of a file, streamed in 8 MiB chunks."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    git = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            sha256.update(chunk)
            git.update(chunk)
    return Digests(size=size, sha256=sha256.hexdigest(), git_sha1=git.hexdigest())


def verify_file(path: Path, expected: Expected) -> str:
    """Check ``path`` against ``expected``; return its sha256. Raises ``Mismatch``."""
    st = path.stat()
    if expected.size is not None and st.st_size != expected.size:
        raise Mismatch("size", f"{st.st_size} bytes", f"{expected.size} bytes")
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, expected)
    with _verified_lock:
        known = _verified.get(key)
    if known is not None:
        return known
    d = digest_file(path)
    if expected.sha256 is not None and d.sha256 != expected.sha256.lower():
        raise Mismatch("sha256", d.sha256, expected.sha256.lower())
    if expected.sha256 is None and expected.blob_id is not None and d.git_sha1 != expected.blob_id:
        raise Mismatch("git blob sha1", d.git_sha1, expected.blob_id)
    with _verified_lock:
        _verified[key] = d.sha256
    return d.sha256


def remove_cached(path: Path) -> None:
    """Delete a file of an HF cache snapshot and the blob its symlink points to."""
    try:
        target = path.resolve() if path.is_symlink() else None
    except OSError:
        target = None
    for p in (path, target):
        if p is None:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
