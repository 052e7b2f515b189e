"""Object storage for artifacts: one interface, a local-directory and an S3 backend.

Both the API (listing, download links, readiness) and the workers (publishing, fetching
``artifact://`` inputs) use it, so it lives in ``infra``, not in ``app`` or ``workers``.

Choose a backend with one URL (``open_store(url)``, setting ``WEIGHTSMITH_OBJECT_STORE_URL``):

``file:///var/lib/weightsmith/artifacts`` (or a plain path)
    :class:`LocalObjectStore`: the embedded default. Keys are files under that folder,
    written atomically (temp file, fsync, rename). No presigned URLs.

``s3://BUCKET[/PREFIX][?OPTIONS]``
    :class:`~infra.storage.s3.S3ObjectStore` (needs ``boto3``): every key is stored under
    ``PREFIX/`` in ``BUCKET``. Options, all optional:

    - ``endpoint=http://127.0.0.1:8333`` — an S3-compatible server (default: AWS, or the
      ``AWS_ENDPOINT_URL`` environment variable); implies path-style addressing
    - ``region=eu-west-1`` — default ``AWS_REGION``, or ``us-east-1`` with an endpoint
    - ``create_bucket=true`` — create the bucket if missing (development, tests)
    - ``addressing=path|virtual|auto``
    - ``part_size=64MiB`` — multipart part size (≥ 5MiB); ``multipart_threshold=64MiB`` —
      files up to this size go in a single PUT; ``max_concurrency=4`` — parts in flight
      (memory per upload ≈ (max_concurrency + 1) × part_size)

    Credentials come from boto3's chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
    config files, instance roles), or inline as ``s3://KEY:SECRET@BUCKET/...``
    (percent-encode ``/``, ``+`` and ``@`` in the secret; :func:`redact_url` hides it in logs;
    prefer the environment in production).

Example: ``s3://artifacts/prod?endpoint=http://seaweed:8333&region=us-east-1``.
"""

from infra.storage.base import (
    AccessDenied,
    BucketNotFound,
    IntegrityError,
    InvalidKey,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageUnavailable,
    check_key,
)
from infra.storage.factory import StoreURLError, open_store, redact_url, s3_options
from infra.storage.local import LocalObjectStore

__all__ = [
    "AccessDenied",
    "BucketNotFound",
    "IntegrityError",
    "InvalidKey",
    "LocalObjectStore",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "StorageError",
    "StorageUnavailable",
    "StoreURLError",
    "check_key",
    "open_store",
    "redact_url",
    "s3_options",
]
