"""The object store (infra.storage): the same contract on a local directory and on a real S3
server (SeaweedFS, testbed/s3.py).

Round trips including multipart uploads (5 MiB parts, S3's minimum, to stay fast), sha256
verification on upload and download (a rejected write leaves nothing), conditional creates
(one winner among racing threads), listing order and "sub-folders", deletes, key safety,
presigned URLs fetched with plain urllib, readiness checks, and the URL factory.
"""

from __future__ import annotations

import hashlib
import threading
import tracemalloc
import urllib.request
from pathlib import Path

import pytest

from infra.storage import (
    IntegrityError,
    InvalidKey,
    LocalObjectStore,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    StorageUnavailable,
    StoreURLError,
    open_store,
    redact_url,
    s3_options,
)
from testbed.s3 import S3Server
from tests.support.stores import make_store

MiB = 1 << 20
PART = 5 * MiB


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """An empty store; on S3 with 5 MiB parts so a 12 MiB file takes 3 parts."""
    return make_store(request.param, request, tmp_path, part_size=PART, multipart_threshold=PART)


def _file(path: Path, size: int, seed: int = 0) -> tuple[Path, str]:
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    path.write_bytes(data[:size])
    return path, hashlib.sha256(data[:size]).hexdigest()


def _keys(store: ObjectStore, prefix: str = "") -> list[str]:
    """Listed keys, sorted: list order differs between servers (see ObjectStore.list)."""
    return sorted(info.key for info in store.list(prefix))


# -- round trips ---------------------------------------------------------------------------


def test_put_bytes_then_read_it_back_every_way(store: ObjectStore, tmp_path: Path) -> None:
    info = store.put_bytes("a/b/config.json", b'{"x": 1}')
    assert info.size == 8 and info.sha256 == hashlib.sha256(b'{"x": 1}').hexdigest()
    assert store.get_bytes("a/b/config.json") == b'{"x": 1}'
    assert b"".join(store.get_stream("a/b/config.json", chunk_size=3)) == b'{"x": 1}'
    with store.open("a/b/config.json") as f:
        assert f.read(2) == b'{"' and f.read() == b'x": 1}'
    stat = store.stat("a/b/config.json")
    assert stat is not None and stat.size == 8 and stat.etag and stat.last_modified is not None
    store.put_bytes("a/b/config.json", b"{}")  # plain puts overwrite
    assert store.get_bytes("a/b/config.json") == b"{}"


@pytest.mark.parametrize("size", [0, 1000, 2 * PART + 12345], ids=["empty", "small", "3-parts"])
def test_put_file_round_trip(store: ObjectStore, tmp_path: Path, size: int) -> None:
    src, digest = _file(tmp_path / "shard.safetensors", size)
    info = store.put_file("m/v1/shard.safetensors", src, sha256=digest)
    assert info.size == size and info.sha256 == digest
    stat = store.stat("m/v1/shard.safetensors")
    assert stat is not None and stat.size == size
    if size > PART and not isinstance(store, LocalObjectStore):
        assert stat.etag.endswith("-3"), "expected a 3-part multipart upload"
    out = tmp_path / "out.bin"
    store.download_file("m/v1/shard.safetensors", out, sha256=digest)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    with store.open("m/v1/shard.safetensors") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest


def test_put_file_without_sha256_records_it(store: ObjectStore, tmp_path: Path) -> None:
    src, digest = _file(tmp_path / "f", 2 * PART + 1, seed=3)
    assert store.put_file("f", src).sha256 == digest
    small, small_digest = _file(tmp_path / "s", 10, seed=4)
    assert store.put_file("s", small).sha256 == small_digest


# -- integrity -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 2 * PART + 7], ids=["single-put", "multipart"])
def test_wrong_sha256_is_rejected_and_nothing_is_stored(
    store: ObjectStore, tmp_path: Path, size: int
) -> None:
    src, digest = _file(tmp_path / "shard", size)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(IntegrityError, match="sha256 mismatch") as err:
        store.put_file("x/shard", src, sha256=wrong)
    assert str(src) in str(err.value) and wrong in str(err.value)
    assert store.stat("x/shard") is None
    assert _keys(store) == []
    # an existing object is left as it was by a rejected overwrite
    store.put_file("x/shard", src, sha256=digest)
    with pytest.raises(IntegrityError):
        store.put_file("x/shard", src, sha256=wrong)
    assert store.stat("x/shard").size == size  # type: ignore[union-attr]
    assert hashlib.sha256(store.get_bytes("x/shard")).hexdigest() == digest


