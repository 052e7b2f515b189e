"""Uploads (``/v1/uploads``): a tenant's own files, sent in resumable chunks, published as an
artifact version — through the real app on SQLite and PostgreSQL, with a local object store
and, where marked, SeaweedFS.

Expected digests are computed here with hashlib from the bytes the test sends; a published
file is compared byte for byte with what was sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.artifacts import download_artifact, list_versions
from service.uploads import (
    LEASE_STALE_S,
    STAGING,
    UploadCaps,
    UploadConflict,
    UploadNotFound,
    complete_upload,
    inspect_upload,
    sweep_expired_uploads,
    upload_prefix,
)
from testbed.api import ApiHarness
from tests.support.api import MakeApi, assert_problem
from weightsmith.client import Client, LocalFilesError, UploadError

SMALL_CHUNK = 16  # bytes: files of a few dozen bytes take several chunks


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def declare(files: dict[str, bytes]) -> list[dict[str, Any]]:
    return [{"path": p, "size": len(d), "sha256": sha(d)} for p, d in files.items()]


class Uploader:
    """The raw HTTP protocol, one request per call, with a tenant's key."""

    def __init__(self, api: ApiHarness, headers: dict[str, str] | None = None) -> None:
        self.api = api
        self.headers = headers or api.headers

    def create(self, name: str, files: list[dict[str, Any]], **extra: Any) -> httpx.Response:
        body = {"artifact_name": name, "files": files, **extra}
        return self.api.client.post("/v1/uploads", json=body, headers=self.headers)

    def put(self, upload_id: str, path: str, data: bytes, start: int, total: int) -> Any:
        end = start + len(data) - 1
        headers = {**self.headers, "Content-Range": f"bytes {start}-{end}/{total}"}
        return self.api.client.put(
            f"/v1/uploads/{upload_id}/files/{path}", content=data, headers=headers
        )

    def send(
        self, upload_id: str, path: str, data: bytes, *, start: int = 0, total: int | None = None
    ) -> None:
        """``data`` from byte ``start`` of a file of ``total`` bytes (default: ``data`` ends
        it), in SMALL_CHUNK chunks."""
        total = start + len(data) if total is None else total
        for at in range(0, len(data), SMALL_CHUNK):
            piece = data[at : at + SMALL_CHUNK]
            r = self.put(upload_id, path, piece, start + at, total)
            assert r.status_code == 200, r.text
            assert r.json()["offset"] == start + at + len(piece)

    def offset(self, upload_id: str, path: str) -> int:
        r = self.api.client.head(f"/v1/uploads/{upload_id}/files/{path}", headers=self.headers)
        assert r.status_code == 200, r.headers
        return int(r.headers["upload-offset"])

    def complete(self, upload_id: str) -> httpx.Response:
        return self.api.client.post(f"/v1/uploads/{upload_id}/complete", headers=self.headers)

    def get(self, upload_id: str) -> httpx.Response:
        return self.api.client.get(f"/v1/uploads/{upload_id}", headers=self.headers)

    def upload(self, name: str, files: dict[str, bytes]) -> dict[str, Any]:
        r = self.create(name, declare(files))
        assert r.status_code == 201, r.text
        upload_id = r.json()["id"]
        for path, data in files.items():
            self.send(upload_id, path, data)
        done = self.complete(upload_id)
        assert done.status_code == 200, done.text
        body: dict[str, Any] = done.json()
        return body


class InProcess(httpx.BaseTransport):
    """Hands a weightsmith.client request to the harness's TestClient: the app, in-process."""

    def __init__(self, api: ApiHarness) -> None:
        self.api = api

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()  # TestClient speaks its own httpx fork: pass plain values
        r = self.api.client.request(
            request.method, str(request.url), headers=dict(request.headers), content=body
        )
        return httpx.Response(r.status_code, headers=list(r.headers.items()), content=r.content)


def api_client(api: ApiHarness, transport: httpx.BaseTransport | None = None) -> Client:
    """weightsmith.client talking to the harness's app (through ``transport`` if given)."""
    token = api.headers["Authorization"].removeprefix("Bearer ")
    return Client("http://testserver", token, transport=transport or InProcess(api))


def age(api: ApiHarness, key: str, *, hours: float) -> None:
    """Make an object of the harness's local store look written ``hours`` ago."""
    path = Path(api.settings.object_store_url.removeprefix("file://")) / key
    then = (datetime.now(UTC) - timedelta(hours=hours)).timestamp()
    os.utime(path, (then, then))


def staged_keys(api: ApiHarness, upload_id: str) -> list[str]:
    return [o.key for o in api.service.store.list(upload_prefix(api.tenant, upload_id))]


@pytest.fixture
def api(make_api: MakeApi) -> ApiHarness:
    return make_api(max_upload_chunk_bytes=SMALL_CHUNK)


FILES = {
    "model.safetensors": bytes(range(256)) * 3 + b"tail",
    "config.json": b'{"model_type": "llama", "hidden_size": 8}',
    "tokenizer/vocab.txt": b"a\nb\nc\n",
}


# ---- the happy path ----------------------------------------------------------------------


