"""The tenant boundary: what a tenant may name as an input or a push target, and with which
credentials the service acts for it. Shared by the API (checks at submission) and the
workers (the same checks again, then the reads), torch-free and without I/O of its own
except :func:`open_granted_store`, which only builds a client.

A tenant may name:

- Hub repositories: pulled with the tenant's own token (``PUT /v1/tenant/hub-token``), or
  with the service's token where the operator granted it to the tenant, or anonymously.
  Never with a token the tenant was not given: no implicit ``HF_TOKEN`` fallback.
- Its own ``artifact://`` versions (artifact keys start with the tenant's name).
- ``s3://`` locations only under an :class:`S3GrantInfo` the operator made for it
  (``weightsmith tenants grant-s3``), read with that grant's credentials; never the artifact
  store's bucket (other tenants' artifacts, the shared ``_cache/``).
- Local paths only where the operator allows them (``WEIGHTSMITH_ALLOW_LOCAL_PATHS``),
  absolute, existing, and never inside the service's data directory or a local artifact
  store.

A refused ``s3://`` location gets the same answer whether it is missing or not granted
(:func:`s3_refusal`), so the answer tells nothing about other tenants' objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from schemas.tenants import GrantError, S3GrantInfo, normalize_endpoint

if TYPE_CHECKING:
    from infra.settings import Settings
    from infra.storage.s3 import S3ObjectStore


def s3_refusal(raw: str) -> str:
    """The one answer for an ``s3://`` input that is missing *or* not granted."""
    return (
        f"{raw} does not exist or is not readable by this tenant: s3:// inputs must lie under a "
        "location the operator granted to the tenant (GET /v1/tenant lists them; "
        "'weightsmith tenants grant-s3'); or upload the files as an artifact "
        "('weightsmith push DIR artifact://NAME')"
    )


@dataclass(frozen=True)
class ArtifactBucket:
    """The artifact store's bucket and endpoint: never readable through a grant."""

    bucket: str
    endpoint: str | None


def artifact_bucket(settings: Settings) -> ArtifactBucket | None:
    """The artifact store's S3 bucket (None for a local artifact store)."""
    if not settings.object_store_url.startswith("s3://"):
        return None
    from infra.storage.factory import s3_options

    options = s3_options(settings.object_store_url)
    return ArtifactBucket(options["bucket"], normalize_endpoint(options.get("endpoint_url")))


def is_artifact_bucket(settings: Settings, bucket: str) -> bool:
    """Whether ``bucket`` is named like the artifact store's, on whatever server: one server
    answers to several spellings (a host name, an address, a proxy), so the name decides."""
    store = artifact_bucket(settings)
    return store is not None and store.bucket == bucket


def open_granted_store(grant: S3GrantInfo, settings: Settings) -> S3ObjectStore:
    """A client for the grant's bucket with the grant's credentials (none of the artifact
    store's unless the grant says ``store``). Refuses the artifact store's bucket."""
    from infra.storage.factory import s3_options
    from infra.storage.s3 import S3ObjectStore

    if is_artifact_bucket(settings, grant.bucket):
        raise GrantError(
            f"grant {grant.location} names the artifact store's bucket, which no tenant may "
            "read directly; revoke it"
        )
    if grant.credentials == "keys":
        access, secret = grant.access_key_id, grant.secret_access_key
    elif grant.credentials == "store":
        if not settings.object_store_url.startswith("s3://"):
            raise GrantError(
                f"grant {grant.location} uses the artifact store's credentials, but the "
                "artifact store is not S3"
            )
        options = s3_options(settings.object_store_url)
        access, secret = options.get("access_key"), options.get("secret_key")
    else:
        access = secret = None
    store = S3ObjectStore(
        grant.bucket,
        endpoint_url=grant.endpoint,
        access_key=access,
        secret_key=secret,
        region=grant.region,
        anonymous=grant.credentials == "anonymous",
    )
    return store


# ---- local paths ----------------------------------------------------------------------------


class LocalPathRefused(ValueError):
    """A local path a tenant may not read; the message says why and what to use instead."""


def _protected(settings: Settings) -> tuple[list[Path], Path | None]:
    """The folders no tenant may read from (data directory, local artifact store) and the
    SQLite database file (with its -wal and -shm companions)."""
    roots = [settings.data_dir]
    url = settings.object_store_url
    if url.startswith("file://"):
        roots.append(Path(urlsplit(url).path))
    elif "://" not in url:
        roots.append(Path(url))
    db = settings.database_url
    database = Path(db[len("sqlite:///") :]) if db.startswith("sqlite:///") else None
    resolved_db = database.expanduser().resolve() if database is not None else None
    return [r.expanduser().resolve() for r in roots], resolved_db


def check_local_path(raw: str, settings: Settings, *, must_exist: bool = True) -> Path:
    """The absolute, resolved path a tenant names, if it may be read; else LocalPathRefused.

    Only where ``WEIGHTSMITH_ALLOW_LOCAL_PATHS`` is on; relative paths are refused (relative to
    what, on a server?); the path must exist, and it may neither lie in nor contain the
    service's data directory or local artifact store, nor be its database file (other
    tenants' data).
    """
    if not settings.allow_local_paths:
        raise LocalPathRefused(
            f"local path {raw!r} refused: this service does not read its own disk for clients "
            "(the operator can allow it with WEIGHTSMITH_ALLOW_LOCAL_PATHS); use a hub "
            "repository, an s3:// location granted to you, or upload the files as an artifact "
            "('weightsmith push DIR artifact://NAME')"
        )
    text = raw[len("file://") :] if raw.startswith("file://") else raw
    path = Path(text).expanduser()
    if not path.is_absolute():
        raise LocalPathRefused(f"local path {raw!r} refused: the service needs an absolute path")
    resolved = path.resolve()
    roots, database = _protected(settings)
    # Inside the service's data, or a folder holding it (an index could point into it).
    inside = any(
        resolved == root or root in resolved.parents or resolved in root.parents for root in roots
    )
    if database is not None and str(resolved).startswith(str(database)):
        inside = True
    if inside:
        raise LocalPathRefused(
            f"local path {raw!r} refused: it lies inside the service's own data "
            "(artifacts, database), which tenants reach only through artifact:// "
            "references"
        )
    if must_exist and not resolved.exists():
        raise LocalPathRefused(f"local path {raw!r} does not exist on the service's disk")
    return resolved
