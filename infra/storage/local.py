"""Object store on a local directory: the embedded default (one machine, no server).

A key maps to the relative path of the same name under ``root``. Writes go to a temp file in
``root/.weightsmith-tmp`` (same file system), are fsynced, then renamed into place, so a
reader never sees half a file and a crash leaves at most a stray temp file. Conditional
creates use ``link(2)``, which fails atomically when the target exists.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat as stat_mod
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from infra.storage.base import (
    CHUNK,
    IntegrityError,
    InvalidKey,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageUnavailable,
    check_key,
    check_prefix,
    fsync_dir,
    integrity_message,
    normalize_sha256,
)

TMP_DIR = ".weightsmith-tmp"  # reserved top-level name, never a key
_RETRIES = 5  # a concurrent delete_prefix may remove a parent folder we just created


class LocalObjectStore(ObjectStore):
    """Objects as files under ``root`` (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.location = self.root.as_uri()
        self._tmp = self.root / TMP_DIR
        self._tmp.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    # -- keys and paths -------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        check_key(key)
        if key.split("/", 1)[0] == TMP_DIR:
            raise InvalidKey(f"object key {key!r}: {TMP_DIR!r} is reserved by the local store")
        return self.root / key

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _info(self, key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        if not stat_mod.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"object {key!r} not found in {self.location}")
        return ObjectInfo(
            key=key,
            size=st.st_size,
            etag=f"{st.st_size:x}-{st.st_mtime_ns:x}",
            last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
        )

    # -- writes ---------------------------------------------------------------------------

    def _temp(self) -> Path:
        return self._tmp / f"{uuid.uuid4().hex}.part"

    def _commit(self, tmp: Path, dest: Path, key: str, *, if_absent: bool) -> None:
        """Move a complete temp file to ``dest`` (retrying if its folder vanishes meanwhile)."""
        place: Callable[[Path, Path], None] = os.link if if_absent else os.replace
        for attempt in range(_RETRIES):
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                place(tmp, dest)
                break
            except FileExistsError as e:
                if if_absent and dest.is_file():
                    raise ObjectExists(f"object {key!r} already exists in {self.location}") from e
                raise self._conflict(key) from e
            except (NotADirectoryError, IsADirectoryError) as e:
                raise self._conflict(key) from e
            except FileNotFoundError:
                if attempt == _RETRIES - 1:
                    raise
        fsync_dir(dest.parent)

    def _conflict(self, key: str) -> InvalidKey:
        return InvalidKey(
            f"object key {key!r} clashes with another key in {self.location}: a local store "
            "cannot hold both 'a/b' and 'a/b/c'; choose keys that are not prefixes of others"
        )

    def put_file(self, key: str, path: Path, *, sha256: str | None = None) -> ObjectInfo:
        dest = self._path(key)
        expected = normalize_sha256(sha256)
        tmp = self._temp()
        digest = hashlib.sha256()
        try:
            with Path(path).open("rb") as src, tmp.open("wb") as out:
                while block := src.read(CHUNK):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            if expected is not None and actual != expected:
                raise IntegrityError(integrity_message(f"file {str(path)!r}", expected, actual))
            self._commit(tmp, dest, key, if_absent=False)
        finally:
            tmp.unlink(missing_ok=True)
        info = self._info(key, dest)
        return ObjectInfo(info.key, info.size, info.etag, info.last_modified, actual)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        dest = self._path(key)
        tmp = self._temp()
        try:
            with tmp.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            self._commit(tmp, dest, key, if_absent=if_absent)
        finally:
            tmp.unlink(missing_ok=True)
        info = self._info(key, dest)
        return ObjectInfo(
            info.key, info.size, info.etag, info.last_modified, hashlib.sha256(data).hexdigest()
        )

    # -- reads ----------------------------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise ObjectNotFound(f"object {key!r} not found in {self.location}") from e

    def get_stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        f = self.open(key)  # raises now, not at the first next()
        return _chunks(f, chunk_size)

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            return self._info(key, path)
        except (FileNotFoundError, NotADirectoryError, ObjectNotFound):
            return None

    def _walk(self, folder: Path) -> Iterator[Path]:
        """Files below ``folder`` in key order: a folder sorts as its name plus '/'."""
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        ordered = sorted(entries, key=lambda e: e.name + "/" if e.is_dir() else e.name)
        for entry in ordered:
            if entry.is_dir(follow_symlinks=False):
                if Path(entry.path) != self._tmp:
                    yield from self._walk(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                yield Path(entry.path)

    def _folder_of(self, prefix: str) -> Path:
        check_prefix(prefix)
        head = prefix.rpartition("/")[0]
        return self.root / head if head else self.root

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for path in self._walk(self._folder_of(prefix)):
            key = self._key(path)
            if key.startswith(prefix):
                try:
                    yield self._info(key, path)
                except FileNotFoundError:  # deleted while listing
                    continue

    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        folder = self._folder_of(prefix)
        for path in self._walk_dirs(folder):
            sub = self._key(path) + "/"
            if sub.startswith(prefix) and next(self._walk(path), None) is not None:
                yield sub

    def _walk_dirs(self, folder: Path) -> Iterator[Path]:
        try:
            entries = sorted(e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in entries:
            if folder / name != self._tmp:
                yield folder / name

    # -- deletes --------------------------------------------------------------------------

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise InvalidKey("delete_prefix needs a non-empty prefix (refusing to empty the store)")
        count = 0
        for info in list(self.list(prefix)):
            path = self.root / info.key
            try:
                path.unlink()
                count += 1
            except FileNotFoundError:
                continue
            self._prune(path.parent)
        return count

    def _prune(self, folder: Path) -> None:
        """Remove folders left empty, up to the root, so listings match S3's."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    # -- the rest -------------------------------------------------------------------------

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        self._path(key)
        return None

    def ping(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(
                f"artifact directory {str(self.root)!r} is missing or not writable: create it "
                "or fix its permissions (or point the object store URL elsewhere)"
            )
        free = shutil.disk_usage(self.root).free
        if free == 0:
            raise StorageUnavailable(f"artifact directory {str(self.root)!r} has no free space")


def _chunks(f: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with f:
        while block := f.read(chunk_size):
            yield block
