"""Immutable, versioned artifacts in an object store.

Layout under a store (every name below is a key prefix)::

    {tenant}/{name}/versions/v{N}.claim   marker: version N is taken (never deleted)
    {tenant}/{name}/v{N}/<files>          the output directory's files, as in its manifest
    {tenant}/{name}/v{N}/manifest.json    written LAST: version N exists once this exists
    {tenant}/{name}/recipes/{hash}.json   index: recipe hash -> first version built from it
    {tenant}/{name}/jobs/{job_id}.json    commit: job id -> its version and that version's
                                          manifest (exactly one version per job)

Why this shape:

- A version number is allocated by creating its claim marker with a conditional create
  (``put_bytes(if_absent=True)``, ``If-None-Match: *`` on S3). Of concurrent publishers
  exactly one gets N; the others move on to N+1. Claims are never deleted, so a number is
  never handed out twice, even after a failed or crashed publish.
- Files go straight under ``v{N}/`` (no copy from a staging prefix: S3 has no rename, and a
  copy would double the traffic of multi-GB shards). Readers only ever look at versions
  whose ``manifest.json`` exists, and the manifest is uploaded after every file has been
  stored and verified, so a partial version is invisible. A failed publish deletes what it
  wrote; a crashed one leaves invisible leftovers that :func:`sweep_incomplete` removes.
- One job, one version, whatever crashed when. A job's publish goes: claim a number, upload
  the files, write the job's *commit* ``jobs/{job_id}.json`` (create-if-absent: the version
  number and the complete manifest), then the manifest, then the recipe index. A retry of
  the job (its worker crashed, or an error) reads the commit first: a committed version is
  completed from it (the manifest written from the committed bytes, the index added) and
  returned, nothing re-uploaded; without a commit the retry publishes afresh under a new
  number, the earlier attempt's number staying an invisible, swept leftover. Of two attempts
  of one job publishing at once, the one whose commit lands first wins and the other
  discards its files and returns the winner's version.
- Each file is uploaded with the sha256 from the output directory's manifest, which the
  store checks (locally, or by the S3 server); :func:`download_artifact` checks them again.
- The published manifest is the output directory's manifest plus an ``"artifact"`` block
  (tenant, name, version, reference, job id, recipe hash, time), so one object describes the
  version completely. Its file entries are unchanged.

Re-submitting the same recipe with the same pinned inputs: when the job is reproducible
(:func:`service.reuse.reusable_recipe_hash`: hub commits and artifact versions only, a
seed), the service
computes that hash from the pinned recipe at submission time, calls
:func:`find_by_recipe_hash`, and answers with the existing version instead of running the
job; the worker passes the same hash to :func:`publish_artifact`. Otherwise the hash is
derived from the manifest by :func:`manifest_recipe_hash` (recipe, pinned parents, seed) and
only indexes the version.

Nothing here imports torch: the API may use the read-side functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from infra.storage.base import (
    IntegrityError,
    InvalidKey,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    check_key,
    sha256_file,
)
from schemas.manifests import MANIFEST, ArtifactRecord, Manifest, ManifestFile

LATEST = "latest"


def input_manifest(folder: Path) -> Path:
    """Where a worker keeps the manifest of an artifact it downloaded to ``folder`` as a job
    input: beside the folder, not in it (the folder holds the model files only)."""
    return folder.with_name(f"{folder.name}.{MANIFEST}")


_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,99}$")  # as artifact:// names in schemas
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)/$")
_CLAIM = re.compile(r"^v([1-9][0-9]*)\.claim$")
_MANIFEST_KEY = re.compile(r"^v([1-9][0-9]*)/manifest\.json$")
MAX_CLAIM_ATTEMPTS = 1000


class ArtifactError(Exception):
    """Publishing or reading an artifact failed; the message says which and what to do."""

    def __init__(self, message: str, *, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


class ArtifactNotFound(ArtifactError, LookupError):
    """No such artifact, or no complete version of it with that number."""


class ArtifactIntegrityError(ArtifactError):
    """A file does not match the sha256 or size its manifest records (``file`` names it)."""


class ManifestError(ArtifactError):
    """An output directory's or a stored manifest is missing or malformed."""


