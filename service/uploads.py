"""Uploads: a tenant's own files, received in resumable chunks, published as an artifact version.

Everything lives in the object store (no database table), so any API replica can take any
chunk and nothing needs migrating. Layout::

    _uploads/{tenant}/{id}/upload.json                     the declaration (written once)
    _uploads/{tenant}/{id}/part/{i:05d}/{start:015d}.{tok}  a received chunk of file i
    _uploads/{tenant}/{id}/part/{i:05d}/{start:015d}.commit marker: tok is the chunk at start
    _uploads/{tenant}/{id}/complete/{n:06d}.lease|.beat|.end  completion attempt n
    _uploads/{tenant}/{id}/published.json                  the version it became

Why this shape:

- The prefix starts with ``_``; a tenant's artifacts live under ``{tenant}/`` and artifact
  tenants match ``^[a-z0-9]``, so staging can never collide with a published artifact.
- A chunk is stored under a key of its own, then *committed* by creating its ``.commit``
  marker with a conditional create (``if_absent``). Of two chunks racing for the same offset
  (a client retrying while its first try is still in flight) exactly one commits; the other
  is deleted and answered 409. The committed markers only ever grow, so a file's offset (the
  length of its chain of committed chunks from 0) never goes backwards. One listing gives
  every file's offset; a marker is read only when two chunks share a start.
- A chunk is all or nothing: a body shorter than announced stores nothing, and the client
  resends the chunk (at most the chunk cap is lost).
- Completing assembles each file from its chunks into a temporary folder while hashing it
  (bounded memory), compares size and sha256 with the declaration, and publishes the folder
  with :func:`infra.artifacts.publish_artifact` under the upload id as its job id, so a
  retried completion returns the same version. A mismatch publishes nothing and discards
  that file's chunks, so the client can send it again.
- One completion runs at a time: it holds a lease (``complete/{n}.lease``, created with
  ``if_absent``) and beats it from a thread. A lease without a beat for
  :data:`LEASE_STALE_S` belongs to a crashed process and may be taken over.
- An upload expires ``expiry_s`` after its last write of any kind (creation, a chunk, a lease
  beat, publication); it then answers 404 and :func:`sweep_expired_uploads` deletes it.

Nothing here imports torch: the API calls it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import tempfile
import threading
import uuid
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import weightsmith
from infra.artifacts import (
    ArtifactError,
    ArtifactVersion,
    check_name,
    compute_recipe_hash,
    list_versions,
    publish_artifact,
    read_manifest,
    version_prefix,
    write_manifest,
)
from infra.settings import Settings
from infra.storage.base import (
    InvalidKey,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    check_key,
)
from schemas.manifests import MANIFEST_FORMAT, Manifest
from schemas.uploads import UPLOAD_ID, UploadCreate, UploadFile, UploadState

log = logging.getLogger("weightsmith.uploads")

STAGING = "_uploads/"
SESSION = "upload.json"
PUBLISHED = "published.json"
FORMAT = "weightsmith.upload/1"
LEASE_STALE_S = 120.0  # a completion that has not beaten for this long has crashed
HEARTBEAT_S = 15.0
SWEEP_EVERY_S = 300.0  # how often the API sweeps expired uploads (see app/routes/uploads.py)
_PART = re.compile(r"^(\d{5})/(\d{15})\.([0-9a-f]{12}|commit)$")
_LEASE = re.compile(r"^(\d{6})\.(lease|beat|end)$")


# -- errors --------------------------------------------------------------------------------


class UploadError(Exception):
    """An upload request that cannot be carried out; the message says why and what to do."""


class UploadNotFound(UploadError, LookupError):
    """No such upload of this tenant (never created, aborted, expired, or another's)."""


class UploadRefused(UploadError):
    """This tenant cannot upload at all (its name cannot own artifacts)."""


class InvalidDeclaration(UploadError):
    """The declared files break a cap or a rule; ``problems`` pairs JSON Pointers and why."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        shown = "; ".join(f"{p}: {m}" for p, m in problems[:3])
        super().__init__(shown + ("; …" if len(problems) > 3 else ""))
        self.problems = list(problems)


class TooManyUploads(UploadError):
    """The tenant already holds the most open uploads allowed; ``open_ids`` lists them."""

    def __init__(self, message: str, open_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.open_ids = list(open_ids)


class UploadConflict(UploadError):
    """The upload is not in a state for this: a chunk at the wrong offset (``offset`` is the
    one expected), a completion running, already published, or files still incomplete."""

    def __init__(
        self,
        message: str,
        *,
        offset: int | None = None,
        incomplete: Sequence[dict[str, Any]] = (),
    ) -> None:
        super().__init__(message)
        self.offset = offset
        self.incomplete = list(incomplete)


class ChunkRejected(UploadError):
    """A chunk whose headers or body are wrong (400), or too large (``too_large``: 413)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class FileMismatch:
    index: int
    path: str
    declared_size: int
    received_size: int
    declared_sha256: str
    received_sha256: str


class ChecksumMismatch(UploadError):
    """Received bytes differ from the declaration; nothing was published (``mismatches``)."""

    def __init__(self, mismatches: Sequence[FileMismatch]) -> None:
        parts = [
            f"file {m.path!r}: declared sha256 {m.declared_sha256} ({m.declared_size} bytes), "
            f"received {m.received_sha256} ({m.received_size} bytes)"
            for m in mismatches
        ]
        super().__init__(
            "; ".join(parts)
            + ". Nothing was published; the received bytes of "
            + ("this file were" if len(mismatches) == 1 else "these files were")
            + " discarded: send the right bytes again from offset 0 (or fix the declared "
            "sha256 in a new upload) and complete again"
        )
        self.mismatches = list(mismatches)


# -- caps and values -----------------------------------------------------------------------


@dataclass(frozen=True)
class UploadCaps:
    """The limits of uploads, from the settings (``WEIGHTSMITH_MAX_UPLOAD_*`` and friends)."""

    max_files: int
    max_file_bytes: int
    max_total_bytes: int
    max_chunk_bytes: int
    expiry_s: int
    max_open: int

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadCaps:
        return cls(
            max_files=settings.max_upload_files,
            max_file_bytes=min(settings.max_upload_file_bytes, settings.max_upload_bytes),
            max_total_bytes=settings.max_upload_bytes,
            max_chunk_bytes=settings.max_upload_chunk_bytes,
            expiry_s=settings.upload_expiry,
            max_open=settings.max_open_uploads,
        )


@dataclass(frozen=True)
class _Part:
    start: int
    size: int
    key: str


@dataclass(frozen=True)
class UploadSession:
    """What was declared when the upload was created (``upload.json``)."""

    id: str
    tenant: str
    artifact_name: str
    description: str | None
    files: tuple[UploadFile, ...]
    created_at: datetime

    @property
    def prefix(self) -> str:
        return upload_prefix(self.tenant, self.id)

    def index_of(self, path: str) -> int | None:
        return next((i for i, f in enumerate(self.files) if f.path == path), None)


@dataclass(frozen=True)
class Upload:
    """An upload as it stands: its declaration, each file's offset, its state."""

    session: UploadSession
    offsets: tuple[int, ...]
    state: UploadState
    last_write: datetime
    expires_at: datetime
    published: ArtifactVersion | None
    chains: tuple[tuple[_Part, ...], ...]
    objects: tuple[ObjectInfo, ...]

    @property
    def incomplete(self) -> list[dict[str, Any]]:
        return [
            {"path": f.path, "size": f.size, "offset": off}
            for f, off in zip(self.session.files, self.offsets, strict=True)
            if off < f.size
        ]


def upload_prefix(tenant: str, upload_id: str) -> str:
    return f"{STAGING}{tenant}/{upload_id}/"


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _checked_tenant(tenant: str) -> str:
    try:
        return check_name(tenant, "tenant")
    except ArtifactError as e:
        raise UploadRefused(
            f"tenant {tenant!r} cannot own artifacts, so it cannot upload: {e}; ask the "
            "operator for a key of a tenant named with lowercase letters, digits, '.', '_', '-'"
        ) from e


# -- creating ------------------------------------------------------------------------------


def declaration_problems(
    request: UploadCreate, caps: UploadCaps, tenant: str
) -> list[tuple[str, str]]:
    """The caps and cross-file rules the schema cannot check, as (JSON Pointer, why)."""
    problems: list[tuple[str, str]] = []
    files = request.files
    if len(files) > caps.max_files:
        problems.append(
            ("/files", f"{len(files)} files declared; an upload may have at most {caps.max_files}")
        )
    total = sum(f.size for f in files)
    if total > caps.max_total_bytes:
        problems.append(
            (
                "/files",
                f"{total} bytes declared in all; an upload may have at most "
                f"{caps.max_total_bytes} (split it into several artifacts)",
            )
        )
    first: dict[str, int] = {}
    for i, f in enumerate(files):
        if f.size > caps.max_file_bytes:
            problems.append(
                (
                    f"/files/{i}/size",
                    f"file {f.path!r} has {f.size} bytes; a file may have at most "
                    f"{caps.max_file_bytes} (save the checkpoint in smaller shards)",
                )
            )
        if f.path in first:
            problems.append(
                (f"/files/{i}/path", f"{f.path!r} is declared twice (also /files/{first[f.path]})")
            )
        first.setdefault(f.path, i)
    for i, f in enumerate(files):
        parts = f.path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in first:
                problems.append(
                    (
                        f"/files/{i}/path",
                        f"{folder!r} is declared as a file (/files/{first[folder]}) and is also "
                        f"a folder of {f.path!r}",
                    )
                )
        try:  # the key it will have once published, with a version number to spare
            check_key(version_prefix(tenant, request.artifact_name, 10**9) + f.path)
        except (InvalidKey, ArtifactError) as e:
            problems.append((f"/files/{i}/path", str(e)))
    return problems


def create_upload(
    store: ObjectStore,
    tenant: str,
    request: UploadCreate,
    caps: UploadCaps,
    *,
    now: datetime | None = None,
) -> Upload:
    """Record a new upload of ``request.files`` for ``tenant``; nothing is received yet."""
    _checked_tenant(tenant)
    problems = declaration_problems(request, caps, tenant)
    if problems:
        raise InvalidDeclaration(problems)
    open_ids = open_uploads(store, tenant, caps, now=now)
    if len(open_ids) >= caps.max_open:
        raise TooManyUploads(
            f"tenant {tenant!r} already has {len(open_ids)} open uploads, the most allowed: "
            f"complete or abort one first ({', '.join(open_ids[:5])})",
            open_ids,
        )
    created = _now(now).replace(microsecond=0)  # as upload.json records it
    session = UploadSession(
        id=f"up_{uuid.uuid4().hex}",
        tenant=tenant,
        artifact_name=request.artifact_name,
        description=request.description,
        files=tuple(request.files),
        created_at=created,
    )
    doc = {
        "format": FORMAT,
        "id": session.id,
        "tenant": tenant,
        "artifact_name": session.artifact_name,
        "description": session.description,
        "files": [f.model_dump() for f in session.files],
        "created_at": _iso(created),
    }
    info = store.put_bytes(session.prefix + SESSION, _dumps(doc), if_absent=True)
    last = info.last_modified or created
    return Upload(
        session=session,
        offsets=tuple(0 for _ in session.files),
        state="open",
        last_write=last,
        expires_at=last + timedelta(seconds=caps.expiry_s),
        published=None,
        chains=tuple(() for _ in session.files),
        objects=(info,),
    )


def open_uploads(
    store: ObjectStore, tenant: str, caps: UploadCaps, *, now: datetime | None = None
) -> list[str]:
    """Ids of the tenant's uploads that are neither published nor expired."""
    found: list[str] = []
    base = f"{STAGING}{tenant}/"
    for sub in store.list_prefixes(base):
        upload_id = sub[len(base) :].rstrip("/")
        try:
            if inspect_upload(store, tenant, upload_id, caps, now=now).state != "published":
                found.append(upload_id)
        except UploadNotFound:
            continue
        except UploadError:  # an unreadable record: it counts, the tenant can abort it
            found.append(upload_id)
    return sorted(found)


# -- reading the state ---------------------------------------------------------------------


def inspect_upload(
    store: ObjectStore,
    tenant: str,
    upload_id: str,
    caps: UploadCaps,
    *,
    now: datetime | None = None,
) -> Upload:
    """The upload as it stands (one listing, plus its declaration and publication record).

    Raises :class:`UploadNotFound` for an unknown, malformed, aborted or expired id; another
    tenant's id is unknown here (the lookup is under this tenant's prefix)."""
    if not isinstance(upload_id, str) or not UPLOAD_ID.match(upload_id):
        raise UploadNotFound(f"upload {upload_id!r} does not exist")
    _checked_tenant(tenant)
    prefix = upload_prefix(tenant, upload_id)
    objects = tuple(store.list(prefix))
    if not any(o.key == prefix + SESSION for o in objects):
        raise UploadNotFound(f"upload {upload_id!r} does not exist")
    moment = _now(now)
    stamps = [o.last_modified for o in objects if o.last_modified is not None]
    last = max(stamps) if stamps else moment
    expires = last + timedelta(seconds=caps.expiry_s)
    if moment >= expires:
        raise UploadNotFound(
            f"upload {upload_id!r} expired at {_iso(expires)} ({caps.expiry_s} s after its "
            "last write); start a new upload"
        )
    session = _read_session(store, tenant, upload_id)
    published = _read_published(store, session, objects)
    chains = _chains(store, session, objects)
    if published is not None:  # its chunks are gone: every file was received whole
        offsets = tuple(f.size for f in session.files)
    else:
        offsets = tuple(sum(p.size for p in chain) for chain in chains)
    state: UploadState = "open"
    if published is not None:
        state = "published"
    elif _lease_active(objects, prefix, moment):
        state = "completing"
    return Upload(session, offsets, state, last, expires, published, chains, objects)


def _read_session(store: ObjectStore, tenant: str, upload_id: str) -> UploadSession:
    key = upload_prefix(tenant, upload_id) + SESSION
    try:
        doc = json.loads(store.get_bytes(key))
        return UploadSession(
            id=upload_id,
            tenant=tenant,
            artifact_name=str(doc["artifact_name"]),
            description=doc.get("description"),
            files=tuple(UploadFile.model_validate(f) for f in doc["files"]),
            created_at=datetime.fromisoformat(str(doc["created_at"]).replace("Z", "+00:00")),
        )
    except ObjectNotFound as e:  # aborted between the listing and this read
        raise UploadNotFound(f"upload {upload_id!r} does not exist") from e
    except (ValueError, KeyError, TypeError) as e:
        raise UploadError(f"upload {upload_id!r}: its record {key!r} is unreadable: {e}") from e


def _read_published(
    store: ObjectStore, session: UploadSession, objects: Iterable[ObjectInfo]
) -> ArtifactVersion | None:
    key = session.prefix + PUBLISHED
    info = next((o for o in objects if o.key == key), None)
    if info is None:
        return None
    try:
        version = int(json.loads(store.get_bytes(key))["version"])
    except (ObjectNotFound, ValueError, KeyError, TypeError):
        return None
    return ArtifactVersion(session.tenant, session.artifact_name, version, info.last_modified)


def _chains(
    store: ObjectStore, session: UploadSession, objects: Iterable[ObjectInfo]
) -> tuple[tuple[_Part, ...], ...]:
    """Each file's committed chunks in order, from offset 0 up to the first gap."""
    base = session.prefix + "part/"
    commits: set[tuple[int, int]] = set()
    candidates: dict[tuple[int, int], list[tuple[str, ObjectInfo]]] = {}
    for info in objects:
        if not info.key.startswith(base):
            continue
        m = _PART.match(info.key[len(base) :])
        if m is None:
            continue
        at = (int(m.group(1)), int(m.group(2)))
        if m.group(3) == "commit":
            commits.add(at)
        else:
            candidates.setdefault(at, []).append((m.group(3), info))
    chains: list[tuple[_Part, ...]] = []
    for index in range(len(session.files)):
        chain: list[_Part] = []
        pos = 0
        while (index, pos) in commits:
            chosen = _committed(store, base, index, pos, candidates.get((index, pos), []))
            if chosen is None or chosen.size == 0:
                break
            chain.append(_Part(pos, chosen.size, chosen.key))
            pos += chosen.size
        chains.append(tuple(chain))
    return tuple(chains)


def _committed(
    store: ObjectStore, base: str, index: int, start: int, found: list[tuple[str, ObjectInfo]]
) -> ObjectInfo | None:
    """The chunk the commit marker at (index, start) names: the only candidate, or the one
    the marker's token picks when a losing racer has not been deleted yet."""
    if len(found) == 1:
        return found[0][1]
    if not found:
        return None
    try:
        token = json.loads(store.get_bytes(f"{base}{index:05d}/{start:015d}.commit"))["token"]
    except (ObjectNotFound, ValueError, KeyError, TypeError):
        return None
    return next((info for tok, info in found if tok == token), None)


def _leases(objects: Iterable[ObjectInfo], prefix: str) -> dict[int, dict[str, ObjectInfo]]:
    base = prefix + "complete/"
    leases: dict[int, dict[str, ObjectInfo]] = {}
    for info in objects:
        if info.key.startswith(base):
            m = _LEASE.match(info.key[len(base) :])
            if m:
                leases.setdefault(int(m.group(1)), {})[m.group(2)] = info
    return leases


def _lease_active(objects: Iterable[ObjectInfo], prefix: str, now: datetime) -> bool:
    leases = _leases(objects, prefix)
    if not leases:
        return False
    latest = leases[max(leases)]
    if "lease" not in latest or "end" in latest:
        return False
    beats = [i.last_modified for i in latest.values() if i.last_modified is not None]
    return not beats or (now - max(beats)).total_seconds() < LEASE_STALE_S


# -- receiving chunks ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkTarget:
    """Where a chunk goes, checked before its body is read: ``start`` is the file's offset;
    the body must have exactly ``length`` bytes if given, else 1 to ``max_length``."""

    session: UploadSession
    index: int
    start: int
    length: int | None
    max_length: int

    @property
    def file(self) -> UploadFile:
        return self.session.files[self.index]


def prepare_chunk(
    store: ObjectStore,
    tenant: str,
    upload_id: str,
    path: str,
    *,
    start: int,
    length: int | None,
    total: int | None,
    caps: UploadCaps,
    now: datetime | None = None,
) -> ChunkTarget:
    """Check that a chunk of ``path`` starting at ``start`` may be sent now.

    ``length`` and ``total`` come from ``Content-Range`` when the client sent one."""
    up = inspect_upload(store, tenant, upload_id, caps, now=now)
    session = up.session
    index = session.index_of(path)
    if index is None:
        names = ", ".join(repr(f.path) for f in session.files[:10])
        raise UploadNotFound(f"upload {upload_id!r} has no file {path!r} (its files: {names})")
    _check_open(up)
    size = session.files[index].size
    offset = up.offsets[index]
    if total is not None and total != size:
        raise ChunkRejected(
            f"Content-Range says file {path!r} has {total} bytes; it was declared with {size}"
        )
    if offset >= size:
        raise UploadConflict(
            f"file {path!r} is complete ({size} of {size} bytes); send the next file or "
            "complete the upload",
            offset=offset,
        )
    if start != offset:
        raise UploadConflict(
            f"file {path!r}: the chunk starts at byte {start}, but {offset} bytes are stored; "
            f"send the chunk that starts at {offset}",
            offset=offset,
        )
    if length is not None and start + length > size:
        raise ChunkRejected(
            f"the chunk ends at byte {start + length}, past the {size} bytes declared for "
            f"file {path!r}"
        )
    if length is not None and length > caps.max_chunk_bytes:
        raise ChunkRejected(
            f"the chunk has {length} bytes; a chunk may have at most {caps.max_chunk_bytes}",
            too_large=True,
        )
    return ChunkTarget(session, index, start, length, min(caps.max_chunk_bytes, size - start))


def _check_open(up: Upload) -> None:
    if up.published is not None:
        raise UploadConflict(
            f"upload {up.session.id!r} is already published as {up.published.reference}"
        )
    if up.state == "completing":
        raise UploadConflict(
            f"upload {up.session.id!r} is being completed; wait for it (GET the upload)"
        )


def commit_chunk(
    store: ObjectStore, target: ChunkTarget, body: Path, *, size: int, sha256: str
) -> int:
    """Store the received chunk ``body`` and commit it at ``target.start``; return the new
    offset. A chunk that lost a race for its offset is deleted and answered with a conflict."""
    base = f"{target.session.prefix}part/{target.index:05d}/{target.start:015d}"
    token = secrets.token_hex(6)
    key = f"{base}.{token}"
    marker = _dumps({"token": token, "size": size, "sha256": sha256})
    try:
        store.put_file(key, body, sha256=sha256)
        store.put_bytes(f"{base}.commit", marker, if_absent=True)
    except ObjectExists as e:
        _delete_quietly(store, key)
        session = target.session
        chain = _chains(store, session, store.list(session.prefix + "part/"))[target.index]
        offset = sum(p.size for p in chain)
        raise UploadConflict(
            f"file {target.file.path!r}: another chunk was stored at byte {target.start} "
            f"meanwhile; {offset} bytes are stored, go on from there",
            offset=offset,
        ) from e
    except BaseException:
        _delete_quietly(store, key)
        raise
    return target.start + size


def _delete_quietly(store: ObjectStore, key: str) -> None:
    with suppress(Exception):  # leftovers are removed with the upload's prefix later
        store.delete_prefix(key)


# -- completing ----------------------------------------------------------------------------


class _Lease:
    """Completion attempt ``number``: beaten from a thread until it ends."""

    def __init__(self, store: ObjectStore, prefix: str, number: int) -> None:
        self.store = store
        self.key = f"{prefix}complete/{number:06d}"
        self.number = number
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{prefix}", daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with suppress(StorageError):  # a lease that does not end goes stale instead
            self.store.put_bytes(self.key + ".end", _dumps({"ended_at": _iso(_now(None))}))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.put_bytes(self.key + ".beat", _dumps({"at": _iso(_now(None))}))
            except StorageError:  # the next beat tries again; staleness takes minutes
                log.warning("upload lease %s: heartbeat failed", self.key, exc_info=True)


def _take_lease(store: ObjectStore, up: Upload, now: datetime) -> tuple[_Lease, bool]:
    """The next completion lease; True with it when an earlier attempt never ended."""
    prefix = up.session.prefix
    if _lease_active(up.objects, prefix, now):
        raise UploadConflict(
            f"upload {up.session.id!r} is being completed by another request; wait for it "
            "(GET the upload until its state is 'published')"
        )
    leases = _leases(up.objects, prefix)
    last = max(leases) if leases else 0
    crashed = bool(leases) and "end" not in leases[last]
    number = last + 1
    body = _dumps({"started_at": _iso(now)})
    try:
        store.put_bytes(f"{prefix}complete/{number:06d}.lease", body, if_absent=True)
    except ObjectExists as e:
        raise UploadConflict(
            f"upload {up.session.id!r} is being completed by another request; wait for it"
        ) from e
    return _Lease(store, prefix, number), crashed


def complete_upload(
    store: ObjectStore,
    tenant: str,
    upload_id: str,
    caps: UploadCaps,
    *,
    now: datetime | None = None,
    work_dir: Path | None = None,
) -> Upload:
    """Verify every file against its declaration and publish the upload as the next version
    of its artifact. Idempotent: a completed upload returns its version again.

    Raises :class:`UploadConflict` while files are incomplete or another completion runs,
    and :class:`ChecksumMismatch` (nothing published) when received bytes differ."""
    up = inspect_upload(store, tenant, upload_id, caps, now=now)
    if up.published is not None:
        return up
    lease, crashed = _take_lease(store, up, _now(now))
    with lease:
        up = inspect_upload(store, tenant, upload_id, caps, now=now)  # as of the lease
        if up.published is not None:
            return up
        if up.incomplete:
            listed = ", ".join(
                f"{f['path']!r} ({f['offset']} of {f['size']} bytes)" for f in up.incomplete[:5]
            )
            raise UploadConflict(
                f"upload {upload_id!r} is not complete: {listed}; send the rest, then complete",
                incomplete=up.incomplete,
            )
        version = _published_by_scan(store, up.session) if crashed else None
        if version is None:
            version = _assemble_and_publish(store, up, work_dir)
        store.put_bytes(
            up.session.prefix + PUBLISHED,
            _dumps({"version": version.version, "reference": version.reference}),
        )
    _delete_quietly(store, up.session.prefix + "part/")
    _delete_quietly(store, up.session.prefix + "complete/")
    return inspect_upload(store, tenant, upload_id, caps, now=now)


def _published_by_scan(store: ObjectStore, session: UploadSession) -> ArtifactVersion | None:
    """The version an earlier, crashed completion of this upload published, if any."""
    for v in reversed(list_versions(store, session.tenant, session.artifact_name)):
        block = read_manifest(store, session.tenant, session.artifact_name, v.version).get("upload")
        if isinstance(block, dict) and block.get("id") == session.id:
            return v
    return None


def _assemble_and_publish(store: ObjectStore, up: Upload, work_dir: Path | None) -> ArtifactVersion:
    session = up.session
    with tempfile.TemporaryDirectory(prefix=f"weightsmith-{session.id}-", dir=work_dir) as tmp:
        root = Path(tmp) / "version"
        mismatches: list[FileMismatch] = []
        for i, f in enumerate(session.files):
            target = root / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            size, digest = _assemble(store, session, up.chains[i], target)
            if size != f.size or digest != f.sha256:
                mismatches.append(FileMismatch(i, f.path, f.size, size, f.sha256, digest))
        if mismatches:
            for m in mismatches:
                _delete_quietly(store, f"{session.prefix}part/{m.index:05d}/")
            raise ChecksumMismatch(mismatches)
        files = [f.model_dump() for f in session.files]
        manifest = Manifest.model_validate(
            {
                "format": MANIFEST_FORMAT,
                "kind": "upload",
                "name": session.artifact_name,
                **({"description": session.description} if session.description else {}),
                "code_version": weightsmith.__version__,
                "created_at": _iso(_now(None)),
                "upload": {
                    "id": session.id,
                    "uploaded_by": {"tenant": session.tenant},
                    "created_at": _iso(session.created_at),
                },
                "parents": [],
                "files": files,
            }
        )
        write_manifest(root, manifest)
        digest = compute_recipe_hash(kind="upload", recipe={"files": files}, parents=[], seed=None)
        return publish_artifact(
            store,
            session.tenant,
            session.artifact_name,
            root,
            job_id=session.id,
            recipe_hash=digest,
        )


def _assemble(
    store: ObjectStore, session: UploadSession, chain: Sequence[_Part], target: Path
) -> tuple[int, str]:
    """Concatenate a file's chunks into ``target``; its size and sha256 (streamed)."""
    digest = hashlib.sha256()
    size = 0
    with target.open("wb") as out:
        for part in chain:
            try:
                for block in store.get_stream(part.key):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
            except ObjectNotFound as e:
                raise UploadConflict(
                    f"upload {session.id!r} changed while it was being completed (aborted?)"
                ) from e
    return size, digest.hexdigest()


# -- aborting and sweeping -----------------------------------------------------------------


def abort_upload(
    store: ObjectStore,
    tenant: str,
    upload_id: str,
    caps: UploadCaps,
    *,
    now: datetime | None = None,
) -> None:
    """Delete the upload and everything it staged (a published version stays)."""
    try:
        up = inspect_upload(store, tenant, upload_id, caps, now=now)
    except UploadNotFound:
        raise
    except UploadError:  # its record is unreadable: nothing there is worth keeping
        store.delete_prefix(upload_prefix(tenant, upload_id))
        return
    if up.state == "completing":
        raise UploadConflict(f"upload {upload_id!r} is being completed; it cannot be aborted now")
    store.delete_prefix(up.session.prefix)


def sweep_expired_uploads(
    store: ObjectStore, expiry_s: float, *, now: datetime | None = None
) -> list[str]:
    """Delete every upload (of any tenant) not written to for ``expiry_s``; their prefixes.

    A completion in progress beats its lease, which counts as a write, so it is never swept;
    leftovers without a declaration (a chunk that landed after an abort) go the same way."""
    moment = _now(now)
    swept: list[str] = []
    for tenant_prefix in store.list_prefixes(STAGING):
        for prefix in store.list_prefixes(tenant_prefix):
            try:
                stamps = [o.last_modified for o in store.list(prefix) if o.last_modified]
                if stamps and (moment - max(stamps)).total_seconds() >= expiry_s:
                    store.delete_prefix(prefix)
                    swept.append(prefix)
            except StorageError:
                log.warning("sweeping upload %s failed", prefix, exc_info=True)
    return swept