def test_an_upload_sent_in_chunks_is_published_with_a_manifest_and_downloads_byte_for_byte(
    api: ApiHarness,
) -> None:
    up = Uploader(api)
    created = up.create("mine", declare(FILES), description="my fine-tune")
    assert created.status_code == 201, created.text
    view = created.json()
    upload_id = view["id"]
    assert created.headers["location"] == f"/v1/uploads/{upload_id}"
    assert view["state"] == "open"
    assert [f["offset"] for f in view["files"]] == [0, 0, 0]
    assert view["limits"]["max_chunk_bytes"] == SMALL_CHUNK
    assert view["bytes_total"] == sum(len(d) for d in FILES.values())

    for path, data in FILES.items():
        up.send(upload_id, path, data)
    done = up.complete(upload_id)

    assert done.status_code == 200, done.text
    body = done.json()
    assert body["state"] == "published"
    assert body["artifact"] == {"name": "mine", "version": 1, "uri": "artifact://mine@1"}
    manifest = api.client.get("/v1/artifacts/mine/versions/1", headers=api.headers).json()
    assert manifest["kind"] == "upload"
    assert "recipe" not in manifest
    assert manifest["description"] == "my fine-tune"
    assert manifest["upload"]["id"] == upload_id
    assert manifest["upload"]["uploaded_by"] == {"tenant": api.tenant}
    assert manifest["artifact"]["reference"] == "artifact://mine@1"
    assert sorted((f["path"], f["size"], f["sha256"]) for f in manifest["files"]) == sorted(
        (p, len(d), sha(d)) for p, d in FILES.items()
    )
    for path, data in FILES.items():
        got = api.client.get(f"/v1/artifacts/mine/versions/1/files/{path}", headers=api.headers)
        assert got.status_code == 200
        assert got.content == data
    # the staged chunks are gone; only the record of the upload stays until it expires
    assert sorted(k.rsplit("/", 1)[1] for k in staged_keys(api, upload_id)) == [
        "published.json",
        "upload.json",
    ]


def test_completing_again_returns_the_same_version_and_a_new_upload_gets_the_next(
    api: ApiHarness,
) -> None:
    up = Uploader(api)
    first = up.upload("mine", {"a.txt": b"first version"})
    again = up.complete(first["id"])
    assert again.status_code == 200, again.text
    assert again.json()["artifact"]["version"] == 1

    second = up.upload("mine", {"a.txt": b"second version"})

    assert second["artifact"]["version"] == 2
    got = api.client.get("/v1/artifacts/mine/versions/2/files/a.txt", headers=api.headers)
    assert got.content == b"second version"
    assert [v.version for v in list_versions(api.service.store, api.tenant, "mine")] == [1, 2]


def test_an_empty_file_needs_no_chunk(api: ApiHarness) -> None:
    up = Uploader(api)
    created = up.create("empty", declare({"empty.txt": b"", "x.txt": b"x"})).json()
    assert [f["complete"] for f in created["files"]] == [True, False]
    up.send(created["id"], "x.txt", b"x")

    done = up.complete(created["id"])

    assert done.status_code == 200, done.text
    got = api.client.get("/v1/artifacts/empty/versions/1/files/empty.txt", headers=api.headers)
    assert got.content == b""


# ---- resuming ----------------------------------------------------------------------------


def test_a_chunk_at_the_wrong_offset_is_409_with_the_offset_expected(api: ApiHarness) -> None:
    up = Uploader(api)
    data = b"0123456789" * 4
    upload_id = up.create("x", declare({"f.txt": data})).json()["id"]
    assert up.put(upload_id, "f.txt", data[:16], 0, len(data)).status_code == 200

    for start in (0, 8, 20):  # resent, overlapping, leaving a gap
        r = up.put(upload_id, "f.txt", data[start : start + 4], start, len(data))
        body = assert_problem(r, 409)
        assert body["offset"] == 16
        assert r.headers["upload-offset"] == "16"
        assert "16" in body["detail"]

    assert up.offset(upload_id, "f.txt") == 16
    got = api.client.get(f"/v1/uploads/{upload_id}/files/f.txt", headers=api.headers).json()
    assert got == {
        "path": "f.txt",
        "size": 40,
        "sha256": sha(data),
        "offset": 16,
        "complete": False,
    }


def test_a_chunk_cut_short_stores_nothing_and_the_upload_resumes_from_the_offset(
    api: ApiHarness,
) -> None:
    up = Uploader(api)
    data = b"abcdefghijklmnopqrstuvwxyz012345"
    upload_id = up.create("x", declare({"f.txt": data})).json()["id"]
    up.send(upload_id, "f.txt", data[:16], total=len(data))
    before = staged_keys(api, upload_id)
    headers = {**api.headers, "Content-Range": "bytes 16-31/32", "Content-Length": "16"}

    # the body ends after 5 of the 16 bytes announced (a connection that broke off)
    r = api.client.put(f"/v1/uploads/{upload_id}/files/f.txt", content=data[16:21], headers=headers)

    assert_problem(r, 400)
    assert "nothing was stored" in r.json()["detail"]
    assert up.offset(upload_id, "f.txt") == 16
    assert staged_keys(api, upload_id) == before
    up.send(upload_id, "f.txt", data[16:], start=16)  # resend the whole chunk
    assert up.complete(upload_id).status_code == 200