@dataclass(frozen=True)
class ArtifactVersion:
    """One complete (published) version of an artifact."""

    tenant: str
    name: str
    version: int
    published_at: datetime | None = None

    @property
    def prefix(self) -> str:
        return version_prefix(self.tenant, self.name, self.version)

    @property
    def manifest_key(self) -> str:
        return self.prefix + MANIFEST

    @property
    def reference(self) -> str:
        """The pinned model reference of this version, as recipes write it."""
        return f"artifact://{self.name}@{self.version}"


# -- names and keys ------------------------------------------------------------------------


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ArtifactError(
            f"invalid {what} {value!r}: use 1-100 lowercase letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return value


def artifact_prefix(tenant: str, name: str) -> str:
    return f"{check_name(tenant, 'tenant')}/{check_name(name, 'artifact name')}/"


def version_prefix(tenant: str, name: str, version: int) -> str:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"invalid artifact version {version!r}: a positive integer")
    return f"{artifact_prefix(tenant, name)}v{version}/"


def _claim_key(tenant: str, name: str, version: int) -> str:
    return f"{artifact_prefix(tenant, name)}versions/v{version}.claim"


def _recipe_key(tenant: str, name: str, digest: str) -> str:
    return f"{artifact_prefix(tenant, name)}recipes/{digest}.json"


def _job_key(tenant: str, name: str, job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise ArtifactError(f"invalid job id {job_id!r}: letters, digits, '.', '_', '-'")
    return f"{artifact_prefix(tenant, name)}jobs/{job_id}.json"


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- recipe hash ---------------------------------------------------------------------------


def compute_recipe_hash(
    *, kind: str, recipe: Mapping[str, Any], parents: Sequence[str], seed: int | None
) -> str:
    """sha256 of what determines an artifact's bytes: the job kind, the recipe (as JSON),
    the pinned parent references (base first, then the models in recipe order) and the seed.

    Canonical JSON (sorted keys, no spaces) makes it independent of key order. A recipe
    without a seed gets a random one at run time, so it never matches an earlier run: that
    is intended, such a job is not reproducible.
    """
    payload = {"kind": kind, "recipe": recipe, "parents": list(parents), "seed": seed}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_recipe_hash(manifest: Mapping[str, Any]) -> str:
    """:func:`compute_recipe_hash` of the job that wrote ``manifest`` (an output directory's)."""
    parents = [str(p.get("pinned")) for p in manifest.get("parents", [])]
    return compute_recipe_hash(
        kind=str(manifest.get("kind", "merge")),
        recipe=manifest.get("recipe", {}),
        parents=parents,
        seed=manifest.get("seed"),
    )


# -- reading the output directory ----------------------------------------------------------


def _load_local_manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ManifestError(
            f"{str(out_dir)!r} has no {MANIFEST}: only a complete output directory can be "
            "published (the merge writes the manifest last)",
            file=MANIFEST,
        ) from e
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read {str(path)!r}: {e}", file=MANIFEST) from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{str(path)!r} is not a JSON object", file=MANIFEST)
    return manifest


def _file_entries(manifest: Mapping[str, Any], where: str) -> list[ManifestFile]:
    """The manifest's file list, checked (schemas.manifests: safe relative paths, no
    duplicates, hex digests; and keys this store accepts)."""
    try:
        files = Manifest.model_validate(manifest).files
        for entry in files:
            check_key(entry.path)
    except ValidationError as e:
        first = e.errors()[0]
        loc, msg = first["loc"], str(first["msg"]).removeprefix("Value error, ")
        raw = manifest.get("files")
        if (
            len(loc) >= 2
            and loc[0] == "files"
            and isinstance(loc[1], int)
            and isinstance(raw, list)
        ):
            raise ManifestError(
                f"{where}: bad file entry {raw[loc[1]]!r}: {msg}", file=MANIFEST
            ) from None
        what = ".".join(str(p) for p in loc) or "the manifest"
        raise ManifestError(f"{where}: {what}: {msg}", file=MANIFEST) from None
    except InvalidKey as e:
        raise ManifestError(f"{where}: {e}", file=MANIFEST) from None
    return files


def folder_files(
    folder: Path, *, known: Mapping[str, tuple[int, str]] | None = None
) -> list[ManifestFile]:
    """Every file under ``folder`` but its manifest, sorted, with size and sha256 (``known``:
    (size, sha256) already computed while writing, by relative path)."""
    files = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel in (MANIFEST, MANIFEST + ".tmp"):
            continue
        size, digest = known[rel] if known and rel in known else (f.stat().st_size, sha256_file(f))
        files.append(ManifestFile(path=rel, size=size, sha256=digest))
    return files


