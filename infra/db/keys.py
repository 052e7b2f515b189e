"""Tenants and their API keys.

A key reads ``wsk_<prefix>_<secret>``: 10 hex digits of public prefix (shown in listings and
logs) and 64 hex digits (256 bits) of secret, by whose sha256 the key is found. Only the
secret's sha256 is stored; the plaintext is shown once, when the key is made. A plain
sha256 is enough (no slow password hash): the secret is random, not chosen by a person, so it
cannot be guessed from its hash.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from infra.db.models import ApiKey, Tenant

if TYPE_CHECKING:
    from infra.settings import Settings

log = logging.getLogger("weightsmith.keys")

KEY_SCHEME = "wsk"
_KEY = re.compile(r"^wsk_(?P<prefix>[0-9a-f]{10})_(?P<secret>[0-9a-f]{64})$")
_CACHE_ENTRIES = 10_000  # keys remembered by authenticate (cleared when full)


class InvalidApiKey(ValueError):
    """A string that is not of the form wsk_<10 hex digits>_<64 hex digits>."""


@dataclass(frozen=True)
class ApiKeyInfo:
    """What may be shown about a key: never its secret."""

    prefix: str
    tenant: str
    created_at: datetime
    revoked_at: datetime | None


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_api_key(plaintext: str) -> tuple[str, str]:
    """(prefix, secret) of a well-formed key; raises InvalidApiKey."""
    m = _KEY.match(plaintext.strip())
    if m is None:
        raise InvalidApiKey("an API key reads wsk_<10 hex digits>_<64 hex digits>")
    return m["prefix"], m["secret"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ApiKeys:
    """Tenants and API keys in the job store's database."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = _utcnow,
        cache_seconds: float = 0.0,
    ) -> None:
        """``cache_seconds``: how long :meth:`authenticate` may answer from memory for a key
        it has looked up (the API: a database round trip saved on every request). A key
        revoked through this object is dropped at once; one revoked by another process
        stops working within that time. 0: always ask the database."""
        self.engine = engine
        self._clock = clock
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, str, Tenant | None]] = {}
        self._cache_lock = threading.Lock()

    def ensure_tenant(self, name: str) -> Tenant:
        """The tenant called ``name``, created if new."""
        if not 1 <= len(name) <= 100:
            raise ValueError(f"a tenant name has 1 to 100 characters, got {len(name)}")
        for _ in range(3):
            with self._sessions() as s:
                tenant = s.scalar(select(Tenant).where(Tenant.name == name))
            if tenant is not None:
                return tenant
            try:
                with self._sessions.begin() as s:
                    tenant = Tenant(name=name, created_at=self._clock())
                    s.add(tenant)
                return tenant
            except IntegrityError:
                continue  # created concurrently: read it
        raise RuntimeError(f"could not create tenant {name!r}")

    def create_key(self, tenant_name: str) -> str:
        """A new key for the tenant (created if new). The plaintext is returned only here."""
        tenant = self.ensure_tenant(tenant_name)
        for _ in range(5):
            prefix, secret = secrets.token_hex(5), secrets.token_hex(32)
            try:
                with self._sessions.begin() as s:
                    self._insert(s, tenant.id, prefix, secret)
            except IntegrityError:
                continue  # prefix collision (1 in 10^12 per key): draw again
            return f"{KEY_SCHEME}_{prefix}_{secret}"
        raise RuntimeError("could not draw an unused key prefix")

    def register_key(self, tenant_name: str, plaintext: str) -> bool:
        """Store a key made elsewhere (e.g. a deployment secret). False if its prefix is
        already known, revoked or not: a revoked key is never brought back."""
        prefix, secret = parse_api_key(plaintext)
        tenant = self.ensure_tenant(tenant_name)
        try:
            with self._sessions.begin() as s:
                if s.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) is not None:
                    return False
                self._insert(s, tenant.id, prefix, secret)
        except IntegrityError:
            return False
        return True

    def create_first_key(self, tenant_name: str) -> str | None:
        """A key for the tenant if the database holds none at all, else None; a race between
        processes starting together makes one key."""
        tenant = self.ensure_tenant(tenant_name)
        prefix, secret = secrets.token_hex(5), secrets.token_hex(32)
        with self._sessions.begin() as s:
            if s.get_bind().dialect.name == "postgresql":
                s.execute(select(func.pg_advisory_xact_lock(0x77736B6579)))  # "wskey"
            if s.scalar(select(func.count()).select_from(ApiKey)):
                return None
            self._insert(s, tenant.id, prefix, secret)
        return f"{KEY_SCHEME}_{prefix}_{secret}"

    def authenticate(self, plaintext: str) -> Tenant | None:
        """The tenant owning this key; None for a malformed, unknown or revoked key, or a key
        of a disabled tenant.

        The key is looked up by its secret's sha256, not by its public prefix, so the work
        done is the same whether or not the prefix exists: the answer time says nothing
        about which prefixes are real. A cached answer is used only for a key that was valid.
        """
        try:
            prefix, secret = parse_api_key(plaintext)
        except InvalidApiKey:
            return None
        digest = _secret_hash(secret)
        now = time.monotonic()
        cached = self._cache.get(digest) if self._cache_seconds > 0 else None
        if cached is not None and now - cached[0] < self._cache_seconds:
            _, stored_prefix, owner = cached
        else:
            with self._sessions() as s:
                row = s.execute(
                    select(ApiKey.prefix, ApiKey.revoked_at, Tenant)
                    .join(Tenant, Tenant.id == ApiKey.tenant_id)
                    .where(ApiKey.secret_sha256 == digest)
                ).one_or_none()
            if row is None:
                return None
            stored_prefix = row.prefix
            live = row.revoked_at is None and row.Tenant.disabled_at is None
            owner = row.Tenant if live else None
            if self._cache_seconds > 0:
                with self._cache_lock:
                    if len(self._cache) >= _CACHE_ENTRIES:
                        self._cache.clear()
                    self._cache[digest] = (now, stored_prefix, owner)
        # A secret is 256 random bits: it alone finds the key; the prefix must agree too.
        return owner if hmac.compare_digest(stored_prefix, prefix) else None

    def forget_cached(self) -> None:
        """Drop every remembered answer (after a tenant was disabled, say)."""
        with self._cache_lock:
            self._cache.clear()

    def revoke_key(self, prefix: str) -> bool:
        """Revoke the key with this prefix (``wsk_`` optional). False if unknown or revoked."""
        prefix = prefix.removeprefix(f"{KEY_SCHEME}_")
        with self._cache_lock:
            for digest in [d for d, entry in self._cache.items() if entry[1] == prefix]:
                del self._cache[digest]
        with self._sessions.begin() as s:
            revoked = s.scalar(
                update(ApiKey)
                .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
                .values(revoked_at=self._clock())
                .returning(ApiKey.id)
            )
        return revoked is not None

    def list_keys(self, tenant_name: str | None = None) -> list[ApiKeyInfo]:
        """Keys (prefix, owner, dates), oldest first; all tenants' when no name is given."""
        query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
        if tenant_name is not None:
            query = query.where(Tenant.name == tenant_name)
        with self._sessions() as s:
            rows = s.execute(query.order_by(ApiKey.created_at, ApiKey.id)).all()
        return [ApiKeyInfo(key.prefix, name, key.created_at, key.revoked_at) for key, name in rows]

    def _insert(self, s: Session, tenant_id: int, prefix: str, secret: str) -> None:
        s.add(
            ApiKey(
                tenant_id=tenant_id,
                prefix=prefix,
                secret_sha256=_secret_hash(secret),
                created_at=self._clock(),
            )
        )
        s.flush()