def test_upload_offset_header_places_a_chunk_like_content_range(api: ApiHarness) -> None:
    up = Uploader(api)
    data = b"x" * 20 + b"y" * 5
    upload_id = up.create("x", declare({"f.txt": data})).json()["id"]
    url = f"/v1/uploads/{upload_id}/files/f.txt"

    first = api.client.put(url, content=data[:16], headers={**api.headers, "Upload-Offset": "0"})
    second = api.client.put(url, content=data[16:], headers={**api.headers, "Upload-Offset": "16"})

    assert (first.status_code, second.status_code) == (200, 200)
    assert second.headers["upload-offset"] == "25"
    assert up.complete(upload_id).json()["artifact"]["version"] == 1


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "Content-Range"),
        ({"Content-Range": "bytes 0-3"}, "START-END/TOTAL"),
        ({"Content-Range": "bytes 5-3/10"}, "START <= END"),
        ({"Content-Range": "items 0-3/10"}, "START-END/TOTAL"),
        ({"Upload-Offset": "-1"}, "byte offset"),
        ({"Content-Range": "bytes 0-3/10", "Upload-Offset": "1"}, "disagree"),
        ({"Content-Range": "bytes 0-3/11"}, "declared with 10"),
    ],
)
def test_a_chunk_with_bad_headers_is_400_saying_what_is_expected(
    api: ApiHarness, headers: dict[str, str], why: str
) -> None:
    up = Uploader(api)
    upload_id = up.create("x", declare({"f.txt": b"0123456789"})).json()["id"]

    r = api.client.put(
        f"/v1/uploads/{upload_id}/files/f.txt", content=b"0123", headers={**api.headers, **headers}
    )

    assert why in assert_problem(r, 400)["detail"]
    assert up.offset(upload_id, "f.txt") == 0


def test_a_chunk_past_the_declared_size_or_empty_is_refused(api: ApiHarness) -> None:
    up = Uploader(api)
    upload_id = up.create("x", declare({"f.txt": b"0123456789"})).json()["id"]
    url = f"/v1/uploads/{upload_id}/files/f.txt"

    past = api.client.put(
        url, content=b"0123456789AB", headers={**api.headers, "Upload-Offset": "0"}
    )
    empty = api.client.put(url, content=b"", headers={**api.headers, "Upload-Offset": "0"})

    assert "10 bytes left" in assert_problem(past, 400)["detail"]
    assert "0 bytes" in assert_problem(empty, 400)["detail"]
    assert up.offset(upload_id, "f.txt") == 0


# ---- verification ------------------------------------------------------------------------


def test_bytes_that_differ_from_the_declared_sha256_are_422_and_nothing_is_published(
    api: ApiHarness,
) -> None:
    up = Uploader(api)
    good = b"the right bytes, 32 of them....."
    bad = b"the wrong bytes, 32 of them....."
    other = b"fine"
    upload_id = up.create("x", declare({"f.txt": good, "g.txt": other})).json()["id"]
    up.send(upload_id, "f.txt", bad)
    up.send(upload_id, "g.txt", other)

    r = up.complete(upload_id)

    body = assert_problem(r, 422)
    assert body["title"] == "Checksum mismatch"
    assert (
        "'f.txt'" in body["detail"] and sha(good) in body["detail"] and sha(bad) in body["detail"]
    )
    assert body["mismatches"] == [
        {
            "path": "f.txt",
            "declared_sha256": sha(good),
            "received_sha256": sha(bad),
            "declared_size": 32,
            "received_size": 32,
        }
    ]
    assert body["errors"][0]["pointer"] == "/files/0/sha256"
    assert list_versions(api.service.store, api.tenant, "x") == []
    assert api.client.get("/v1/artifacts/x/versions", headers=api.headers).status_code == 404
    # that file's bytes were discarded, the other file's kept: resend it and complete
    view = up.get(upload_id).json()
    assert view["state"] == "open"
    assert [f["offset"] for f in view["files"]] == [0, len(other)]
    up.send(upload_id, "f.txt", good)
    assert up.complete(upload_id).json()["artifact"]["version"] == 1


def test_completing_before_every_byte_arrived_is_409_listing_what_is_missing(
    api: ApiHarness,
) -> None:
    up = Uploader(api)
    upload_id = up.create("x", declare({"f.txt": b"a" * 40, "g.txt": b"b"})).json()["id"]
    up.send(upload_id, "f.txt", b"a" * 16, total=40)

    body = assert_problem(up.complete(upload_id), 409)

    assert body["incomplete"] == [
        {"path": "f.txt", "size": 40, "offset": 16},
        {"path": "g.txt", "size": 1, "offset": 0},
    ]
    assert list_versions(api.service.store, api.tenant, "x") == []
    assert up.get(upload_id).json()["state"] == "open"