def write_manifest(folder: Path, manifest: Manifest) -> dict[str, Any]:
    """Write ``folder/manifest.json`` atomically, after every other file of the folder (a
    reader never sees half of it); returns the document written."""
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, folder / MANIFEST)
    return manifest.document()


def _check_local_files(out_dir: Path, entries: Iterable[ManifestFile]) -> None:
    """Fail before taking a version number if a listed file is missing or has another size."""
    for e in entries:
        path = out_dir / e.path
        if not path.is_file():
            raise ArtifactError(
                f"{str(out_dir)!r}: file {e.path!r} is listed in {MANIFEST} but missing",
                file=e.path,
            )
        size = path.stat().st_size
        if size != e.size:
            raise ArtifactIntegrityError(
                f"{str(out_dir)!r}: file {e.path!r} has {size} bytes, the manifest says "
                f"{e.size}: the output directory changed after it was written; rerun the job",
                file=e.path,
            )


# -- publishing ----------------------------------------------------------------------------


def publish_artifact(
    store: ObjectStore,
    tenant: str,
    name: str,
    out_dir: Path,
    *,
    job_id: str,
    recipe_hash: str | None = None,
) -> ArtifactVersion:
    """Publish the output directory ``out_dir`` as the next version of ``tenant/name``.

    Idempotent per job, whatever crashed before: a job publishes exactly one version. If
    ``job_id`` already committed a version (its job index exists, see the module docstring),
    that version is completed if need be and returned, and nothing of ``out_dir`` is
    uploaded. On a failure before the commit nothing becomes visible and the version number
    stays used; after it, a retry completes the committed version.
    """
    out_dir = Path(out_dir)
    artifact_prefix(tenant, name)
    job_key = _job_key(tenant, name, job_id)
    done = _committed_by_job(store, tenant, name, job_id)
    if done is not None:
        return done
    manifest = _load_local_manifest(out_dir)
    entries = _file_entries(manifest, f"{str(out_dir)!r}/{MANIFEST}")
    _check_local_files(out_dir, entries)
    digest = _check_hash(recipe_hash) if recipe_hash else manifest_recipe_hash(manifest)
    version = allocate_version(store, tenant, name, job_id=job_id)
    prefix = version_prefix(tenant, name, version)
    published = dict(manifest)
    published["artifact"] = ArtifactRecord(
        tenant=tenant,
        name=name,
        version=version,
        reference=f"artifact://{name}@{version}",
        job_id=job_id,
        recipe_hash=digest,
        published_at=_now(),
    ).model_dump(mode="json")
    try:
        _upload_files(store, prefix, out_dir, entries)
        # The commit: from here on this version is the job's, and a retry finishes it.
        commit = _dumps({"version": version, "manifest": published})
        store.put_bytes(job_key, commit, if_absent=True)
    except ObjectExists:
        # Another attempt of this job committed first (a takeover racing a slow publisher):
        # its version is the job's; this attempt's files go.
        _discard(store, prefix)
        done = _committed_by_job(store, tenant, name, job_id)
        if done is None:
            raise ArtifactError(
                f"job {job_id} committed a version of {tenant}/{name} that cannot be completed; "
                "publish again"
            ) from None
        return done
    except BaseException:
        _discard(store, prefix)
        raise
    return _finish(store, tenant, name, version, published)


def _finish(
    store: ObjectStore, tenant: str, name: str, version: int, published: Mapping[str, Any]
) -> ArtifactVersion:
    """Make a committed version visible (its manifest, written last) and index its recipe
    hash. Safe to repeat: both writes are create-if-absent and the manifest's bytes are the
    ones committed, whoever writes them."""
    prefix = version_prefix(tenant, name, version)
    with suppress(ObjectExists):
        store.put_bytes(prefix + MANIFEST, _dumps(published), if_absent=True)
    artifact = published.get("artifact")
    digest = artifact.get("recipe_hash") if isinstance(artifact, dict) else None
    if isinstance(digest, str) and _HASH.match(digest):
        _write_index(store, _recipe_key(tenant, name, digest), version)
    info = store.stat(prefix + MANIFEST)
    return ArtifactVersion(tenant, name, version, info.last_modified if info else None)


def _check_hash(value: str) -> str:
    v = value.strip().lower()
    if not _HASH.match(v):
        raise ArtifactError(f"recipe hash {value!r} is not a hex sha256 (64 hex characters)")
    return v


