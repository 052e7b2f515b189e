"""Build an :class:`ObjectStore` from one URL (``WEIGHTSMITH_OBJECT_STORE_URL``).

See the package docstring (``infra.storage``) for the accepted forms.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from infra.storage.base import ObjectStore
from infra.storage.local import LocalObjectStore

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_S3_OPTIONS = (
    "endpoint",
    "region",
    "create_bucket",
    "addressing",
    "part_size",
    "multipart_threshold",
    "max_concurrency",
)


class StoreURLError(ValueError):
    """An object store URL that cannot be understood; the message shows the valid forms."""


_FORMS = (
    "use 'file:///absolute/path' (or a plain path) for a local directory, or "
    "'s3://bucket[/prefix][?endpoint=http://host:port&region=...&create_bucket=true]'"
)


def open_store(url: str) -> ObjectStore:
    """The object store that ``url`` names (S3 needs boto3, imported only then)."""
    if not isinstance(url, str) or not url.strip():
        raise StoreURLError(f"empty object store URL: {_FORMS}")
    url = url.strip()
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return _local(url)
    if scheme == "s3":
        return _s3(url)
    if "://" in url:
        raise StoreURLError(f"object store URL {redact_url(url)!r}: unknown scheme; {_FORMS}")
    return LocalObjectStore(Path(url))


def _local(url: str) -> LocalObjectStore:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise StoreURLError(f"object store URL {url!r} needs an absolute path: 'file:///path'")
    if parts.query:
        raise StoreURLError(f"object store URL {url!r}: a file:// URL takes no options")
    return LocalObjectStore(Path(unquote(parts.path)))


def _s3(url: str) -> ObjectStore:
    from infra.storage.s3 import S3ObjectStore

    return S3ObjectStore(**s3_options(url))


def s3_options(url: str) -> dict[str, Any]:
    """The keyword arguments of ``S3ObjectStore`` that an ``s3://`` URL stands for."""
    parts = urlsplit(url)
    shown = redact_url(url)
    bucket = (parts.hostname or "").lower()
    if not _BUCKET.match(bucket):
        raise StoreURLError(f"object store URL {shown!r}: {bucket!r} is not a valid bucket name")
    query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
    unknown = sorted(set(query) - set(_S3_OPTIONS))
    if unknown:
        raise StoreURLError(
            f"object store URL {shown!r}: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(_S3_OPTIONS)}"
        )
    opts: dict[str, Any] = {"bucket": bucket, "prefix": unquote(parts.path).strip("/")}
    if parts.username is not None or parts.password is not None:
        if not parts.username or not parts.password:
            raise StoreURLError(f"object store URL {shown!r}: give both 'KEY:SECRET@' or neither")
        opts["access_key"] = unquote(parts.username)
        opts["secret_key"] = unquote(parts.password)
    if "endpoint" in query:
        opts["endpoint_url"] = _endpoint(query["endpoint"], shown)
    if "region" in query:
        opts["region"] = query["region"]
    if "create_bucket" in query:
        opts["create_bucket"] = _bool(query["create_bucket"], "create_bucket", shown)
    if "addressing" in query:
        if query["addressing"] not in ("path", "virtual", "auto"):
            raise StoreURLError(f"object store URL {shown!r}: addressing is path, virtual or auto")
        opts["addressing_style"] = query["addressing"]
    for name in ("part_size", "multipart_threshold"):
        if name in query:
            opts[name] = _size(query[name], name, shown)
    if "max_concurrency" in query:
        if not query["max_concurrency"].isdigit() or int(query["max_concurrency"]) < 1:
            raise StoreURLError(f"object store URL {shown!r}: max_concurrency is a number ≥ 1")
        opts["max_concurrency"] = int(query["max_concurrency"])
    return opts


def _endpoint(value: str, shown: str) -> str:
    ep = urlsplit(value)
    if ep.scheme not in ("http", "https") or not ep.netloc:
        raise StoreURLError(
            f"object store URL {shown!r}: endpoint {value!r} must be 'http(s)://host:port'"
        )
    return value.rstrip("/")


def _bool(value: str, name: str, shown: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise StoreURLError(f"object store URL {shown!r}: {name} must be true or false")


def _size(value: str, name: str, shown: str) -> int:
    """Bytes from '67108864', '64MiB', '64M' (MiB, KiB, GiB binary; MB, KB, GB decimal)."""
    m = _SIZE.match(value)
    if not m:
        raise StoreURLError(f"object store URL {shown!r}: {name}={value!r} is not a size")
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(m.group(1)) * _UNITS[unit]


def redact_url(url: str) -> str:
    """``url`` with any secret key replaced by ``***``, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