def test_chunks_for_a_published_upload_are_409(api: ApiHarness) -> None:
    up = Uploader(api)
    done = up.upload("x", {"f.txt": b"data"})

    r = up.put(done["id"], "f.txt", b"data", 0, 4)

    assert "already published as artifact://x@1" in assert_problem(r, 409)["detail"]


# ---- validation of the declaration -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/etc/passwd", "absolute"),
        ("../outside.safetensors", "'..'"),
        ("a/../../b.safetensors", "'..'"),
        ("a//b.safetensors", "empty"),
        ("./a.safetensors", "'.'"),
        ("a\\b.safetensors", "backslash"),
        ("a\x00b.safetensors", "NUL character"),  # refused by the body's caps already
        ("folder/", "ends with '/'"),
        ("", "empty"),
        ("manifest.json", "written by weightsmith"),
        ("x" * 600 + ".safetensors", "longer than 512 bytes"),
        ("pytorch_model.bin", "pickle"),
        ("model.PT", "pickle"),
        ("sub/model.pth", "pickle"),
        ("state.pkl", "pickle"),
        ("last.ckpt", "pickle"),
    ],
)
def test_every_bad_path_form_is_422_naming_the_file(api: ApiHarness, path: str, why: str) -> None:
    files = [{"path": "ok.safetensors", "size": 1, "sha256": sha(b"x")}]
    files.append({"path": path, "size": 1, "sha256": sha(b"x")})

    body = assert_problem(Uploader(api).create("x", files), 422)

    assert [e["pointer"] for e in body["errors"]] == ["/files/1/path"]
    assert why in body["errors"][0]["detail"]
    assert list(api.service.store.list(STAGING)) == []


def test_a_pickle_is_refused_with_the_advice_to_send_safetensors(api: ApiHarness) -> None:
    files = [{"path": "pytorch_model.bin", "size": 1, "sha256": sha(b"x")}]

    detail = assert_problem(Uploader(api).create("x", files), 422)["errors"][0]["detail"]

    assert "safetensors" in detail and "run code" in detail


@pytest.mark.parametrize(
    ("files", "pointer", "why"),
    [
        ([{"path": "a", "size": 1, "sha256": "0" * 63}], "/files/0/sha256", "hex sha256"),
        ([{"path": "a", "size": 1, "sha256": "g" * 64}], "/files/0/sha256", "hex sha256"),
        ([{"path": "a", "size": -1, "sha256": "0" * 64}], "/files/0/size", "greater than"),
        ([{"path": "a", "size": 1}], "/files/0/sha256", "required"),
        ([{"path": "a", "size": 1, "sha256": "0" * 64, "mode": "x"}], "/files/0/mode", "not"),
        ([], "/files", "at least 1"),
        (
            [
                {"path": "a", "size": 1, "sha256": "0" * 64},
                {"path": "a", "size": 2, "sha256": "1" * 64},
            ],
            "/files/1/path",
            "declared twice",
        ),
        (
            [
                {"path": "a", "size": 1, "sha256": "0" * 64},
                {"path": "a/b", "size": 2, "sha256": "1" * 64},
            ],
            "/files/1/path",
            "also a folder",
        ),
    ],
)
def test_a_bad_file_list_is_422_naming_the_field(
    api: ApiHarness, files: list[dict[str, Any]], pointer: str, why: str
) -> None:
    body = assert_problem(Uploader(api).create("x", files), 422)

    assert pointer in [e["pointer"] for e in body["errors"]]
    assert why in json.dumps(body["errors"])


@pytest.mark.parametrize("name", ["Upper", "-dash", "a/b", "", "x" * 101, "_uploads"])
def test_an_invalid_artifact_name_is_422(api: ApiHarness, name: str) -> None:
    body = assert_problem(Uploader(api).create(name, declare({"a": b"a"})), 422)
    assert [e["pointer"] for e in body["errors"]] == ["/artifact_name"]


def test_the_size_and_count_caps_are_422_naming_the_field(make_api: MakeApi) -> None:
    api = make_api(max_upload_file_bytes=100, max_upload_bytes=150, max_upload_files=3)
    up = Uploader(api)
    one = {"size": 101, "sha256": "0" * 64}

    big_file = assert_problem(up.create("x", [{"path": "a", **one}]), 422)
    too_much = assert_problem(
        up.create("x", [{"path": p, "size": 60, "sha256": "0" * 64} for p in "abc"]), 422
    )
    too_many = assert_problem(
        up.create("x", [{"path": p, "size": 1, "sha256": "0" * 64} for p in "abcd"]), 422
    )

    assert big_file["errors"][0]["pointer"] == "/files/0/size"
    assert "at most 100" in big_file["errors"][0]["detail"]
    assert too_much["errors"][0]["pointer"] == "/files"
    assert "180 bytes" in too_much["errors"][0]["detail"] and "150" in too_much["detail"]
    assert too_many["errors"][0]["pointer"] == "/files"
    assert "at most 3" in too_many["detail"]