def allocate_version(store: ObjectStore, tenant: str, name: str, *, job_id: str) -> int:
    """Take the next unused version number by creating its claim marker atomically.

    Starts above every number ever claimed or present and moves up on each conflict; a
    conflict means another publisher took that number, so it is skipped, never shared.
    """
    body = _dumps(
        {"job_id": job_id, "claimed_at": _now(), "host": socket.gethostname(), "pid": os.getpid()}
    )
    candidate = _highest_number(store, tenant, name) + 1
    for _ in range(MAX_CLAIM_ATTEMPTS):
        try:
            store.put_bytes(_claim_key(tenant, name, candidate), body, if_absent=True)
            return candidate
        except ObjectExists:
            candidate = max(candidate + 1, _highest_number(store, tenant, name) + 1)
    raise ArtifactError(
        f"could not claim a version of {tenant}/{name} after {MAX_CLAIM_ATTEMPTS} attempts "
        "(too many concurrent publishers?); try again"
    )


def _highest_number(store: ObjectStore, tenant: str, name: str) -> int:
    """The largest version number claimed or present (0 if none)."""
    base = artifact_prefix(tenant, name)
    numbers = [0]
    for info in store.list(base + "versions/"):
        m = _CLAIM.match(info.key[len(base + "versions/") :])
        if m:
            numbers.append(int(m.group(1)))
    for sub in store.list_prefixes(base):
        m = _VERSION_DIR.match(sub[len(base) :])
        if m:
            numbers.append(int(m.group(1)))
    return max(numbers)


def _upload_files(
    store: ObjectStore, prefix: str, out_dir: Path, entries: Sequence[ManifestFile]
) -> None:
    for e in entries:
        try:
            info = store.put_file(prefix + e.path, out_dir / e.path, sha256=e.sha256)
        except IntegrityError as err:
            raise ArtifactIntegrityError(
                f"file {e.path!r} of {str(out_dir)!r} does not match its manifest entry: {err}",
                file=e.path,
            ) from err
        if info.size != e.size:
            raise ArtifactIntegrityError(
                f"file {e.path!r} of {str(out_dir)!r} was stored with {info.size} bytes, the "
                f"manifest says {e.size}: it changed while uploading; rerun the job",
                file=e.path,
            )


def _discard(store: ObjectStore, prefix: str) -> None:
    """Best effort: remove a failed version's files (its claim stays, the number is used)."""
    with suppress(Exception):  # the original error matters more; sweep_incomplete retries
        store.delete_prefix(prefix)


def _write_index(store: ObjectStore, key: str, version: int) -> None:
    """Record ``version`` under ``key`` unless an earlier version already is (first wins).

    The version is already visible when this runs, so a failure here must not fail the
    publish: the indexes only save lookups that can also be done by scanning manifests.
    """
    with suppress(StorageError):  # includes ObjectExists
        store.put_bytes(key, _dumps({"version": version}), if_absent=True)


