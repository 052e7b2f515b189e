"""weightsmith.client against scripted HTTP answers (httpx.MockTransport): retries and their
Idempotency-Key, problem+json errors, cursor paging, waiting, and downloads that verify every
file and never send the API key to the host a redirect points at.

The end-to-end behaviour against a real ``weightsmith serve`` is in test_cli_client.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from weightsmith import client as client_module
from weightsmith.client import (
    Client,
    ClientError,
    ConfigurationError,
    DownloadError,
    IntegrityError,
    ServiceUnreachable,
    WaitTimeout,
    parse_artifact_ref,
)

API = "http://api.test:8000"
KEY = "wsk_abc_secret"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff pauses are recorded, not slept."""
    pauses: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", pauses.append)
    return pauses


def make_client(handler: Handler, **kwargs: Any) -> Client:
    return Client(API, KEY, transport=httpx.MockTransport(handler), **kwargs)


def job_json(job_id: str = "j1", state: str = "queued", **extra: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "kind": "merge",
        "state": state,
        "artifact_name": "soup",
        "recipe": {"merge_method": "linear"},
        "created_at": "2025-01-01T00:00:00Z",
        "max_attempts": 3,
        **extra,
    }


def problem(status: int, title: str, detail: str, **extra: Any) -> httpx.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return httpx.Response(
        status, content=json.dumps(body), headers={"content-type": "application/problem+json"}
    )


# -- configuration -----------------------------------------------------------------------------


def test_url_and_token_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=job_json())

    monkeypatch.setenv("WEIGHTSMITH_URL", "http://env.test:9000/prefix/")
    monkeypatch.setenv("WEIGHTSMITH_TOKEN", "wsk_env_key")
    with Client(transport=httpx.MockTransport(handler)) as ws:
        ws.get_job("j1")
    assert str(seen[0].url) == "http://env.test:9000/prefix/v1/jobs/j1"
    assert seen[0].headers["authorization"] == "Bearer wsk_env_key"


@pytest.mark.parametrize(
    ("url", "token", "says"),
    [
        (None, KEY, "WEIGHTSMITH_URL"),
        (API, None, "WEIGHTSMITH_TOKEN"),
        ("api.test:8000", KEY, "not an http"),
    ],
)
def test_a_missing_url_or_token_is_a_configuration_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, url: str | None, token: str | None, says: str
) -> None:
    monkeypatch.delenv("WEIGHTSMITH_URL", raising=False)
    monkeypatch.delenv("WEIGHTSMITH_TOKEN", raising=False)
    with pytest.raises(ConfigurationError, match=says):
        Client(url, token)


# -- retries -----------------------------------------------------------------------------------


def test_a_submission_is_resent_after_503_and_a_dropped_connection_with_the_same_key(
    no_sleep: list[float],
) -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if len(requests) == 1:
            return problem(503, "Service Unavailable", "broker down", headers={})
        if len(requests) == 2:
            raise httpx.ConnectError("connection reset", request=request)
        return httpx.Response(202, json=job_json("j7"))

    with make_client(handler, backoff_s=0.5) as ws:
        job = ws.submit_job("merge", {"merge_method": "linear"}, "soup")
    assert job.id == "j7"
    assert len(requests) == 3
    keys = {r.headers["idempotency-key"] for r in requests}
    assert len(keys) == 1 and len(keys.pop()) >= 32  # generated, and the same every time
    assert json.loads(requests[0].content) == {
        "kind": "merge",
        "recipe": {"merge_method": "linear"},
        "artifact_name": "soup",
    }
    assert len(no_sleep) == 2 and no_sleep[1] > no_sleep[0] >= 0.5  # exponential backoff


def test_retry_after_of_the_server_sets_the_pause(no_sleep: list[float]) -> None:
    answers = iter(
        [
            httpx.Response(503, headers={"Retry-After": "7"}, json={"title": "x", "status": 503}),
            httpx.Response(200, json=job_json()),
        ]
    )
    with make_client(lambda request: next(answers)) as ws:
        ws.get_job("j1")
    assert no_sleep == [7.0]


def test_an_idempotency_key_still_in_flight_409_is_retried_for_submissions_only() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return problem(409, "Request in progress", "still being processed")
        return httpx.Response(202, json=job_json())

    with make_client(handler) as ws:
        assert ws.submit_job("merge", {}, "soup", idempotency_key="k-1").id == "j1"
    assert calls["n"] == 2