def test_a_chunk_larger_than_the_cap_is_413_before_its_body_is_read(api: ApiHarness) -> None:
    up = Uploader(api)
    data = bytes(100)
    upload_id = up.create("x", declare({"f": data})).json()["id"]

    by_range = up.put(upload_id, "f", data[:17], 0, len(data))
    by_length = api.client.put(
        f"/v1/uploads/{upload_id}/files/f",
        content=data[:40],
        headers={**api.headers, "Upload-Offset": "0"},
    )

    # the request limits answer first, naming the setting (app/limits.py BODY_LIMITS)
    for r in (by_range, by_length):
        detail = assert_problem(r, 413)["detail"]
        assert "larger than 16 bytes" in detail and "WEIGHTSMITH_MAX_UPLOAD_CHUNK_BYTES" in detail
    assert up.offset(upload_id, "f") == 0


def test_a_chunked_body_longer_than_the_cap_is_413_while_streaming(api: ApiHarness) -> None:
    """No Content-Length (chunked transfer): the request limits count and stop reading."""
    up = Uploader(api)
    data = bytes(100)
    upload_id = up.create("x", declare({"f": data})).json()["id"]

    def body() -> Any:
        yield data[:10]
        yield data[10:40]

    r = api.client.put(
        f"/v1/uploads/{upload_id}/files/f",
        content=body(),
        headers={**api.headers, "Upload-Offset": "0"},
    )

    assert "larger than 16 bytes" in assert_problem(r, 413)["detail"]
    assert up.offset(upload_id, "f") == 0


def test_a_tenant_may_hold_only_so_many_open_uploads(make_api: MakeApi) -> None:
    api = make_api(max_open_uploads=2)
    up = Uploader(api)
    ids = [up.create("x", declare({"a": b"a"})).json()["id"] for _ in range(2)]

    refused = up.create("x", declare({"a": b"a"}))

    body = assert_problem(refused, 429)
    assert sorted(body["open_uploads"]) == sorted(ids)
    api.client.delete(f"/v1/uploads/{ids[0]}", headers=api.headers)
    assert up.create("x", declare({"a": b"a"})).status_code == 201
    _, headers = api.new_tenant()  # the cap is per tenant
    assert Uploader(api, headers).create("x", declare({"a": b"a"})).status_code == 201


def test_a_tenant_whose_name_cannot_own_artifacts_is_refused(api: ApiHarness) -> None:
    key = api.service.keys.create_key("Not A Slug/..")
    headers = {"Authorization": f"Bearer {key}"}

    r = Uploader(api, headers).create("x", declare({"a": b"a"}))

    assert "cannot own artifacts" in assert_problem(r, 403)["detail"]
    assert list(api.service.store.list(STAGING)) == []


# ---- isolation, abort, expiry ------------------------------------------------------------


def test_another_tenants_upload_id_is_404_like_an_unknown_one(api: ApiHarness) -> None:
    mine = Uploader(api)
    upload_id = mine.create("x", declare({"f.txt": b"0123"})).json()["id"]
    _, other_headers = api.new_tenant()
    theirs = Uploader(api, other_headers)
    unknown = "up_" + "0" * 32

    for uid in (upload_id, unknown, "not-an-id"):
        assert_problem(theirs.get(uid), 404)
        assert_problem(theirs.put(uid, "f.txt", b"0123", 0, 4), 404)
        assert_problem(theirs.complete(uid), 404)
        assert_problem(api.client.delete(f"/v1/uploads/{uid}", headers=other_headers), 404)
        head = api.client.head(f"/v1/uploads/{uid}/files/f.txt", headers=other_headers)
        assert head.status_code == 404

    assert mine.offset(upload_id, "f.txt") == 0  # untouched
    assert mine.get(upload_id).json()["state"] == "open"


def test_an_unknown_file_of_an_upload_is_404_listing_the_files(api: ApiHarness) -> None:
    up = Uploader(api)
    upload_id = up.create("x", declare({"f.txt": b"0123"})).json()["id"]

    r = up.put(upload_id, "g.txt", b"0123", 0, 4)

    assert "'f.txt'" in assert_problem(r, 404)["detail"]


def test_an_aborted_upload_is_gone_with_its_staged_bytes(api: ApiHarness) -> None:
    up = Uploader(api)
    upload_id = up.create("x", declare({"f.txt": b"0123456789" * 3})).json()["id"]
    up.send(upload_id, "f.txt", b"0123456789" * 2, total=30)
    assert staged_keys(api, upload_id)

    r = api.client.delete(f"/v1/uploads/{upload_id}", headers=api.headers)

    assert r.status_code == 204
    assert staged_keys(api, upload_id) == []
    assert_problem(up.get(upload_id), 404)
    assert_problem(up.complete(upload_id), 404)