def test_malformed_sha256_is_refused_before_any_io(store: ObjectStore, tmp_path: Path) -> None:
    src, _ = _file(tmp_path / "f", 10)
    with pytest.raises(ValueError, match="not a hex sha256"):
        store.put_file("f", src, sha256="abc")


def test_download_verifies_sha256_and_leaves_nothing_on_mismatch(
    store: ObjectStore, tmp_path: Path
) -> None:
    store.put_bytes("k", b"payload")
    target = tmp_path / "dl" / "k"
    target.parent.mkdir()
    with pytest.raises(IntegrityError, match="'k'"):
        store.download_file("k", target, sha256=hashlib.sha256(b"other").hexdigest())
    assert list(target.parent.iterdir()) == []


# -- conditional creates -------------------------------------------------------------------


def test_if_absent_refuses_an_existing_key(store: ObjectStore) -> None:
    store.put_bytes("claims/v1.claim", b"first", if_absent=True)
    with pytest.raises(ObjectExists, match="already exists"):
        store.put_bytes("claims/v1.claim", b"second", if_absent=True)
    assert store.get_bytes("claims/v1.claim") == b"first"


def test_if_absent_has_exactly_one_winner_among_racing_threads(store: ObjectStore) -> None:
    # SeaweedFS serialises contended conditional writes (a loser may wait ~1 s), so few trials
    for trial in range(3):
        key = f"race/{trial}"
        winners, losers = _race(store, key, 6)
        assert len(winners) == 1 and len(losers) == 5
        assert store.get_bytes(key) == str(winners[0]).encode()


def _race(store: ObjectStore, key: str, n: int) -> tuple[list[int], list[int]]:
    """``n`` threads create ``key`` with if_absent at the same moment; who won, who lost."""
    barrier = threading.Barrier(n)
    winners: list[int] = []
    losers: list[int] = []

    def claim(i: int) -> None:
        barrier.wait()
        try:
            store.put_bytes(key, str(i).encode(), if_absent=True)
            winners.append(i)
        except ObjectExists:
            losers.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners, losers


# -- listing and deleting ------------------------------------------------------------------


def test_list_has_s3_prefix_semantics(store: ObjectStore) -> None:
    for key in ["t/a/v1/x", "t/a-b", "t/a/v10/y", "t/a/v1/manifest.json", "t/b", "u/z"]:
        store.put_bytes(key, key.encode())
    assert _keys(store, "t/") == ["t/a-b", "t/a/v1/manifest.json", "t/a/v1/x", "t/a/v10/y", "t/b"]
    assert _keys(store, "t/a/v1") == ["t/a/v1/manifest.json", "t/a/v1/x", "t/a/v10/y"]
    assert _keys(store, "t/a/v1/") == ["t/a/v1/manifest.json", "t/a/v1/x"]
    assert _keys(store, "nothing/") == []
    sizes = {i.key: i.size for i in store.list("t/a/")}
    assert sizes["t/a/v10/y"] == len(b"t/a/v10/y")


def test_list_prefixes_gives_sub_folders_only(store: ObjectStore) -> None:
    for key in ["t/a/v1/x", "t/a/v2/x", "t/a/versions/v1.claim", "t/a/readme", "t/b/v1/y"]:
        store.put_bytes(key, b"1")
    assert list(store.list_prefixes("t/")) == ["t/a/", "t/b/"]
    assert list(store.list_prefixes("t/a/")) == ["t/a/v1/", "t/a/v2/", "t/a/versions/"]
    assert list(store.list_prefixes("t/a/v")) == ["t/a/v1/", "t/a/v2/", "t/a/versions/"]
    assert list(store.list_prefixes("")) == ["t/"]