def test_a_given_idempotency_key_and_options_are_sent() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json=job_json())

    with make_client(handler) as ws:
        ws.submit_job(
            "edit",
            {"edit_method": "rome"},
            "fixed",
            idempotency_key="key-42",
            callback_url="https://hooks.test/ws",
            publish={"hub_repo": "org/fixed"},
        )
    assert seen[0].headers["idempotency-key"] == "key-42"
    body = json.loads(seen[0].content)
    assert body["kind"] == "edit"
    assert body["callback_url"] == "https://hooks.test/ws"
    assert body["publish"] == {"hub_repo": "org/fixed"}


def test_an_unreachable_service_fails_after_the_retries_with_a_readable_error() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with make_client(handler, retries=2) as ws, pytest.raises(ServiceUnreachable) as caught:
        ws.get_job("j1")
    assert calls["n"] == 3
    assert "cannot reach the weightsmith service at http://api.test:8000" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_client_errors_are_not_retried_and_carry_the_problem() -> None:
    calls = {"n": 0}
    errors = [
        {"detail": "an artifact name is 1 to 100 lowercase letters", "pointer": "/artifact_name"},
        {"detail": "Field required", "pointer": "/recipe/models"},
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return problem(
            422, "Invalid request", "/artifact_name: an artifact name is …", errors=errors
        )

    with make_client(handler) as ws, pytest.raises(ClientError) as caught:
        ws.submit_job("merge", {}, "Bad Name")
    e = caught.value
    assert calls["n"] == 1
    assert (e.status, e.title) == (422, "Invalid request")
    assert [p.pointer for p in e.errors] == ["/artifact_name", "/recipe/models"]
    assert e.problem["errors"] == errors
    # one line, naming every pointer (the detail named the first only)
    assert str(e) == (
        "422 Invalid request: /artifact_name: an artifact name is …; /recipe/models: Field required"
    )


def test_an_error_that_is_not_problem_json_is_still_one_readable_line() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="<html>\n<b>upstream broke</b>\n</html>")

    with make_client(handler, retries=0) as ws, pytest.raises(ClientError) as caught:
        ws.list_artifacts()
    assert caught.value.status == 500
    assert str(caught.value) == "500 Internal Server Error: <html> <b>upstream broke</b> </html>"


# -- paging and waiting ------------------------------------------------------------------------


def test_list_jobs_follows_the_cursor_and_stops_at_the_limit() -> None:
    pages = {
        None: ([job_json("a"), job_json("b")], "c1"),
        "c1": ([job_json("c"), job_json("d")], "c2"),
        "c2": ([job_json("e")], None),
    }
    seen: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        seen.append(params)
        items, cursor = pages[params.get("cursor")]
        return httpx.Response(200, json={"items": items, "next_cursor": cursor})

    with make_client(handler) as ws:
        assert [j.id for j in ws.list_jobs(state="succeeded", page_size=2)] == list("abcde")
        assert seen[0] == {"limit": "2", "state": "succeeded"}
        seen.clear()
        assert [j.id for j in ws.list_jobs(limit=3, page_size=2)] == ["a", "b", "c"]
        assert len(seen) == 2  # the third page is never asked for


def test_wait_reports_each_change_and_returns_the_final_job() -> None:
    states = iter(
        [
            job_json(state="queued"),
            job_json(state="running", progress={"phase": "merge", "tensors_done": 1}),
            job_json(state="running", progress={"phase": "merge", "tensors_done": 1}),
            job_json(state="running", progress={"phase": "merge", "tensors_done": 5}),
            job_json(state="succeeded", artifact={"name": "soup", "version": 2, "uri": "x"}),
        ]
    )
    seen: list[tuple[str, int]] = []
    with make_client(lambda request: httpx.Response(200, json=next(states))) as ws:
        job = ws.wait("j1", on_progress=lambda j: seen.append((j.state, j.progress.tensors_done)))
    assert job.state == "succeeded" and job.artifact is not None and job.artifact.version == 2
    assert seen == [("queued", 0), ("running", 1), ("running", 5), ("succeeded", 0)]


def test_wait_gives_up_after_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(client_module.time, "monotonic", lambda: next(clock))
    with (
        make_client(lambda request: httpx.Response(200, json=job_json(state="running"))) as ws,
        pytest.raises(WaitTimeout, match="still running after 3 s") as caught,
    ):
        ws.wait("j1", timeout_s=3)
    assert caught.value.job.state == "running"


# -- downloads ---------------------------------------------------------------------------------

FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 40,
    "sub/tokenizer.json": b"{}",
}