def test_an_upload_expires_after_its_last_write_and_the_sweep_removes_it(
    api: ApiHarness,
) -> None:
    store = api.service.store
    caps = UploadCaps.from_settings(api.settings)
    up = Uploader(api)
    idle = up.create("x", declare({"f.txt": b"0123456789"})).json()["id"]
    age(api, upload_prefix(api.tenant, idle) + "upload.json", hours=2)  # created long ago
    busy = up.create("y", declare({"f.txt": b"0123456789"})).json()["id"]
    up.send(busy, "f.txt", b"0123", total=10)
    last_chunk = max(o.last_modified for o in store.list(upload_prefix(api.tenant, busy)))
    expires = last_chunk + timedelta(seconds=caps.expiry_s)
    just_before = expires - timedelta(seconds=1)

    with pytest.raises(UploadNotFound, match="expired"):
        inspect_upload(store, api.tenant, idle, caps, now=just_before)
    assert inspect_upload(store, api.tenant, busy, caps, now=just_before).offsets == (4,)
    swept_before = sweep_expired_uploads(store, caps.expiry_s, now=just_before)
    swept_at = sweep_expired_uploads(store, caps.expiry_s, now=expires)

    assert swept_before == [upload_prefix(api.tenant, idle)]
    assert swept_at == [upload_prefix(api.tenant, busy)]
    assert list(store.list(STAGING)) == []
    assert_problem(up.get(busy), 404)


def test_creating_an_upload_sweeps_expired_ones_in_the_background(make_api: MakeApi) -> None:
    api = make_api(upload_expiry=1)
    store = api.service.store
    prefix = f"{STAGING}{api.tenant}/up_{'a' * 32}/"
    store.put_bytes(prefix + "upload.json", b"{}")  # an old, abandoned upload
    age(api, prefix + "upload.json", hours=1)

    assert Uploader(api).create("x", declare({"a": b"a"})).status_code == 201

    assert list(store.list(prefix)) == []


# ---- concurrent and interrupted completion -----------------------------------------------


def test_a_second_completion_while_one_runs_is_409_and_a_stale_one_is_taken_over(
    api: ApiHarness,
) -> None:
    store = api.service.store
    caps = UploadCaps.from_settings(api.settings)
    up = Uploader(api)
    upload_id = up.create("x", declare({"f.txt": b"data"})).json()["id"]
    up.send(upload_id, "f.txt", b"data")
    # another API process is completing it (its lease, beaten just now)
    store.put_bytes(upload_prefix(api.tenant, upload_id) + "complete/000001.lease", b"{}")

    busy = up.complete(upload_id)

    assert "being completed" in assert_problem(busy, 409)["detail"]
    assert up.get(upload_id).json()["state"] == "completing"
    assert (
        "being completed" in assert_problem(up.put(upload_id, "f.txt", b"x", 0, 4), 409)["detail"]
    )
    assert_problem(api.client.delete(f"/v1/uploads/{upload_id}", headers=api.headers), 409)
    # that process died: once its lease is stale, a completion takes over
    later = datetime.now(UTC) + timedelta(seconds=LEASE_STALE_S + 1)
    done = complete_upload(store, api.tenant, upload_id, caps, now=later)
    assert done.state == "published" and done.published is not None
    assert done.published.version == 1


def test_a_completion_that_failed_after_publishing_returns_the_same_version_on_retry(
    api: ApiHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = api.service.store
    up = Uploader(api)
    upload_id = up.create("x", declare({"f.txt": b"data"})).json()["id"]
    up.send(upload_id, "f.txt", b"data")
    real_put_bytes = store.put_bytes

    def lose_the_record(key: str, data: bytes, **kwargs: Any) -> Any:
        if key.endswith("/published.json"):
            raise ConnectionError("the process died here")
        return real_put_bytes(key, data, **kwargs)

    monkeypatch.setattr(store, "put_bytes", lose_the_record)
    with pytest.raises(ConnectionError):
        complete_upload(store, api.tenant, upload_id, UploadCaps.from_settings(api.settings))
    monkeypatch.undo()

    again = up.complete(upload_id)

    assert again.status_code == 200, again.text
    assert again.json()["artifact"]["version"] == 1
    assert [v.version for v in list_versions(store, api.tenant, "x")] == [1]


def test_a_chunk_that_lost_the_race_for_its_offset_is_409_and_deleted(api: ApiHarness) -> None:
    """Two PUTs validated at the same offset: the one that commits second is refused."""
    from service.uploads import commit_chunk, prepare_chunk

    store = api.service.store
    caps = UploadCaps.from_settings(api.settings)
    upload_id = Uploader(api).create("x", declare({"f.txt": b"abcdefgh"})).json()["id"]
    one = prepare_chunk(
        store, api.tenant, upload_id, "f.txt", start=0, length=4, total=8, caps=caps
    )
    two = prepare_chunk(
        store, api.tenant, upload_id, "f.txt", start=0, length=2, total=8, caps=caps
    )
    body = api.tmp / "chunk"
    body.write_bytes(b"abcd")
    assert commit_chunk(store, one, body, size=4, sha256=sha(b"abcd")) == 4
    body.write_bytes(b"ab")

    with pytest.raises(UploadConflict) as lost:
        commit_chunk(store, two, body, size=2, sha256=sha(b"ab"))

    assert lost.value.offset == 4
    parts = [k for k in staged_keys(api, upload_id) if "/part/" in k]
    assert len(parts) == 2  # the winner and its commit marker
    assert inspect_upload(store, api.tenant, upload_id, caps).offsets == (4,)


# ---- on a real S3 server, and as a merge input -------------------------------------------


def test_on_s3_an_uploaded_checkpoint_is_pinned_and_merged_as_an_artifact_input(
    make_api: MakeApi, s3_server: Any, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    from tests.support.checkpoints import linear, tensors
    from workers.runner import run_job

    prefix = f"uploads-{secrets.token_hex(4)}"
    api = make_api(
        object_store_url=s3_server.url(prefix, create_bucket="true"),
        max_upload_chunk_bytes=64 << 10,
    )
    client = api_client(api)
    for name in ("ft1", "ft2"):
        got = client.upload(llama_family[name], name, description=f"tiny llama {name}")
        assert got.reference == f"artifact://{name}@1"

    job = api.submit(
        {
            "kind": "merge",
            "recipe": linear("artifact://ft1", "artifact://ft2"),
            "artifact_name": "soup",
        }
    )
    assert job.status_code == 202, job.text
    pinned = job.json()["recipe"]["models"]
    assert [m["model"] for m in pinned] == ["artifact://ft1@1", "artifact://ft2@1"]
    run_job(
        job.json()["id"],
        store=api.service.jobs,
        settings=api.settings,
        object_store=api.service.store,
        worker_id="w1",
        work_root=tmp_path,
    )

    done = api.client.get(f"/v1/jobs/{job.json()['id']}", headers=api.headers).json()
    assert done["state"] == "succeeded", done.get("error")
    out = download_artifact(api.service.store, api.tenant, "soup", 1, tmp_path / "soup")
    merged, a, b = tensors(out), tensors(llama_family["ft1"]), tensors(llama_family["ft2"])
    assert merged.keys() == a.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], (0.5 * a[key] + 0.5 * b[key]).to(merged[key].dtype))
    client.close()