def test_delete_prefix_removes_only_that_prefix(store: ObjectStore) -> None:
    for key in ["t/a/v1/x", "t/a/v1/sub/y", "t/a/v10/z", "t/a/v2/w"]:
        store.put_bytes(key, b"1")
    assert store.delete_prefix("t/a/v1/") == 2
    assert _keys(store) == ["t/a/v10/z", "t/a/v2/w"]
    remaining = list(store.list_prefixes("t/a/"))
    if isinstance(store, LocalObjectStore):
        assert remaining == ["t/a/v10/", "t/a/v2/"]
    else:  # SeaweedFS removes emptied folders asynchronously: "t/a/v1/" may linger a while
        assert {"t/a/v10/", "t/a/v2/"} <= set(remaining) <= {"t/a/v1/", "t/a/v10/", "t/a/v2/"}
    assert store.delete_prefix("t/a/v1/") == 0
    with pytest.raises(InvalidKey, match="non-empty prefix"):
        store.delete_prefix("")


# -- keys and missing objects --------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["", "/abs", "a/../b", "..", "a//b", "a/./b", "a/", "a\\b", "a\x00b", "x" * 1100]
)
def test_unsafe_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        store.put_bytes(key, b"1")
    with pytest.raises(InvalidKey):
        store.stat(key)


def test_prefixes_that_climb_out_are_refused(store: ObjectStore) -> None:
    for prefix in ["../", "/etc/", "a/../"]:
        with pytest.raises(InvalidKey):
            list(store.list(prefix))


def test_missing_objects(store: ObjectStore, tmp_path: Path) -> None:
    assert store.stat("no/such") is None
    assert not store.exists("no/such")
    with pytest.raises(ObjectNotFound):
        store.get_stream("no/such")
    with pytest.raises(ObjectNotFound):
        store.open("no/such")
    with pytest.raises(ObjectNotFound):
        store.download_file("no/such", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".x")] == []