def manifest_of(files: dict[str, bytes], version: int = 3) -> dict[str, Any]:
    return {
        "files": [
            {"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
            for p, b in files.items()
        ],
        "artifact": {"name": "soup", "version": version, "reference": f"artifact://soup@{version}"},
    }


class FakeStore:
    """The API (version 3 of 'soup', files redirected to a presigned URL on another host)
    and the object store host; records every request."""

    def __init__(self, served: dict[str, bytes], *, manifest: dict[str, Any] | None = None):
        self.served = served
        self.manifest = manifest or manifest_of(FILES)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = request.url
        if url.host == "api.test":
            if url.path in ("/v1/artifacts/soup/versions/latest", "/v1/artifacts/soup/versions/3"):
                return httpx.Response(200, json=self.manifest)
            prefix = "/v1/artifacts/soup/versions/3/files/"
            assert url.path.startswith(prefix), url
            rel = url.path[len(prefix) :]
            signed = f"https://store.test/bucket/t/soup/v3/{rel}?X-Amz-Signature=abc"
            return httpx.Response(307, headers={"Location": signed})
        assert url.host == "store.test"
        assert url.params["X-Amz-Signature"] == "abc"
        return httpx.Response(200, content=self.served[url.path.split("/v3/", 1)[1]])


def test_download_follows_presigned_redirects_without_the_api_key_and_verifies_files(
    tmp_path: Path,
) -> None:
    store = FakeStore(FILES)
    progress: list[int] = []
    with make_client(store) as ws:
        out = ws.download(
            "artifact://soup@latest",
            tmp_path / "soup",
            on_progress=lambda p: progress.append(p.bytes_done),
        )
    assert out == tmp_path / "soup"
    for rel, data in FILES.items():
        assert (
            hashlib.sha256((out / rel).read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
        )
    assert json.loads((out / "manifest.json").read_text()) == manifest_of(FILES)
    api = [r for r in store.requests if r.url.host == "api.test"]
    elsewhere = [r for r in store.requests if r.url.host == "store.test"]
    assert len(elsewhere) == len(FILES)
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in api)
    assert all("authorization" not in r.headers for r in elsewhere)
    # files come from the pinned version (3), even though 'latest' was asked for
    assert all("/versions/3/files/" in r.url.path for r in api[1:])
    assert progress[-1] == sum(len(b) for b in FILES.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]


def test_a_file_whose_sha256_differs_fails_the_download_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    tampered = dict(FILES)
    data = bytearray(FILES["model.safetensors"])
    data[100] ^= 0xFF  # same size, other bytes
    tampered["model.safetensors"] = bytes(data)
    with make_client(FakeStore(tampered)) as ws, pytest.raises(IntegrityError) as caught:
        ws.download("soup", tmp_path / "soup")
    assert caught.value.file == "model.safetensors"
    assert "sha256" in str(caught.value) and "artifact://soup@3" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_file_longer_than_its_manifest_entry_is_refused(tmp_path: Path) -> None:
    longer = {**FILES, "config.json": FILES["config.json"] + b" "}
    with make_client(FakeStore(longer)) as ws, pytest.raises(IntegrityError, match="larger"):
        ws.download("soup@3", tmp_path / "soup")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", "manifest.json"])
def test_a_manifest_entry_outside_the_target_is_refused_before_anything_is_written(
    tmp_path: Path, path: str
) -> None:
    manifest = manifest_of(FILES)
    manifest["files"].append({"path": path, "size": 1, "sha256": "0" * 64})
    with (
        make_client(FakeStore(FILES, manifest=manifest)) as ws,
        pytest.raises(DownloadError, match="unsafe"),
    ):
        ws.download("soup", tmp_path / "out" / "soup")
    assert list(tmp_path.iterdir()) == []


def test_a_download_into_a_non_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "keep.txt").write_text("mine")
    with make_client(FakeStore(FILES)) as ws, pytest.raises(DownloadError, match="not empty"):
        ws.download("soup", tmp_path / "soup")
    assert (tmp_path / "soup" / "keep.txt").read_text() == "mine"


def test_artifact_references_parse_in_every_accepted_form() -> None:
    assert parse_artifact_ref("artifact://soup@3") == client_module.ArtifactRef("soup", "3")
    assert parse_artifact_ref("artifact://soup@latest").version == "latest"
    assert parse_artifact_ref("soup").version is None
    assert parse_artifact_ref("soup@2").version == "2"
    with pytest.raises(ClientError, match="lowercase"):
        parse_artifact_ref("artifact://Soup")