# ---- the Python client ---------------------------------------------------------------------


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's backoff pauses return at once."""
    from weightsmith import client as client_module

    monkeypatch.setattr(client_module.time, "sleep", lambda s: None)


class Flaky(httpx.BaseTransport):
    """Passes requests to the app, except that the PUTs numbered in ``lose_answer`` reach it
    but their answers are lost, and those in ``drop`` never reach it; ``puts`` records the
    start of every PUT's Content-Range."""

    def __init__(
        self, api: ApiHarness, *, lose_answer: set[int] = frozenset(), drop: set[int] = frozenset()
    ) -> None:
        self.inner = InProcess(api)
        self.lose_answer, self.drop = lose_answer, drop
        self.puts: list[tuple[str, int]] = []
        self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if request.method != "PUT":
            return self.inner.handle_request(request)
        start = int(request.headers["content-range"].split()[1].split("-")[0])
        self.puts.append((request.url.path.rsplit("/", 1)[1], start))
        n = len(self.puts)
        if n in self.drop:
            raise httpx.ConnectError("connection refused", request=request)
        response = self.inner.handle_request(request)
        if n in self.lose_answer:
            raise httpx.ReadError("connection reset by peer", request=request)
        return response


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def published_bytes(api: ApiHarness, name: str, version: int, path: str) -> bytes:
    got = api.client.get(
        f"/v1/artifacts/{name}/versions/{version}/files/{path}", headers=api.headers
    )
    assert got.status_code == 200, got.text
    return bytes(got.content)


def test_the_client_goes_on_from_the_services_offset_after_lost_answers_and_dropped_connections(
    api: ApiHarness, tmp_path: Path, no_sleep: None
) -> None:
    data = bytes(range(200)) * 4  # 800 bytes: 50 chunks of 16
    folder = write_folder(tmp_path / "model", {"model.safetensors": data, "config.json": b"{}"})
    transport = Flaky(api, lose_answer={2, 7}, drop={4})
    seen: list[Any] = []

    with api_client(api, transport) as client:
        got = client.upload(folder, "mine", on_progress=seen.append)

    assert got.reference == "artifact://mine@1"
    assert published_bytes(api, "mine", 1, "model.safetensors") == data
    assert transport.puts[0] == ("config.json", 0)  # files go in path order
    starts = [s for f, s in transport.puts if f == "model.safetensors"]
    # PUTs 2 and 7 landed though their answers were lost: the client asked for the offset and
    # went on after them; PUT 4 never arrived: the same chunk was sent again
    assert starts[:7] == [0, 16, 32, 32, 48, 64, 80]
    assert starts[-1] == 784 and len(starts) == 50 + 1
    assert seen[0].phase == "hashing" and seen[-1].phase == "published"
    sent = [p for p in seen if p.phase == "uploading"]
    assert sent[-1].bytes_done == sent[-1].bytes_total == len(data) + 2
    assert all(p.upload_id for p in sent)


def test_an_interrupted_upload_is_resumed_by_its_id_sending_only_what_is_missing(
    api: ApiHarness, tmp_path: Path, no_sleep: None
) -> None:
    data = b"0123456789abcdef" * 6  # 96 bytes: 6 chunks
    folder = write_folder(tmp_path / "model", {"weights.safetensors": data})
    broken = Flaky(api, drop=set(range(4, 100)))  # the link goes down after 3 chunks
    with api_client(api, broken) as client, pytest.raises(UploadError) as failed:
        client.upload(folder, "mine")
    upload_id = failed.value.upload_id
    assert upload_id is not None and upload_id in str(failed.value)
    assert Uploader(api).offset(upload_id, "weights.safetensors") == 48

    working = Flaky(api)
    with api_client(api, working) as client:
        got = client.upload(folder, "mine", upload_id=upload_id)

    assert got.reference == "artifact://mine@1"
    assert [s for _, s in working.puts] == [48, 64, 80]
    assert published_bytes(api, "mine", 1, "weights.safetensors") == data


