"""Secrets at rest: what the database holds encrypted, and the keys that open it.

Tenants' Hugging Face tokens, the secret keys of S3 grants and webhook signing secrets are
stored *sealed*: ``enc:v1:`` followed by a Fernet token (AES-128-CBC with an HMAC-SHA256,
from the maintained ``cryptography`` package). A copy of the database alone gives none of
them away.

The keys come from ``WEIGHTSMITH_SECRET_KEYS`` (comma-separated Fernet keys, newest first:
the first seals, every one opens, so a key is rotated by putting the new one in front,
running ``weightsmith secrets rotate`` and then dropping the old one). Without that
setting, the embedded default keeps one key in ``<data dir>/secret-key`` (mode 0600, made
on first use); every process sharing a database must then share that file, so deployments
with several hosts set the variable instead.

A stored value without the ``enc:v1:`` prefix is a secret written before encryption
existed: it is still read, and sealed by the next ``rotate`` (the service also seals such
values at start).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

if TYPE_CHECKING:
    from infra.settings import Settings

SEALED_PREFIX = "enc:v1:"
KEY_FILE_NAME = "secret-key"

_cache_lock = threading.Lock()
_boxes: dict[tuple[str, ...], SecretBox] = {}


class SecretKeyError(ValueError):
    """A key that is not a Fernet key, or a sealed value no configured key opens."""


def new_key() -> str:
    """A fresh key for ``WEIGHTSMITH_SECRET_KEYS`` (urlsafe base64 of 32 random bytes)."""
    return Fernet.generate_key().decode()


def _fernet(key: str, position: int) -> Fernet:
    try:
        raw = base64.urlsafe_b64decode(key.encode())
        if len(raw) != 32:
            raise ValueError
        return Fernet(key.encode())
    except (ValueError, binascii.Error):
        raise SecretKeyError(
            f"WEIGHTSMITH_SECRET_KEYS: key {position + 1} is not a Fernet key (urlsafe base64 "
            "of 32 bytes); make one with 'weightsmith secrets new-key'"
        ) from None


class SecretBox:
    """Seals and opens secrets with the configured keys (the first key seals)."""

    def __init__(self, keys: Sequence[str]) -> None:
        keys = [k.strip() for k in keys if k.strip()]
        if not keys:
            raise SecretKeyError("no secret key configured (WEIGHTSMITH_SECRET_KEYS)")
        self._fernet = MultiFernet([_fernet(k, i) for i, k in enumerate(keys)])

    def __repr__(self) -> str:
        return "SecretBox(***)"

    @staticmethod
    def is_sealed(stored: str) -> bool:
        return stored.startswith(SEALED_PREFIX)

    def seal(self, plaintext: str) -> str:
        token = self._fernet.encrypt(plaintext.encode())
        return SEALED_PREFIX + token.decode()

    def open(self, stored: str) -> str:
        """The plaintext of a stored value (a legacy plaintext value is returned as is)."""
        if not self.is_sealed(stored):
            return stored
        try:
            return self._fernet.decrypt(stored[len(SEALED_PREFIX) :].encode()).decode()
        except InvalidToken:
            raise SecretKeyError(
                "a stored secret cannot be opened with the configured keys: every process "
                "sharing this database needs the same WEIGHTSMITH_SECRET_KEYS (or the same "
                "<data dir>/secret-key), and a rotated-out key must stay listed until "
                "'weightsmith secrets rotate' has run"
            ) from None

    def reseal(self, stored: str) -> str:
        """``stored`` sealed with the first key (legacy plaintext included)."""
        if not self.is_sealed(stored):
            return self.seal(stored)
        try:
            token = self._fernet.rotate(stored[len(SEALED_PREFIX) :].encode())
        except InvalidToken:
            self.open(stored)  # raises the explanatory error
            raise
        return SEALED_PREFIX + token.decode()

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        """The box for these settings: ``WEIGHTSMITH_SECRET_KEYS``, else the key file in
        the data directory (created on first use). One box per key set per process."""
        if settings.secret_keys is not None:
            keys = tuple(k for k in settings.secret_keys.get_secret_value().split(",") if k.strip())
        else:
            keys = (read_or_create_key_file(settings.data_dir / KEY_FILE_NAME),)
        with _cache_lock:
            box = _boxes.get(keys)
            if box is None:
                box = _boxes[keys] = cls(keys)
        return box


def read_or_create_key_file(path: Path) -> str:
    """The key in ``path``, made (mode 0600, atomically, race-safe) if the file is absent."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = new_key()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def private_directory(path: Path) -> Path:
    """Make ``path`` (and missing parents) a directory only its owner can enter (0700).

    The data directory holds the database, the artifacts of every tenant and the key file:
    an existing one with wider permissions is narrowed.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 if it is absent; narrow it to 0600 if not."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    return path