def test_local_keys_stay_inside_the_root_and_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "root")
    store.put_bytes("a/b", b"1")
    src, _ = _file(tmp_path / "f", 100)
    with pytest.raises(IntegrityError):
        store.put_file("a/c", src, sha256="0" * 64)
    with pytest.raises(InvalidKey, match="reserved"):
        store.put_bytes(".weightsmith-tmp/x", b"1")
    with pytest.raises(InvalidKey, match="clashes"):
        store.put_bytes("a/b/c", b"1")
    assert _keys(store) == ["a/b"]
    assert list((tmp_path / "root" / ".weightsmith-tmp").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == [".weightsmith-tmp", "a"]


# -- presigned URLs and readiness ----------------------------------------------------------


def test_presigned_url_is_fetchable_with_plain_http(store: ObjectStore) -> None:
    store.put_bytes("m/v1/model.safetensors", b"tensor bytes")
    url = store.presigned_url("m/v1/model.safetensors", expires_s=60)
    if isinstance(store, LocalObjectStore):
        assert url is None
        return
    assert url is not None and "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"tensor bytes"


def test_ping(store: ObjectStore) -> None:
    store.ping()


def test_ping_reports_an_unusable_store(tmp_path: Path, s3_server: S3Server) -> None:
    local = LocalObjectStore(tmp_path / "gone")
    (tmp_path / "gone" / ".weightsmith-tmp").rmdir()
    (tmp_path / "gone").rmdir()
    with pytest.raises(StorageUnavailable, match="missing or not writable"):
        local.ping()
    from infra.storage.s3 import S3ObjectStore

    port = s3_server.endpoint.rpartition(":")[2]
    closed = S3ObjectStore(
        "bucket", endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b"
    )
    with pytest.raises(StorageUnavailable, match="cannot reach"):
        closed.ping()
    no_bucket = s3_server.store(prefix="")
    no_bucket.bucket = "no-such-bucket-here"
    with pytest.raises(StorageUnavailable, match="does not exist"):
        no_bucket.ping()
    wrong_key = S3ObjectStore(
        s3_server.bucket,
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key="wrong",
        secret_key="wrong",
    )
    with pytest.raises(StorageUnavailable):
        wrong_key.ping()


# -- S3 specifics --------------------------------------------------------------------------


def test_s3_client_sends_checksums_only_when_required(s3_server: S3Server) -> None:
    config = s3_server.store()._client.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"


def test_s3_server_honours_conditional_writes(s3_server: S3Server) -> None:
    s3_server.store().check_conditional_writes()


def test_s3_multipart_upload_memory_is_bounded_by_parts(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """A 40 MiB file through 5 MiB parts, 2 in flight: peak well under the file size."""
    store = s3_server.store(part_size=PART, multipart_threshold=PART, max_concurrency=2)
    src, digest = _file(tmp_path / "big", 40 * MiB)
    tracemalloc.start()
    try:
        store.put_file("big", src, sha256=digest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 25 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert store.stat("big").size == 40 * MiB


def test_s3_failed_multipart_upload_is_aborted(s3_server: S3Server, tmp_path: Path) -> None:
    store = s3_server.store(part_size=PART, multipart_threshold=PART)
    src, _ = _file(tmp_path / "big", 2 * PART + 1)
    with pytest.raises(IntegrityError):
        store.put_file("big", src, sha256="0" * 64)
    uploads = s3_server.client().list_multipart_uploads(
        Bucket=s3_server.bucket, Prefix=store.prefix
    )
    assert uploads.get("Uploads", []) == []


# -- URLs ----------------------------------------------------------------------------------


def test_open_store_local_urls(tmp_path: Path) -> None:
    for url in [(tmp_path / "a").as_uri(), str(tmp_path / "b")]:
        store = open_store(url)
        assert isinstance(store, LocalObjectStore)
        store.put_bytes("k", b"1")
    assert (tmp_path / "a" / "k").read_bytes() == b"1"


def test_s3_url_options() -> None:
    opts = s3_options(
        "s3://AK:se%2Fcr%2Bet@my-bucket/some/prefix/?endpoint=http://127.0.0.1:8333"
        "&region=eu-west-1&create_bucket=true&part_size=8MiB&multipart_threshold=100MB"
        "&max_concurrency=2&addressing=path"
    )
    assert opts == {
        "bucket": "my-bucket",
        "prefix": "some/prefix",
        "access_key": "AK",
        "secret_key": "se/cr+et",
        "endpoint_url": "http://127.0.0.1:8333",
        "region": "eu-west-1",
        "create_bucket": True,
        "part_size": 8 * MiB,
        "multipart_threshold": 100_000_000,
        "max_concurrency": 2,
        "addressing_style": "path",
    }
    assert s3_options("s3://bucket") == {"bucket": "bucket", "prefix": ""}
    assert redact_url("s3://AK:secret@b/p?x=1") == "s3://AK:***@b/p?x=1"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("gs://bucket", "unknown scheme"),
        ("file://relative/path", "absolute path"),
        ("s3://Bad_Bucket", "not a valid bucket"),
        ("s3://bucket?endpoint=localhost:9000", "must be 'http"),
        ("s3://bucket?colour=blue", "unknown option"),
        ("s3://bucket?create_bucket=maybe", "true or false"),
        ("s3://bucket?part_size=big", "not a size"),
        ("s3://onlykey@bucket", "KEY:SECRET"),
    ],
)
def test_bad_store_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(StoreURLError, match=message):
        open_store(url)


def test_bad_url_error_hides_the_secret() -> None:
    with pytest.raises(StoreURLError) as err:
        open_store("s3://AK:topsecret@bucket?colour=blue")
    assert "topsecret" not in str(err.value)


def test_open_store_s3_url_round_trip(s3_server: S3Server, tmp_path: Path) -> None:
    store = open_store(s3_server.url("url-test", create_bucket="true", part_size="5MiB"))
    src, digest = _file(tmp_path / "f", PART + 1)
    store.put_file("f", src, sha256=digest)
    assert store.stat("f").size == PART + 1  # type: ignore[union-attr]
    assert s3_server.client().head_object(Bucket=s3_server.bucket, Key="url-test/f")
    store.delete_prefix("f")