def test_resuming_with_files_that_changed_is_refused(api: ApiHarness, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "model", {"a.safetensors": b"one"})
    upload_id = Uploader(api).create("mine", declare({"a.safetensors": b"two"})).json()["id"]

    with api_client(api) as client, pytest.raises(LocalFilesError, match="changed"):
        client.upload(folder, "mine", upload_id=upload_id)


def test_the_client_refuses_pickles_before_sending_anything_and_leaves_hidden_files_out(
    api: ApiHarness, tmp_path: Path
) -> None:
    pickled = write_folder(
        tmp_path / "pickled", {"pytorch_model.bin": b"\x80\x04", "config.json": b"{}"}
    )
    transport = Flaky(api)
    with api_client(api, transport) as client:
        with pytest.raises(LocalFilesError, match=r"pytorch_model\.bin.*pickle"):
            client.upload(pickled, "mine")
        assert transport.requests == 0

        hidden = write_folder(
            tmp_path / "snapshot",
            {"model.safetensors": b"w", ".cache/huggingface/x.lock": b"", ".gitattributes": b"*"},
        )
        client.upload(hidden, "snap")

    manifest = api.client.get("/v1/artifacts/snap/versions/1", headers=api.headers).json()
    assert [f["path"] for f in manifest["files"]] == ["model.safetensors"]


def test_one_file_is_uploaded_under_its_own_name(api: ApiHarness, tmp_path: Path) -> None:
    corpus = write_folder(tmp_path, {"corpus.txt": b"The capital of France is Paris.\n"})

    with api_client(api) as client:
        got = client.upload(corpus / "corpus.txt", "corpora")

    assert got.reference == "artifact://corpora@1"
    assert published_bytes(api, "corpora", 1, "corpus.txt") == b"The capital of France is Paris.\n"


def test_a_file_that_changes_during_the_upload_fails_with_the_services_checksum_error(
    api: ApiHarness, tmp_path: Path
) -> None:
    folder = write_folder(tmp_path / "model", {"model.safetensors": b"a" * 40})

    def change_it(p: Any) -> None:  # after hashing, before sending
        if p.phase == "uploading":
            (folder / "model.safetensors").write_bytes(b"b" * 40)

    with api_client(api) as client, pytest.raises(UploadError) as failed:
        client.upload(folder, "mine", on_progress=change_it)

    assert failed.value.status == 422
    assert "model.safetensors" in str(failed.value) and sha(b"a" * 40) in str(failed.value)
    assert list_versions(api.service.store, api.tenant, "mine") == []


def test_openapi_documents_the_upload_routes(api: ApiHarness) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]

    assert set(paths["/v1/uploads"]) == {"post"}
    assert set(paths["/v1/uploads/{upload_id}"]) == {"get", "delete"}
    assert set(paths["/v1/uploads/{upload_id}/files/{path}"]) == {"get", "head", "put"}
    assert set(paths["/v1/uploads/{upload_id}/complete"]) == {"post"}
    put = paths["/v1/uploads/{upload_id}/files/{path}"]["put"]
    assert "application/octet-stream" in put["requestBody"]["content"]


def test_an_upload_with_an_unreadable_record_counts_as_open_and_can_be_aborted(
    make_api: MakeApi,
) -> None:
    api = make_api(max_open_uploads=1)
    broken = f"up_{'b' * 32}"
    api.service.store.put_bytes(upload_prefix(api.tenant, broken) + "upload.json", b"not json")
    up = Uploader(api)

    assert assert_problem(up.create("x", declare({"a": b"a"})), 429)["open_uploads"] == [broken]
    assert_problem(up.get(broken), 503)
    assert api.client.delete(f"/v1/uploads/{broken}", headers=api.headers).status_code == 204

    assert up.create("x", declare({"a": b"a"})).status_code == 201


def test_a_full_temporary_disk_is_503_and_stores_nothing(
    api: ApiHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from app.routes import uploads as upload_routes
    from service import uploads as upload_infra

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    up = Uploader(api)
    upload_id = up.create("x", declare({"f.txt": b"data"})).json()["id"]
    monkeypatch.setattr(upload_routes.tempfile, "mkstemp", disk_full)
    chunk = up.put(upload_id, "f.txt", b"data", 0, 4)
    monkeypatch.undo()
    up.send(upload_id, "f.txt", b"data")
    monkeypatch.setattr(upload_infra.tempfile, "TemporaryDirectory", disk_full)
    completion = up.complete(upload_id)

    for r in (chunk, completion):
        assert "No space left on device" in assert_problem(r, 503)["detail"]
    assert list_versions(api.service.store, api.tenant, "x") == []
    assert up.get(upload_id).json()["state"] == "open"