def _read_index(store: ObjectStore, key: str) -> int | None:
    try:
        value = json.loads(store.get_bytes(key)).get("version")
    except (ObjectNotFound, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _committed_by_job(
    store: ObjectStore, tenant: str, name: str, job_id: str
) -> ArtifactVersion | None:
    """The version ``job_id`` committed, completed now if its publisher stopped between the
    commit and the manifest; None if the job committed none (or a committed version's files
    were swept meanwhile: then its commit is void and removed, and the job publishes anew)."""
    key = _job_key(tenant, name, job_id)
    try:
        record = json.loads(store.get_bytes(key))
    except ObjectNotFound:
        return None
    except ValueError:
        record = None
    if not isinstance(record, dict):
        record = {}
    version = record.get("version")
    published = record.get("manifest")  # absent in an index written before commits existed
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        _delete_exact(store, key)  # unreadable: nothing can be completed from it
        return None
    complete = _complete(store, tenant, name, version)
    if complete is not None and not isinstance(published, dict):
        return complete
    if not isinstance(published, dict) or (
        complete is None and not _files_stored(store, tenant, name, version, published)
    ):
        _delete_exact(store, key)  # a commit that cannot be finished (swept, or malformed)
        return None
    # Complete it, or re-index a complete one (the crash may have come before the index).
    return _finish(store, tenant, name, version, published)


def _delete_exact(store: ObjectStore, key: str) -> None:
    """Delete the one object ``key`` (the store deletes by prefix: refuse if the prefix would
    take another object with it)."""
    others = [info.key for info in store.list(key) if info.key != key]
    if others:
        raise ArtifactError(f"cannot delete {key!r} alone: {others[0]!r} shares its name")
    store.delete_prefix(key)


def _files_stored(
    store: ObjectStore, tenant: str, name: str, version: int, published: Mapping[str, Any]
) -> bool:
    """Every file the committed manifest lists is stored with its size (a version can only be
    completed if a sweep did not remove its files)."""
    prefix = version_prefix(tenant, name, version)
    try:
        entries = _file_entries(published, f"{tenant}/{name} v{version} commit")
    except ManifestError:
        return False
    for e in entries:
        info = store.stat(prefix + e.path)
        if info is None or info.size != e.size:
            return False
    return True


# -- reading -------------------------------------------------------------------------------


def _complete(store: ObjectStore, tenant: str, name: str, version: int) -> ArtifactVersion | None:
    info = store.stat(version_prefix(tenant, name, version) + MANIFEST)
    if info is None:
        return None
    return ArtifactVersion(tenant, name, version, info.last_modified)


def list_versions(store: ObjectStore, tenant: str, name: str) -> list[ArtifactVersion]:
    """The complete versions of ``tenant/name``, oldest first (numbers may have gaps)."""
    base = artifact_prefix(tenant, name)
    found: list[ArtifactVersion] = []
    for info in store.list(base + "v"):
        m = _MANIFEST_KEY.match(info.key[len(base) :])
        if m:
            found.append(ArtifactVersion(tenant, name, int(m.group(1)), info.last_modified))
    return sorted(found, key=lambda v: v.version)


def list_artifacts(store: ObjectStore, tenant: str) -> list[ArtifactVersion]:
    """The latest complete version of each artifact of ``tenant``, by name."""
    base = f"{check_name(tenant, 'tenant')}/"
    latest: list[ArtifactVersion] = []
    for sub in store.list_prefixes(base):
        name = sub[len(base) :].rstrip("/")
        if not _NAME.match(name):
            continue
        versions = list_versions(store, tenant, name)
        if versions:
            latest.append(versions[-1])
    return latest


def resolve_artifact(
    store: ObjectStore, tenant: str, name: str, version: int | str = LATEST
) -> ArtifactVersion:
    """Pin ``version`` (a number, its string, or "latest") to a complete version."""
    if version == LATEST:
        versions = list_versions(store, tenant, name)
        if not versions:
            raise ArtifactNotFound(f"artifact {name!r} has no published version yet")
        return versions[-1]
    number = _version_number(version)
    found = _complete(store, tenant, name, number)
    if found is None:
        have = [v.version for v in list_versions(store, tenant, name)]
        known = f"published versions: {', '.join(map(str, have))}" if have else "none published"
        raise ArtifactNotFound(f"artifact {name!r} has no version {number} ({known})")
    return found


def _version_number(version: int | str) -> int:
    if isinstance(version, int) and not isinstance(version, bool) and version > 0:
        return version
    # ASCII digits only: str.isdigit() also holds for '²' or '①', which int() refuses
    if isinstance(version, str) and re.fullmatch(r"[0-9]{1,18}", version) and int(version) > 0:
        return int(version)
    raise ArtifactError(f"invalid artifact version {version!r}: a positive integer or 'latest'")


def read_manifest(
    store: ObjectStore, tenant: str, name: str, version: int | str = LATEST
) -> dict[str, Any]:
    """The published manifest of a complete version (with its ``"artifact"`` block)."""
    pinned = resolve_artifact(store, tenant, name, version)
    try:
        manifest = json.loads(store.get_bytes(pinned.manifest_key))
    except ObjectNotFound as e:
        raise ArtifactNotFound(f"artifact {name!r} version {pinned.version} vanished") from e
    except ValueError as e:
        raise ManifestError(
            f"artifact {name!r} version {pinned.version}: {MANIFEST} is not valid JSON: {e}",
            file=MANIFEST,
        ) from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"artifact {name!r} v{pinned.version}: manifest is not an object")
    return manifest


