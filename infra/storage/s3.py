"""Object store on an S3-compatible server (AWS S3, SeaweedFS, MinIO, Ceph RGW, ...).

Integrity: every upload carries an ``x-amz-checksum-sha256`` that the server checks against
the bytes it received (a mismatch is answered ``BadDigest`` and nothing is stored). A file
up to ``multipart_threshold`` goes in one PUT whose checksum is the caller's expected sha256,
so the server itself verifies the manifest's digest. Larger files go as a multipart upload
of ``part_size`` parts, each with its own checksum; the whole-file sha256 is computed while
reading the parts and compared with the expected one before the upload is completed (and
the upload is aborted on mismatch). At most ``max_concurrency`` parts are in flight, so
memory stays at ``(max_concurrency + 1) × part_size`` whatever the file size.

boto3 ≥ 1.36 adds CRC checksums to every request by default, which several S3-compatible
servers reject; the client is built with ``request_checksum_calculation`` and
``response_checksum_validation`` set to ``"when_required"`` and sends SHA-256 explicitly.

Conditional creates use ``If-None-Match: *`` (AWS since 2024, SeaweedFS, MinIO). A server
that ignores that header would let two publishers claim the same artifact version; check a
new server with :meth:`S3ObjectStore.check_conditional_writes` before relying on it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from infra.storage.base import (
    CHUNK,
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
    check_prefix,
    integrity_message,
    normalize_sha256,
    sha256_file,
)

MiB = 1 << 20
DEFAULT_PART_SIZE = 64 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum number of parts
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most a week

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DIGEST = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _hex(b64_digest: str) -> str:
    return base64.b64decode(b64_digest).hex()


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


class S3ObjectStore(ObjectStore):
    """Objects in ``bucket`` under an optional key ``prefix``.

    Credentials and region left as None come from boto3's usual chain (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, config files, instance roles). With an
    ``endpoint_url`` (any non-AWS server) path-style addressing is the default, since such
    servers rarely have per-bucket host names. ``create_bucket=True`` creates the bucket if
    it does not exist (handy for development and tests; production buckets are provisioned).
    ``anonymous=True`` sends unsigned requests (a public bucket) and never looks for
    credentials in the environment.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        prefix: str = "",
        create_bucket: bool = False,
        addressing_style: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        multipart_threshold: int | None = None,
        max_concurrency: int = 4,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        anonymous: bool = False,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.prefix = check_key(prefix.strip("/")) + "/" if prefix.strip("/") else ""
        self.part_size = part_size
        self.multipart_threshold = part_size if multipart_threshold is None else multipart_threshold
        self.max_concurrency = max_concurrency
        at = f" at {endpoint_url}" if endpoint_url else ""
        self.location = f"s3://{bucket}/{self.prefix}{at}"
        style = addressing_style or ("path" if endpoint_url else "auto")
        session = boto3.session.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region or ("us-east-1" if endpoint_url else None),
        )

        def client(retries: int, connect: float, read: float) -> Any:
            config = Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                signature_version=UNSIGNED if anonymous else "s3v4",
                s3={"addressing_style": style},
                retries={"max_attempts": retries, "mode": "standard"},
                max_pool_connections=max(10, 2 * max_concurrency),
                connect_timeout=connect,
                read_timeout=read,
            )
            return session.client("s3", endpoint_url=endpoint_url, config=config)

        self._client = client(5, connect_timeout, read_timeout)
        self._ping_client = client(1, 3.0, 5.0)  # readiness checks answer fast
        if create_bucket:
            self.ensure_bucket()

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.location!r})"

    # -- errors ---------------------------------------------------------------------------

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn botocore's exceptions into this package's, with what failed and what to do."""
        try:
            yield
        except ClientError as e:
            raise self._translate(e, what) from e
        except BotoCoreError as e:
            raise self._unavailable(e, what) from e

    def _unavailable(self, e: BotoCoreError, what: str) -> StorageUnavailable:
        return StorageUnavailable(
            f"{what}: cannot reach the object store {self.location}: {e}. Check that the "
            "endpoint is up and the credentials are set"
        )

    def _translate(self, e: ClientError, what: str) -> StorageError:
        code = _code(e)
        message = e.response.get("Error", {}).get("Message", "") or str(e)
        if code in _NOT_FOUND:
            return ObjectNotFound(f"{what}: not found in {self.location}")
        if code == "NoSuchBucket":
            return BucketNotFound(
                f"{what}: bucket {self.bucket!r} does not exist: create it, or add "
                "create_bucket=true to the object store URL"
            )
        if code in _DIGEST:
            return IntegrityError(
                f"{what}: the server received bytes that do not match their sha256 ({code}): "
                "the data changed while uploading or was corrupted in transit; try again"
            )
        if code in ("PreconditionFailed", "412"):
            return ObjectExists(f"{what}: the object already exists in {self.location}")
        if code in _DENIED:
            return AccessDenied(
                f"{what}: access denied by {self.location} ({code}): check the access key, "
                "secret key and the bucket policy"
            )
        return StorageError(f"{what}: {code or 'error'}: {message}")

    # -- keys -----------------------------------------------------------------------------

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _unk(self, full_key: str) -> str:
        return full_key[len(self.prefix) :]

    # -- bucket ---------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (idempotent, safe to race)."""
        what = f"creating bucket {self.bucket!r}"
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if _code(e) not in _NOT_FOUND | {"NoSuchBucket"}:
                raise self._translate(e, what) from e
        except BotoCoreError as e:
            raise self._unavailable(e, what) from e
        region = self._client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as e:
            if _code(e) != "BucketAlreadyOwnedByYou":  # a concurrent creator won: fine
                raise self._translate(e, what) from e
        except BotoCoreError as e:
            raise self._unavailable(e, what) from e

    def check_conditional_writes(self) -> None:
        """Raise :class:`StorageError` if the server ignores ``If-None-Match: *``.

        Writes a probe object twice; the second create must be refused. Version numbers of
        artifacts are only unique on servers that pass this check.
        """
        key = f".weightsmith-probe/{uuid.uuid4().hex}"
        try:
            self.put_bytes(key, b"1", if_absent=True)
            try:
                self.put_bytes(key, b"2", if_absent=True)
            except ObjectExists:
                return
            raise StorageError(
                f"{self.location} ignores conditional writes (If-None-Match: *): artifact "
                "version numbers would not be unique; use a server that supports them"
            )
        finally:
            self.delete_prefix(key)

    # -- writes ---------------------------------------------------------------------------

    def put_file(self, key: str, path: Path, *, sha256: str | None = None) -> ObjectInfo:
        path = Path(path)
        full = self._k(key)
        expected = normalize_sha256(sha256)
        size = path.stat().st_size
        if size <= self.multipart_threshold:
            return self._put_single(key, full, path, size, expected)
        return self._put_multipart(key, full, path, size, expected)

    def _put_single(
        self, key: str, full: str, path: Path, size: int, expected: str | None
    ) -> ObjectInfo:
        digest = expected or sha256_file(path)
        what = f"uploading {str(path)!r} to {key!r}"
        try:
            with path.open("rb") as body, self._errors(what):
                resp = self._client.put_object(
                    Bucket=self.bucket,
                    Key=full,
                    Body=body,
                    ContentLength=size,
                    ChecksumSHA256=_b64(digest),
                )
        except IntegrityError as e:  # the server checked the bytes against ``digest``
            raise IntegrityError(integrity_message(f"file {str(path)!r}", digest, None)) from e
        return ObjectInfo(key, size, resp["ETag"].strip('"'), None, digest)

    def _part_size_for(self, size: int) -> int:
        """``part_size``, raised (in whole MiB) if the file would need more than 10,000 parts."""
        need = math.ceil(size / MAX_PARTS)
        return max(self.part_size, math.ceil(need / MiB) * MiB)

    def _put_multipart(
        self, key: str, full: str, path: Path, size: int, expected: str | None
    ) -> ObjectInfo:
        what = f"uploading {str(path)!r} to {key!r}"
        with self._errors(what):
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, ChecksumAlgorithm="SHA256"
            )["UploadId"]
        try:
            parts, actual = self._upload_parts(full, upload_id, path, self._part_size_for(size))
            if expected is not None and actual != expected:
                raise IntegrityError(integrity_message(f"file {str(path)!r}", expected, actual))
            with self._errors(what):
                resp = self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            self._abort(full, upload_id)
            raise
        return ObjectInfo(key, size, str(resp.get("ETag", "")).strip('"'), None, actual)

    def _upload_parts(
        self, full: str, upload_id: str, path: Path, part_size: int
    ) -> tuple[list[dict[str, Any]], str]:
        """Upload the parts, a bounded number at a time; return them and the file's sha256."""
        whole = hashlib.sha256()
        done: list[dict[str, Any]] = []
        pending: deque[Future[dict[str, Any]]] = deque()
        with ThreadPoolExecutor(self.max_concurrency) as pool, path.open("rb") as f:
            try:
                number = 0
                while chunk := f.read(part_size):
                    whole.update(chunk)
                    number += 1
                    pending.append(pool.submit(self._upload_part, full, upload_id, number, chunk))
                    del chunk  # the future holds the only reference
                    if len(pending) >= self.max_concurrency:
                        done.append(pending.popleft().result())
                while pending:
                    done.append(pending.popleft().result())
            finally:
                for fut in pending:
                    fut.cancel()
        return done, whole.hexdigest()

    def _upload_part(self, full: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        digest = _b64(hashlib.sha256(data).hexdigest())
        with self._errors(f"uploading part {number} of {self._unk(full)!r}"):
            resp = self._client.upload_part(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ChecksumSHA256=digest,
            )
        return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": digest}

    def _abort(self, full: str, upload_id: str) -> None:
        """Best effort: an upload left open is invisible but holds storage until aborted."""
        with suppress(ClientError, BotoCoreError):
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        full = self._k(key)
        digest = hashlib.sha256(data).hexdigest()
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        for attempt in range(5):
            try:
                resp = self._client.put_object(
                    Bucket=self.bucket, Key=full, Body=data, ChecksumSHA256=_b64(digest), **extra
                )
                return ObjectInfo(key, len(data), resp["ETag"].strip('"'), None, digest)
            except ClientError as e:
                # AWS answers 409 while another conditional write of the key is in flight
                if _code(e) == "ConditionalRequestConflict" and attempt < 4:
                    time.sleep(0.05 * 2**attempt)
                    continue
                raise self._translate(e, f"writing {key!r}") from e
            except BotoCoreError as e:
                raise self._unavailable(e, f"writing {key!r}") from e
        raise StorageError(f"writing {key!r}: conflicting concurrent writes; try again")

    # -- reads ----------------------------------------------------------------------------

    def _get_body(self, key: str) -> Any:
        with self._errors(f"reading {key!r}"):
            return self._client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]

    def get_stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        return self._iter_body(key, self._get_body(key), chunk_size)

    def _iter_body(self, key: str, body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            with self._errors(f"reading {key!r}"):
                yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def open(self, key: str) -> BinaryIO:
        return io.BufferedReader(_BodyReader(self._get_body(key)), buffer_size=CHUNK)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            with self._errors(f"checking {key!r}"):
                head = self._client.head_object(
                    Bucket=self.bucket, Key=self._k(key), ChecksumMode="ENABLED"
                )
        except ObjectNotFound:
            return None
        checksum = head.get("ChecksumSHA256")
        whole = checksum and "-" not in checksum and head.get("ChecksumType") != "COMPOSITE"
        return ObjectInfo(
            key=key,
            size=int(head["ContentLength"]),
            etag=str(head.get("ETag", "")).strip('"'),
            last_modified=head.get("LastModified"),
            sha256=_hex(checksum) if whole else None,
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + check_prefix(prefix)
        )
        with self._errors(f"listing {prefix!r}"):
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(
                        key=self._unk(obj["Key"]),
                        size=int(obj["Size"]),
                        etag=str(obj.get("ETag", "")).strip('"'),
                        last_modified=obj.get("LastModified"),
                    )

    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + check_prefix(prefix), Delimiter="/"
        )
        with self._errors(f"listing {prefix!r}"):
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    yield self._unk(common["Prefix"])

    # -- deletes --------------------------------------------------------------------------

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise InvalidKey("delete_prefix needs a non-empty prefix (refusing to empty the store)")
        count = 0
        batch: list[str] = []
        for info in self.list(prefix):
            batch.append(info.key)
            if len(batch) == 1000:  # DeleteObjects' maximum
                count += self._delete_batch(batch)
                batch = []
        if batch:
            count += self._delete_batch(batch)
        return count

    def _delete_batch(self, keys: Sequence[str]) -> int:
        with self._errors(f"deleting {len(keys)} objects from {keys[0]!r}"):
            resp = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._k(k)} for k in keys], "Quiet": True},
            )
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageError(
                f"could not delete {len(errors)} of {len(keys)} objects, e.g. "
                f"{self._unk(first.get('Key', ''))!r}: {first.get('Code')} {first.get('Message')}"
            )
        return len(keys)

    # -- the rest -------------------------------------------------------------------------

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        if not 1 <= expires_s <= MAX_PRESIGN_S:
            raise ValueError(f"expires_s must be between 1 and {MAX_PRESIGN_S} seconds")
        with self._errors(f"signing a URL for {key!r}"):
            url: str = self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._k(key)},
                ExpiresIn=expires_s,
            )
        return url

    def ping(self) -> None:
        what = f"checking bucket {self.bucket!r}"
        try:
            self._ping_client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            code = "NoSuchBucket" if _code(e) in _NOT_FOUND else _code(e)
            error = ClientError({"Error": {"Code": code, "Message": str(e)}}, "HeadBucket")
            found = self._translate(error, what)
            raise StorageUnavailable(str(found)) from e
        except BotoCoreError as e:
            raise self._unavailable(e, what) from e


class _BodyReader(io.RawIOBase):
    """A botocore StreamingBody as a raw file, so ``open`` can return a real BinaryIO."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
