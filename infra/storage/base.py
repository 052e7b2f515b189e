"""The object-store interface shared by the service and the workers, and its errors.

Keys are ``/``-separated relative names (``tenant/name/v3/config.json``). Both backends check
them with :func:`check_key` so that a key that works on the local directory also works on S3
and the other way round: no absolute keys, no ``.``/``..`` or empty segments, no backslashes
or control characters. Prefixes (for listing and deleting) are plain string prefixes, as in
S3: ``list("a/v1")`` also yields ``a/v10/...``; end a prefix with ``/`` to mean a folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20  # read/write granularity of streamed transfers
MAX_KEY_BYTES = 1024  # S3's limit on the UTF-8 length of a key
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class StorageError(Exception):
    """An object-store operation failed; the message says which key and what to do."""


class ObjectNotFound(StorageError, LookupError):
    """The key does not exist."""


class ObjectExists(StorageError):
    """A conditional create (``if_absent=True``) found the key already there."""


class IntegrityError(StorageError):
    """Bytes did not match the sha256 they were expected to have; nothing was stored."""


class InvalidKey(StorageError, ValueError):
    """A key or prefix that could escape the store or differs between backends."""


class StorageUnavailable(StorageError):
    """The store cannot be reached or used (endpoint down, bucket missing, root unwritable)."""


class BucketNotFound(StorageUnavailable):
    """The bucket does not exist (for the artifact store: a configuration problem)."""


class AccessDenied(StorageUnavailable):
    """The server refused the credentials or the operation (403 and its relatives)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object without reading it.

    ``etag`` is opaque: S3's ETag (the MD5 of single-part uploads only) or, locally, size and
    modification time. ``sha256`` is set where the store knows it cheaply (after an upload,
    or when the S3 server kept a whole-object SHA-256 checksum), else None.
    """

    key: str
    size: int
    etag: str
    last_modified: datetime | None = None
    sha256: str | None = None


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe, portable object key, else raise :class:`InvalidKey`."""
    if not isinstance(key, str) or not key:
        raise InvalidKey("an object key must be a non-empty string")
    if key.startswith("/") or key.endswith("/"):
        raise InvalidKey(f"object key {key!r} must not start or end with '/'")
    if _BAD_CHARS.search(key):
        raise InvalidKey(f"object key {key!r} contains a backslash or a control character")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(f"object key {key!r} has an empty, '.' or '..' segment")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidKey(f"object key {key[:60]!r}... is longer than {MAX_KEY_BYTES} bytes")
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if its complete segments are valid keys (see :func:`check_key`)."""
    if not isinstance(prefix, str):
        raise InvalidKey("a key prefix must be a string")
    if prefix.startswith("/"):
        raise InvalidKey(f"key prefix {prefix!r} must be relative (no leading '/')")
    head, _, tail = prefix.rpartition("/")
    if head:
        check_key(head)
    if tail in (".", "..") or _BAD_CHARS.search(tail):
        raise InvalidKey(f"key prefix {prefix!r} ends in '.', '..' or has a bad character")
    return prefix


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """The lower-case hex sha256 of a file, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def normalize_sha256(value: str | None) -> str | None:
    """Lower-case hex sha256 or None; rejects anything else early (a typo is not a digest)."""
    if value is None:
        return None
    v = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", v):
        raise ValueError(f"{value!r} is not a hex sha256 digest (64 hex characters)")
    return v


def integrity_message(what: str, expected: str, actual: str | None) -> str:
    got = f"got {actual}" if actual else "the server computed a different digest"
    return (
        f"{what}: sha256 mismatch (expected {expected}, {got}); nothing was stored. "
        "The source changed or is corrupt: recreate it and try again"
    )


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ObjectStore(ABC):
    """Immutable-blob storage: what the job service and the workers need, nothing more.

    Writes are all-or-nothing: a failed or rejected write leaves no object behind (and
    does not change an existing one). Reads stream; no method holds a whole object in memory
    except :meth:`put_bytes` / :meth:`get_bytes`, which are meant for small metadata.
    """

    #: human-readable location for messages (``file:///...`` or ``s3://bucket/prefix``)
    location: str

    @abstractmethod
    def put_file(self, key: str, path: Path, *, sha256: str | None = None) -> ObjectInfo:
        """Upload the file at ``path`` to ``key``, streaming it.

        With ``sha256`` the bytes are checked against it, and on mismatch
        :class:`IntegrityError` is raised and nothing is stored.
        """

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        """Store small ``data`` at ``key``.

        ``if_absent=True`` is an atomic create: it raises :class:`ObjectExists` when the key
        already exists, and of concurrent creators exactly one succeeds.
        """

    @abstractmethod
    def get_stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Chunks of the object; raises :class:`ObjectNotFound` at call time if missing."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable binary file object for ``key`` (close it, or use ``with``)."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size, etag and modification time of ``key``, or None if it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``.

        The order is the backend's: AWS S3 and the local store give UTF-8 byte order, but
        SeaweedFS lists folder by folder (``a/x`` before ``a-b``); sort if order matters.
        """

    @abstractmethod
    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        """The "sub-folders" right below ``prefix``: S3's CommonPrefixes for delimiter '/'.

        ``list_prefixes("t/")`` yields ``"t/a/"``, ``"t/b/"``, ... without listing every
        object under them. A folder whose objects were all deleted may still show up for a
        while on some servers (SeaweedFS removes emptied folders asynchronously), so treat
        the result as candidates and check what matters (e.g. a manifest) with ``stat``.
        """

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix``; return how many.

        An empty prefix is refused: deleting a whole store is never what a caller means.
        """

    @abstractmethod
    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        """A URL that GETs ``key`` without credentials until it expires; None if unsupported."""

    @abstractmethod
    def ping(self) -> None:
        """Return if the store is usable, else raise :class:`StorageUnavailable` (readyz)."""

    # -- helpers built on the primitives --------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        """The whole object: for small metadata (manifests, markers) only."""
        return b"".join(self.get_stream(key))

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def download_file(self, key: str, path: Path, *, sha256: str | None = None) -> ObjectInfo:
        """Stream ``key`` to ``path`` atomically (temp file + fsync + rename).

        With ``sha256`` the downloaded bytes are checked; on mismatch :class:`IntegrityError`
        is raised and ``path`` is left untouched.
        """
        expected = normalize_sha256(sha256)
        path = Path(path)
        tmp = path.parent / f".{path.name}.download-{uuid.uuid4().hex[:12]}"
        digest = hashlib.sha256()
        size = 0
        try:
            with tmp.open("wb") as f:
                for chunk in self.get_stream(key):
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            actual = digest.hexdigest()
            if expected is not None and actual != expected:
                raise IntegrityError(
                    integrity_message(f"object {key!r} in {self.location}", expected, actual)
                )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return ObjectInfo(key=key, size=size, etag="", sha256=actual)