def find_by_recipe_hash(
    store: ObjectStore, tenant: str, name: str, digest: str
) -> ArtifactVersion | None:
    """The first complete version built from recipe hash ``digest``, or None.

    Looks up the index written at publish time; if it is missing (a publisher crashed
    between its manifest and the index), scans the manifests, newest first.
    """
    digest = _check_hash(digest)
    indexed = _read_index(store, _recipe_key(tenant, name, digest))
    if indexed is not None:
        found = _complete(store, tenant, name, indexed)
        if found is not None:
            return found
    for v in reversed(list_versions(store, tenant, name)):
        artifact = read_manifest(store, tenant, name, v.version).get("artifact", {})
        if isinstance(artifact, dict) and artifact.get("recipe_hash") == digest:
            return v
    return None


def download_artifact(
    store: ObjectStore, tenant: str, name: str, version: int | str, dest_dir: Path
) -> Path:
    """Download a complete version into ``dest_dir`` (absent or empty), checking every file.

    Files land in a hidden staging folder next to ``dest_dir``, which is renamed into place
    once all of them match their manifest's sha256 and size, so a failed download leaves
    nothing. Returns ``dest_dir``.
    """
    dest_dir = Path(dest_dir)
    if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
        raise ArtifactError(f"download target {str(dest_dir)!r} exists and is not empty")
    pinned = resolve_artifact(store, tenant, name, version)
    manifest = read_manifest(store, tenant, name, pinned.version)
    label = f"artifact {name!r} version {pinned.version}"
    entries = _file_entries(manifest, f"{label} {MANIFEST}")
    staging = dest_dir.parent / f".{dest_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        for e in entries:
            _download_one(store, pinned, e, staging, label)
        (staging / MANIFEST).write_bytes(store.get_bytes(pinned.manifest_key))
        if dest_dir.exists():
            dest_dir.rmdir()
        staging.rename(dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest_dir


def _download_one(
    store: ObjectStore, pinned: ArtifactVersion, e: ManifestFile, staging: Path, label: str
) -> None:
    target = staging / e.path
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        info = store.download_file(pinned.prefix + e.path, target, sha256=e.sha256)
    except IntegrityError as err:
        raise ArtifactIntegrityError(
            f"{label}: file {e.path!r} is corrupt in the object store (its sha256 differs "
            f"from the manifest's {e.sha256}); republish the artifact or restore the object",
            file=e.path,
        ) from err
    except ObjectNotFound as err:
        raise ArtifactIntegrityError(
            f"{label}: file {e.path!r} listed in the manifest is missing from the object store",
            file=e.path,
        ) from err
    if info.size != e.size:  # same sha256 but another size cannot happen; belt and braces
        raise ArtifactIntegrityError(f"{label}: file {e.path!r} has the wrong size", file=e.path)


# -- maintenance ---------------------------------------------------------------------------


def sweep_incomplete(
    store: ObjectStore, tenant: str, name: str, *, older_than_s: float = 24 * 3600
) -> list[int]:
    """Delete the leftovers of versions that were claimed long ago but never completed.

    Only claims older than ``older_than_s`` are considered, so a publish still running (or a
    committed version whose job will be retried and complete it) is not disturbed: keep it
    well above the time a job can wait for its retry. A version its job had committed loses
    the commit first, so that job's retry publishes anew. Claims themselves stay: their
    numbers remain used. Returns the versions whose leftovers were removed.
    """
    base = artifact_prefix(tenant, name)
    complete = {v.version for v in list_versions(store, tenant, name)}
    cutoff = time.time() - older_than_s
    swept: list[int] = []
    for info in list(store.list(base + "versions/")):
        m = _CLAIM.match(info.key[len(base + "versions/") :])
        if not m or int(m.group(1)) in complete:
            continue
        if info.last_modified is not None and info.last_modified.timestamp() > cutoff:
            continue
        number = int(m.group(1))
        try:
            # First void the job's commit of this version, if it made one: a retry of that job
            # must publish anew rather than complete a version whose files are going.
            _void_commit(store, tenant, name, number, info.key)
            if store.delete_prefix(version_prefix(tenant, name, number)):
                swept.append(number)
        except (StorageError, ArtifactError):
            continue
    return swept


def _void_commit(store: ObjectStore, tenant: str, name: str, version: int, claim: str) -> None:
    """Delete the job index that commits ``version`` (found through the claim's job id)."""
    try:
        job_id = json.loads(store.get_bytes(claim)).get("job_id")
        key = _job_key(tenant, name, str(job_id))
        committed = json.loads(store.get_bytes(key)).get("version")
    except (ObjectNotFound, ValueError, AttributeError, ArtifactError):
        return  # no readable claim or commit: nothing to void
    if committed == version:
        _delete_exact(store, key)
