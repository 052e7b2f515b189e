"""The REST API (app/): jobs, artifacts, auth, errors, health — on SQLite and PostgreSQL.

The app runs for real (startup migrates the database) with a local object store and an
in-process queue whose callback records the job ids it is given; running the jobs is the
worker's side and is tested there. Each test using ``api`` or ``make_api`` runs once per
database; every harness has its own tenants (the PostgreSQL database is shared by the
session), so tests never see each other's jobs.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.queue import RUN_JOB_TASK, CeleryQueue, InProcessQueue, QueueUnavailable
from schemas.jobs import JobCreate, JobKind
from testbed.api import MERGE_RECIPE, ApiHarness, merge_job
from testbed.hub import HubServer
from tests.support.api import MakeApi, assert_problem


def _closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---- import hygiene --------------------------------------------------------------------


def test_importing_the_app_imports_neither_torch_nor_workers():
    code = (
        "import sys, app.main\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.split('.')[0] == 'workers']\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- submit, read, list ----------------------------------------------------------------


def test_submit_answers_202_queued_and_enqueues_the_job_id(api: ApiHarness):
    r = api.submit()
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued"
    assert job["kind"] == "merge" and job["artifact_name"] == "soup"
    assert job["attempts"] == 0 and job["max_attempts"] == api.settings.max_attempts
    assert job["recipe"] == MERGE_RECIPE  # s3:// references need no pinning
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert api.enqueued == [job["id"]]

    got = api.client.get(f"/v1/jobs/{job['id']}", headers=api.headers)
    assert got.status_code == 200
    assert got.json() == job
    assert got.json()["progress"] == {
        "phase": None,
        "tensors_done": 0,
        "tensors_total": None,
        "bytes_done": 0,
        "bytes_total": None,
    }


def test_a_yaml_body_is_accepted_like_json(api: ApiHarness):
    body = yaml.safe_dump(merge_job(name="from-yaml"))
    for content_type in ("application/yaml", "text/yaml; charset=utf-8"):
        r = api.client.post(
            "/v1/jobs",
            content=body,
            headers={**api.headers, "Content-Type": content_type},
        )
        assert r.status_code == 202, r.text
        assert r.json()["artifact_name"] == "from-yaml"
        assert r.json()["recipe"] == MERGE_RECIPE


def test_listing_is_newest_first_with_cursor_pages_and_filters(api: ApiHarness):
    ids = [api.submit().json()["id"] for _ in range(5)]
    pages, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        r = api.client.get("/v1/jobs", params=params, headers=api.headers)
        assert r.status_code == 200, r.text
        pages.append([j["id"] for j in r.json()["items"]])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == ids[::-1]

    api.client.post(f"/v1/jobs/{ids[1]}/cancel", headers=api.headers)
    cancelled = api.client.get("/v1/jobs", params={"state": "cancelled"}, headers=api.headers)
    assert [j["id"] for j in cancelled.json()["items"]] == [ids[1]]
    queued = api.client.get("/v1/jobs", params={"state": "queued"}, headers=api.headers)
    assert len(queued.json()["items"]) == 4
    merges = api.client.get("/v1/jobs", params={"kind": "merge"}, headers=api.headers)
    assert len(merges.json()["items"]) == 5
    edits = api.client.get("/v1/jobs", params={"kind": "edit"}, headers=api.headers)
    assert edits.json() == {"items": [], "next_cursor": None}


def test_bad_list_parameters_are_problems(api: ApiHarness):
    bad_state = api.client.get("/v1/jobs", params={"state": "done"}, headers=api.headers)
    assert "/query/state" in {e["pointer"] for e in assert_problem(bad_state, 422)["errors"]}
    assert_problem(api.client.get("/v1/jobs", params={"limit": 0}, headers=api.headers), 422)
    bad_cursor = api.client.get("/v1/jobs", params={"cursor": "nope"}, headers=api.headers)
    assert "cursor" in assert_problem(bad_cursor, 422)["detail"]


# ---- validation errors -----------------------------------------------------------------


def test_an_invalid_recipe_is_a_422_problem_pointing_at_the_field(api: ApiHarness):
    recipe = {**MERGE_RECIPE, "models": [{"model": "not a reference"}, MERGE_RECIPE["models"][1]]}
    body = assert_problem(api.submit(merge_job(recipe)), 422)
    assert [e["pointer"] for e in body["errors"]] == ["/recipe/models/0/model"]
    assert "invalid model reference 'not a reference'" in body["errors"][0]["detail"]

    unknown_method = assert_problem(
        api.submit(merge_job({**MERGE_RECIPE, "merge_method": "x"})), 422
    )
    assert "unknown method 'x'" in unknown_method["detail"]

    extra = assert_problem(api.submit({**merge_job(), "priority": 1}), 422)
    assert [e["pointer"] for e in extra["errors"]] == ["/priority"]

    bad_name = assert_problem(api.submit(merge_job(name="Bad Name")), 422)
    assert [e["pointer"] for e in bad_name["errors"]] == ["/artifact_name"]
    assert api.enqueued == []
    assert api.client.get("/v1/jobs", headers=api.headers).json()["items"] == []


def test_malformed_bodies_and_content_types_are_problems(api: ApiHarness):
    post = api.client.post
    h = api.headers
    assert_problem(
        post("/v1/jobs", content="{", headers={**h, "Content-Type": "application/json"}), 422
    )
    assert_problem(post("/v1/jobs", content=": :", headers={**h, "Content-Type": "text/yaml"}), 422)
    assert_problem(
        post("/v1/jobs", content="[1]", headers={**h, "Content-Type": "application/json"}), 422
    )
    assert_problem(post("/v1/jobs", content="x", headers={**h, "Content-Type": "text/plain"}), 415)


# ---- idempotency -----------------------------------------------------------------------


def test_the_same_idempotency_key_and_body_replays_the_first_response(api: ApiHarness):
    key = {"Idempotency-Key": "order-42"}
    first = api.submit(headers=key)
    assert first.status_code == 202
    # the job moves on meanwhile; the replay still answers what the first request got
    api.service.jobs.claim(first.json()["id"], "worker-1")
    again = api.submit(headers=key)
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert api.enqueued == [first.json()["id"]]  # queued once

    # a body with the same meaning (other key order, YAML) is the same request
    r = api.client.post(
        "/v1/jobs",
        content=yaml.safe_dump(merge_job(), sort_keys=True),
        headers={**api.headers, **key, "Content-Type": "application/yaml"},
    )
    assert r.status_code == 202 and r.json()["id"] == first.json()["id"]


def test_the_same_idempotency_key_with_another_body_is_refused(api: ApiHarness):
    key = {"Idempotency-Key": "order-43"}
    assert api.submit(headers=key).status_code == 202
    body = assert_problem(api.submit(merge_job(name="other"), headers=key), 422)
    assert "Idempotency-Key" in body["detail"]
    # keys are per tenant: another tenant may use the same one
    _, other = api.new_tenant()
    assert api.submit(merge_job(name="other"), headers={**other, **key}).status_code == 202


def test_a_request_still_in_flight_with_the_same_key_is_a_409(api: ApiHarness):
    tenant = api.service.keys.authenticate(api.headers["Authorization"].split()[1])
    assert tenant is not None
    request = JobCreate.model_validate(merge_job())
    api.service.jobs.begin_job(tenant.id, request, idempotency_key="slow-one")  # pending
    r = api.submit(headers={"Idempotency-Key": "slow-one"})
    assert_problem(r, 409)
    assert int(r.headers["retry-after"]) >= 1
    assert api.enqueued == []


def test_a_failed_submission_frees_its_idempotency_key(api: ApiHarness):
    key = {"Idempotency-Key": "fix-and-retry"}
    local = {**MERGE_RECIPE, "base_model": "/srv/models/base"}
    assert_problem(api.submit(merge_job(local), headers=key), 422)
    r = api.submit(merge_job(), headers=key)
    assert r.status_code == 202, r.text


# ---- cancel ------------------------------------------------------------------------------


def test_cancel_ends_a_queued_job_and_flags_a_running_one(api: ApiHarness):
    queued = api.submit().json()["id"]
    r = api.client.post(f"/v1/jobs/{queued}/cancel", headers=api.headers)
    assert r.status_code == 200
    assert r.json()["state"] == "cancelled" and r.json()["finished_at"] is not None

    running = api.submit().json()["id"]
    assert api.service.jobs.claim(running, "worker-1") is not None
    r = api.client.post(f"/v1/jobs/{running}/cancel", headers=api.headers)
    assert r.status_code == 202
    assert r.json()["state"] == "running" and r.json()["cancel_requested"] is True
    assert api.service.jobs.is_cancel_requested(running)

    # cancelling again, or a finished job, changes nothing
    again = api.client.post(f"/v1/jobs/{queued}/cancel", headers=api.headers)
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    assert_problem(api.client.post("/v1/jobs/nope/cancel", headers=api.headers), 404)


# ---- auth and tenants ----------------------------------------------------------------------


def test_every_route_but_health_needs_a_valid_key(api: ApiHarness):
    routes = [
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/x"),
        ("POST", "/v1/jobs/x/cancel"),
        ("GET", "/v1/artifacts"),
        ("GET", "/v1/artifacts/a/versions"),
        ("GET", "/v1/artifacts/a/versions/1"),
        ("GET", "/v1/artifacts/a/versions/1/files/config.json"),
    ]
    bad_key = "wsk_0123456789_" + "0" * 64
    for method, path in routes:
        for headers in ({}, {"Authorization": f"Bearer {bad_key}"}, {"Authorization": "Basic x"}):
            r = api.client.request(method, path, headers=headers)
            assert_problem(r, 401)
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert api.client.get("/healthz").status_code == 200


def test_a_revoked_key_is_refused(api: ApiHarness):
    key = api.service.keys.create_key(api.tenant)
    headers = {"Authorization": f"Bearer {key}"}
    assert api.client.get("/v1/jobs", headers=headers).status_code == 200
    assert api.service.keys.revoke_key(key.split("_")[1])
    body = assert_problem(api.client.get("/v1/jobs", headers=headers), 401)
    assert "revoked" in body["detail"]


def test_another_tenants_job_is_not_found(api: ApiHarness):
    job_id = api.submit().json()["id"]
    _, other = api.new_tenant()
    assert_problem(api.client.get(f"/v1/jobs/{job_id}", headers=other), 404)
    assert_problem(api.client.post(f"/v1/jobs/{job_id}/cancel", headers=other), 404)
    assert api.client.get("/v1/jobs", headers=other).json()["items"] == []
    assert api.client.get(f"/v1/jobs/{job_id}", headers=api.headers).json()["state"] == "queued"


# ---- artifacts -------------------------------------------------------------------------------


FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 300,
    "tokenizer/vocab.txt": b"a\nb\n",
}


def test_artifacts_list_versions_manifest_and_files(api: ApiHarness):
    api.publish("soup", FILES)
    api.publish("soup", {**FILES, "config.json": b'{"model_type": "llama", "v": 2}'})
    api.publish("alpha", {"config.json": b"{}"})
    get = api.client.get
    h = api.headers

    listed = get("/v1/artifacts", headers=h).json()["items"]
    assert [(a["name"], a["version"], a["reference"]) for a in listed] == [
        ("alpha", 1, "artifact://alpha@1"),
        ("soup", 2, "artifact://soup@2"),
    ]
    versions = get("/v1/artifacts/soup/versions", headers=h).json()
    assert [v["version"] for v in versions["items"]] == [1, 2]

    manifest = get("/v1/artifacts/soup/versions/1", headers=h)
    assert manifest.status_code == 200
    doc = manifest.json()
    assert doc["artifact"]["version"] == 1 and doc["artifact"]["name"] == "soup"
    assert doc["recipe"] == MERGE_RECIPE
    by_path = {f["path"]: f for f in doc["files"]}
    assert (
        by_path["model.safetensors"]["sha256"]
        == hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    )
    assert get("/v1/artifacts/soup/versions/latest", headers=h).json()["artifact"]["version"] == 2

    for path, data in FILES.items():
        r = get(f"/v1/artifacts/soup/versions/1/files/{path}", headers=h)
        assert r.status_code == 200, r.text
        assert r.content == data
        assert r.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        assert int(r.headers["content-length"]) == len(data)
    new_config = get("/v1/artifacts/soup/versions/2/files/config.json", headers=h)
    assert new_config.content.endswith(b'"v": 2}')
    served_manifest = get("/v1/artifacts/soup/versions/1/files/manifest.json", headers=h)
    assert served_manifest.json() == doc


def test_files_on_s3_redirect_to_a_presigned_url(make_api: MakeApi, s3_server: Any):
    import uuid

    import httpx2

    api = make_api(
        object_store_url=s3_server.url(f"api-{uuid.uuid4().hex[:8]}", create_bucket="true")
    )
    api.publish("soup", FILES)
    path = "/v1/artifacts/soup/versions/1/files/model.safetensors"
    r = api.client.get(path, headers=api.headers, follow_redirects=False)
    assert r.status_code == 307, r.text
    presigned = httpx2.get(r.headers["location"])  # no API key: the URL carries the grant
    assert presigned.status_code == 200
    assert presigned.content == FILES["model.safetensors"]
    assert api.client.get("/readyz").json()["checks"]["object_store"]["ok"] is True


def test_unknown_artifacts_versions_and_files_are_404(api: ApiHarness):
    api.publish("soup", FILES)
    get = api.client.get
    h = api.headers
    assert_problem(get("/v1/artifacts/nothing/versions", headers=h), 404)
    assert_problem(get("/v1/artifacts/soup/versions/7", headers=h), 404)
    assert_problem(get("/v1/artifacts/soup/versions/zero", headers=h), 404)
    assert_problem(get("/v1/artifacts/Bad%20Name/versions/1", headers=h), 404)
    assert_problem(get("/v1/artifacts/soup/versions/1/files/missing.bin", headers=h), 404)
    assert_problem(get("/v1/artifacts/soup/versions/1/files/../../x", headers=h), 404)


def test_another_tenants_artifacts_are_not_found(api: ApiHarness):
    api.publish("soup", FILES)
    _, other = api.new_tenant()
    assert api.client.get("/v1/artifacts", headers=other).json()["items"] == []
    for path in (
        "/v1/artifacts/soup/versions",
        "/v1/artifacts/soup/versions/1",
        "/v1/artifacts/soup/versions/1/files/config.json",
    ):
        assert_problem(api.client.get(path, headers=other), 404)
        assert api.client.get(path, headers=api.headers).status_code == 200
    # nor can it name them in a recipe
    recipe = {**MERGE_RECIPE, "base_model": "artifact://soup"}
    assert_problem(api.submit(merge_job(recipe), headers=other), 422)


def test_artifact_references_are_pinned_to_a_version_at_submission(api: ApiHarness):
    api.publish("soup", FILES)
    api.publish("soup", FILES)
    recipe = {
        **MERGE_RECIPE,
        "base_model": "artifact://soup",
        "models": [
            {"model": "artifact://soup@latest", "parameters": {"weight": 1.0}},
            {"model": "artifact://soup@1", "parameters": {"weight": 1.0}},
        ],
    }
    r = api.submit(merge_job(recipe))
    assert r.status_code == 202, r.text
    pinned = r.json()["recipe"]
    assert pinned["base_model"] == "artifact://soup@2"
    assert [m["model"] for m in pinned["models"]] == ["artifact://soup@2", "artifact://soup@1"]

    missing = {**MERGE_RECIPE, "base_model": "artifact://soup@9"}
    body = assert_problem(api.submit(merge_job(missing)), 422)
    assert body["errors"][0]["pointer"] == "/recipe/base_model"
    assert body["model"] == "artifact://soup@9"


# ---- local paths -----------------------------------------------------------------------------


def test_local_paths_are_refused_unless_the_operator_allows_them(make_api: MakeApi, tmp_path: Path):
    models = tmp_path / "models"
    (models / "a").mkdir(parents=True)
    recipe = {**MERGE_RECIPE, "models": [{"model": str(models / "a")}]}
    strict = make_api()
    body = assert_problem(strict.submit(merge_job(recipe)), 422)
    assert body["errors"][0]["pointer"] == "/recipe/models/0/model"
    assert "WEIGHTSMITH_ALLOW_LOCAL_PATHS" in body["detail"]
    assert strict.enqueued == []

    lenient = make_api(allow_local_paths=True)
    r = lenient.submit(merge_job(recipe))
    assert r.status_code == 202, r.text
    assert [m["model"] for m in r.json()["recipe"]["models"]] == [str(models / "a")]


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("{tmp}/models/missing", "does not exist"),
        ("./models/a", "absolute path"),
        ("{tmp}/models/./a", None),  # the existing folder: accepted
        ("{tmp}/data", "service's own data"),
        ("{tmp}/data/artifacts/{tenant}/soup", "service's own data"),
        ("{tmp}/artifacts", "service's own data"),
        ("{tmp}/models/../data", "service's own data"),
        ("{tmp}/models/link-to-data", "service's own data"),
        ("{tmp}", "service's own data"),  # holds the data directory
    ],
)
def test_a_local_path_that_is_missing_relative_or_the_services_own_data_is_refused_at_submission(
    make_api: MakeApi, tmp_path: Path, path: str, why: str | None
):
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "models" / "link-to-data").symlink_to(tmp_path / "data")
    api = make_api(allow_local_paths=True)
    raw = path.format(tmp=tmp_path, tenant=api.tenant)
    r = api.submit(merge_job({**MERGE_RECIPE, "base_model": raw}))
    if why is None:
        assert r.status_code == 202, r.text
        return
    body = assert_problem(r, 422)
    assert body["errors"][0]["pointer"] == "/recipe/base_model"
    assert why in body["detail"], body["detail"]
    assert api.enqueued == []


# ---- hub pinning -----------------------------------------------------------------------------


def test_hub_references_are_pinned_to_the_current_commit(make_api: MakeApi, hub: HubServer):
    first = hub.add_repo("org/base", {"config.json": b"{}", "model.safetensors": b"1"})
    second = hub.add_repo("org/base", {"config.json": b"{}", "model.safetensors": b"2"})
    ft = hub.add_repo("org/ft", {"config.json": b"{}", "model.safetensors": b"3"})
    hub.set_ref("org/ft", "v1", ft)
    api = make_api(hf_endpoint=hub.url)
    recipe = {
        **MERGE_RECIPE,
        "base_model": "org/base",
        "models": [
            {"model": "hf://org/ft@v1", "parameters": {"weight": 1.0}},
            {"model": f"org/base@{first}", "parameters": {"weight": 1.0}},
        ],
    }
    r = api.submit(merge_job(recipe))
    assert r.status_code == 202, r.text
    pinned = r.json()["recipe"]
    assert pinned["base_model"] == f"org/base@{second}"
    assert [m["model"] for m in pinned["models"]] == [f"org/ft@{ft}", f"org/base@{first}"]
    assert r.json()["id"] in api.enqueued


def test_an_unknown_hub_repo_or_revision_is_a_422_naming_the_model(
    make_api: MakeApi, hub: HubServer
):
    hub.add_repo("org/base", {"config.json": b"{}"})
    api = make_api(hf_endpoint=hub.url)
    body = assert_problem(api.submit(merge_job({**MERGE_RECIPE, "base_model": "org/missing"})), 422)
    assert body["model"] == "org/missing"
    assert body["errors"][0]["pointer"] == "/recipe/base_model"
    assert "org/missing not found" in body["detail"]

    bad_rev = {**MERGE_RECIPE, "base_model": "org/base@nope"}
    body = assert_problem(api.submit(merge_job(bad_rev)), 422)
    assert "revision 'nope' not found" in body["detail"]
    assert api.enqueued == []


def test_a_gated_hub_repo_without_access_is_a_422(make_api: MakeApi, hub: HubServer):
    hub.add_repo("org/gated", {"config.json": b"{}"}, gated=True, private_token="hf_right")
    recipe = {**MERGE_RECIPE, "base_model": "org/gated"}
    anonymous = make_api(hf_endpoint=hub.url)
    body = assert_problem(anonymous.submit(merge_job(recipe)), 422)
    assert body["model"] == "org/gated" and "gated" in body["detail"]

    wrong = make_api(hf_endpoint=hub.url)
    set_hub_token(wrong, "hf_wrong")
    body = assert_problem(wrong.submit(merge_job(recipe)), 422)
    assert "gated" in body["detail"] and "hf_wrong" not in str(body)

    right = make_api(hf_endpoint=hub.url)
    set_hub_token(right, "hf_right")
    r = right.submit(merge_job(recipe))
    assert r.status_code == 202, r.text
    assert r.json()["recipe"]["base_model"] == f"org/gated@{hub.commit_of('org/gated')}"


def set_hub_token(api: ApiHarness, token: str) -> None:
    r = api.client.put("/v1/tenant/hub-token", json={"token": token}, headers=api.headers)
    assert r.status_code == 204, r.text


def test_an_unreachable_hub_is_a_503_to_retry(make_api: MakeApi, hub: HubServer):
    hub.add_repo("org/base", {"config.json": b"{}"})
    hub.fail("/api/models/org/base", 503)
    api = make_api(hf_endpoint=hub.url)
    r = api.submit(merge_job({**MERGE_RECIPE, "base_model": "org/base"}))
    assert_problem(r, 503)
    assert "retry-after" in r.headers
    assert api.client.get("/v1/jobs", headers=api.headers).json()["items"] == []


# ---- queue ---------------------------------------------------------------------------------------


class FlakyBroker:
    """An in-process queue whose broker is down until ``up`` is set; records what it took."""

    def __init__(self) -> None:
        self.up = False
        self.taken: list[str] = []

    def __call__(self, job_id: str) -> None:
        if not self.up:
            raise ConnectionError("broker down")
        self.taken.append(job_id)


def test_a_job_that_cannot_be_queued_fails_and_answers_503(make_api: MakeApi):
    broker = FlakyBroker()
    api = make_api(queue=InProcessQueue(broker))
    body = assert_problem(api.submit(), 503)
    job = api.client.get(f"/v1/jobs/{body['job_id']}", headers=api.headers).json()
    assert job["state"] == "failed" and "could not be queued" in job["error"]["message"]
    assert job["progress"]["phase"] == "not-queued"


def test_a_key_that_met_a_broker_outage_queues_its_job_once_the_broker_is_back(
    make_api: MakeApi,
):
    broker = FlakyBroker()
    api = make_api(queue=InProcessQueue(broker))
    key = {"Idempotency-Key": "k-503"}
    first = api.submit(headers=key)
    job_id = assert_problem(first, 503)["job_id"]
    assert first.headers["retry-after"]
    assert_problem(api.submit(headers=key), 503)  # still down: 503 again, same job
    assert api.client.get(f"/v1/jobs/{job_id}", headers=api.headers).json()["state"] == "failed"

    broker.up = True
    retried = api.submit(headers=key)

    assert retried.status_code == 202, retried.text
    assert retried.json()["id"] == job_id and retried.json()["state"] == "queued"
    assert retried.json()["error"] is None and "idempotent-replayed" not in retried.headers
    assert broker.taken == [job_id]
    replay = api.submit(headers=key)  # from now on, an ordinary replay of the queued job
    assert (replay.json()["id"], replay.json()["state"]) == (job_id, "queued")
    assert replay.headers["idempotent-replayed"] == "true"
    assert broker.taken == [job_id]
    jobs = api.client.get("/v1/jobs", headers=api.headers).json()["items"]
    assert [j["id"] for j in jobs] == [job_id]  # one key, one job


def test_a_job_a_worker_took_despite_a_send_error_is_answered_as_accepted(make_api: MakeApi):
    apis: list[ApiHarness] = []

    def sent_but_unacknowledged(job_id: str) -> None:  # the message got through, its ack not
        assert apis[0].service.jobs.claim(job_id, "w1") is not None
        raise ConnectionError("broker connection reset")

    apis.append(make_api(queue=InProcessQueue(sent_but_unacknowledged)))
    r = apis[0].submit()
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "running"


REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_db() -> Iterator[str]:
    """A Redis database of its own (13), emptied before and after: no worker consumes it."""
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + "/13"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(
            f"Redis is not reachable at {url} ({e}). Start it: redis-server --daemonize yes",
            pytrace=False,
        )
    client.delete("default", "gpu")
    yield url
    client.delete("default", "gpu")
    client.close()


def _messages(url: str, queue: str) -> list[dict[str, Any]]:
    import base64
    import json

    import redis

    client = redis.Redis.from_url(url)
    raw = client.lrange(queue, 0, -1)[::-1]  # kombu pushes on the left, pops on the right
    client.close()
    out = []
    for item in raw:
        message = json.loads(item)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        out.append({"task": message["headers"]["task"], "args": args, "kwargs": kwargs})
    return out


def test_the_celery_queue_sends_the_task_by_name_routed_by_kind(redis_db: str):
    queue = CeleryQueue(redis_db, gpu_kinds={"edit"})
    try:
        queue.ping()
        queue.enqueue("job-1", kind="merge")
        queue.enqueue("job-2", kind="edit")
        queue.enqueue("job-3")
    finally:
        queue.close()
    assert _messages(redis_db, "default") == [
        {"task": RUN_JOB_TASK, "args": ["job-1"], "kwargs": {}},
        {"task": RUN_JOB_TASK, "args": ["job-3"], "kwargs": {}},
    ]
    assert _messages(redis_db, "gpu") == [{"task": RUN_JOB_TASK, "args": ["job-2"], "kwargs": {}}]


def test_a_submission_goes_to_redis_and_readyz_sees_the_broker(make_api: MakeApi, redis_db: str):
    api = make_api(broker_url=redis_db, queue_from_settings=True)
    assert isinstance(api.service.queue, CeleryQueue)
    job_id = api.submit().json()["id"]
    assert _messages(redis_db, "default") == [
        {"task": RUN_JOB_TASK, "args": [job_id], "kwargs": {}}
    ]
    assert api.client.get("/readyz").json()["checks"]["broker"]["ok"] is True


def test_an_unreachable_broker_fails_readyz_and_submissions(make_api: MakeApi):
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    queue = CeleryQueue(url, connect_timeout_s=1)
    with pytest.raises(QueueUnavailable, match="unreachable"):
        queue.ping()
    api = make_api(queue=queue)
    body = assert_problem(api.client.get("/readyz"), 503)
    assert body["failed"] == ["broker"]
    assert_problem(api.submit(), 503)


def test_an_in_process_queue_keeps_ids_until_a_worker_registers():
    queue = InProcessQueue()
    queue.enqueue("a", kind=JobKind.MERGE)
    queue.enqueue("b")
    got: list[str] = []
    queue.register(got.append)
    queue.enqueue("c")
    assert got == ["a", "b", "c"]


# ---- health, errors, docs ----------------------------------------------------------------


def test_readyz_checks_database_broker_and_object_store(api: ApiHarness):
    r = api.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert {name: c["ok"] for name, c in r.json()["checks"].items()} == {
        "database": True,
        "broker": True,
        "object_store": True,
    }


def test_readyz_is_503_naming_an_unreachable_object_store(make_api: MakeApi):
    port = _closed_port()
    url = f"s3://key:secret@artifacts?endpoint=http://127.0.0.1:{port}&region=us-east-1"
    api = make_api(object_store_url=url)
    assert api.client.get("/healthz").json() == {"status": "ok"}
    body = assert_problem(api.client.get("/readyz"), 503)
    assert body["failed"] == ["object_store"]
    assert body["checks"]["database"]["ok"] is True
    assert "object_store" in body["detail"]


def test_unknown_routes_and_methods_are_problems(api: ApiHarness):
    assert_problem(api.client.get("/v2/nothing", headers=api.headers), 404)
    assert_problem(api.client.delete("/v1/jobs", headers=api.headers), 405)
    assert_problem(api.client.get("/v1/jobs/does-not-exist", headers=api.headers), 404)


def test_openapi_documents_the_routes(api: ApiHarness):
    assert api.client.get("/docs").status_code == 200
    spec = api.client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/readyz", "/v1/artifacts"} <= set(spec["paths"])
    content = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/yaml"} <= set(content)


def test_timestamps_are_utc(api: ApiHarness):
    job = api.submit().json()
    created = datetime.fromisoformat(job["created_at"])
    assert created.utcoffset() is not None
    assert abs((datetime.now(UTC) - created).total_seconds()) < 60