def bootstrap_api_key(keys: ApiKeys, settings: Settings) -> str | None:
    """At service start: make sure someone can log in. Returns the prefix of a key it added.

    ``WEIGHTSMITH_BOOTSTRAP_API_KEY`` set: that key is registered for the bootstrap tenant
    unless its prefix is known. Otherwise, when the database has no key at all and
    ``WEIGHTSMITH_BOOTSTRAP_KEY_FILE`` is set, a new key is written to that file (mode 0600).
    Only the prefix is logged.
    """
    tenant = settings.bootstrap_tenant
    if settings.bootstrap_api_key is not None:
        plaintext = settings.bootstrap_api_key.get_secret_value()
        if not keys.register_key(tenant, plaintext):
            return None
        prefix = parse_api_key(plaintext)[0]
        log.info("registered the bootstrap API key wsk_%s_… for tenant %r", prefix, tenant)
        return prefix
    if settings.bootstrap_key_file is None:
        return None
    created = keys.create_first_key(tenant)
    if created is None:
        return None
    _write_private(settings.bootstrap_key_file, created + "\n")
    prefix = parse_api_key(created)[0]
    log.warning(
        "no API key existed: created wsk_%s_… for tenant %r and wrote it to %s",
        prefix,
        tenant,
        settings.bootstrap_key_file,
    )
    return prefix


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, atomically (never a half-written key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
