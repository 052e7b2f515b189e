"""The tenant boundary, tried as an attacker would: tenant B against tenant A's things.

One service (the real app, on SQLite and on PostgreSQL) with its artifacts in a SeaweedFS
bucket, a second bucket holding both tenants' own S3 data, and the local Hub endpoint. Tenant
A has a job, an artifact version, a schedule, a webhook, a private Hub repo read with its own
token, an S3 grant and a Hub push grant. Tenant B tries every route and every reference
form on them: each attempt is a 404 (A's things do not exist for B) or a 422 naming the field,
and an ``s3://`` location answers the same whether it is missing or only not granted.
Workers enforce the same rules on jobs that never went through the API.

Every address here is loopback.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from app.main import create_app
from infra.db import ApiKeys
from infra.db.models import Job, S3Grant, Tenant
from infra.db.webhooks import WebhookSecretRow, WebhookSubscriptionRow
from infra.queue import InProcessQueue
from infra.settings import Settings
from infra.storage.s3 import S3ObjectStore
from schemas.jobs import JobCreate, JobError, JobKind, JobState
from schemas.tenants import GrantError
from service.context import Service
from service.scheduling import fire_schedule
from testbed.api import grant_models, publish_files
from testbed.hub import HubServer

DATA_BUCKET = "tenant-data"
A_TOKEN = "hf_tenantAsOwnToken0123456789"
OPERATOR_TOKEN = "hf_operatorTokenNeverLent987654"


@dataclass
class Stack:
    client: TestClient
    settings: Settings
    artifact_prefix: str  # of the artifact store in the S3 server's bucket
    a: dict[str, str]  # tenant A's Authorization header
    b: dict[str, str]
    a_name: str
    b_name: str
    things: dict[str, str]  # ids of A's job, schedule, subscription, private repo sha
    hub: HubServer
    s3: Any

    @property
    def service(self) -> Service:
        service: Service = self.client.app.state.service  # type: ignore[attr-defined]
        return service

    def submit(self, who: dict[str, str], recipe: dict[str, Any], **extra: Any) -> Any:
        kind = "edit" if "edit_method" in recipe else "merge"
        body = {"kind": kind, "recipe": recipe, "artifact_name": "loot", **extra}
        return self.client.post("/v1/jobs", json=body, headers=who)


def data_bucket(s3: Any) -> S3ObjectStore:
    return S3ObjectStore(
        DATA_BUCKET,
        endpoint_url=s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        region=s3.region,
        create_bucket=True,
    )


def linear(*refs: str) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "models": [{"model": r, "parameters": {"weight": 1.0}} for r in refs],
        "seed": 1,
    }


@pytest.fixture
def stack(
    tmp_path: Path,
    database_url: str,
    s3_server: Any,
    hub: HubServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Stack]:
    # The operator's token is also in the environment, where huggingface_hub would find it.
    monkeypatch.setenv("HF_TOKEN", OPERATOR_TOKEN)
    prefix = f"boundary-{uuid.uuid4().hex[:8]}"
    s3_server.store(prefix=prefix)  # the artifact bucket exists
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        object_store_url=s3_server.url(prefix),
        broker_url=None,
        hf_endpoint=hub.url,
        hf_token=OPERATOR_TOKEN,
        allow_local_paths=True,
        bootstrap_api_key=None,
        bootstrap_key_file=None,
        webhook_allow_private=True,
    )
    client = TestClient(create_app(settings, queue=InProcessQueue(lambda _id: None)))
    client.__enter__()
    try:
        service: Service = client.app.state.service  # type: ignore[attr-defined]
        a_name, b_name = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
        a = {"Authorization": f"Bearer {service.keys.create_key(a_name)}"}
        b = {"Authorization": f"Bearer {service.keys.create_key(b_name)}"}
        files = {"config.json": b"{}", "model.safetensors": b"weights of A"}
        bucket = data_bucket(s3_server)
        for name, data in files.items():
            bucket.put_bytes(f"{a_name}/model/{name}", data)
            bucket.put_bytes(f"{b_name}/model/{name}", data)
        bucket.put_bytes(f"{a_name}/corpus.txt", b"A's corpus\n")
        grant_models(service, a_name, s3_server, f"s3://{DATA_BUCKET}/{a_name}/")
        grant_models(service, b_name, s3_server, f"s3://{DATA_BUCKET}/{b_name}/")
        service.tenants.grant_hub_push(a_name, "a-org")
        private_sha = hub.add_repo("a-org/private", files, private_token=A_TOKEN)
        hub.add_repo("ops/internal", files, private_token=OPERATOR_TOKEN)
        hub.add_repo("public/model", files)
        assert client.put("/v1/tenant/hub-token", json={"token": A_TOKEN}, headers=a).status_code
        # A's artifact, job, schedule and webhook subscription
        publish_files(service.store, a_name, "secret-model", files, tmp_path / "a-out")
        job = client.post(
            "/v1/jobs",
            json={
                "kind": "merge",
                "recipe": linear(f"s3://{DATA_BUCKET}/{a_name}/model", "a-org/private"),
                "artifact_name": "a-soup",
            },
            headers=a,
        )
        assert job.status_code == 202, job.text
        schedule = client.post(
            "/v1/schedules",
            json={
                "cron": "0 3 * * *",
                "kind": "merge",
                "artifact_name": "a-nightly",
                "recipe": linear("public/model", "a-org/private"),
            },
            headers=a,
        )
        assert schedule.status_code == 201, schedule.text
        sub = client.post(
            "/v1/webhooks",
            json={"url": "http://127.0.0.1:9/hook", "events": ["job.succeeded"]},
            headers=a,
        )
        assert sub.status_code == 201, sub.text
        content = b"A's private upload"
        upload = client.post(
            "/v1/uploads",
            json={
                "artifact_name": "a-private",
                "files": [
                    {
                        "path": "model.safetensors",
                        "size": len(content),
                        "sha256": hashlib.sha256(content).hexdigest(),
                    }
                ],
            },
            headers=a,
        )
        assert upload.status_code == 201, upload.text
        yield Stack(
            client,
            settings,
            prefix,
            a,
            b,
            a_name,
            b_name,
            {
                "job": job.json()["id"],
                "schedule": schedule.json()["id"],
                "subscription": sub.json()["id"],
                "upload": upload.json()["id"],
                "private_sha": private_sha,
            },
            hub,
            s3_server,
        )
    finally:
        client.__exit__(None, None, None)


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


# ---- every route on A's things ---------------------------------------------------------------


def test_tenant_b_finds_none_of_tenant_as_things_on_any_route(stack: Stack) -> None:
    c, b, t = stack.client, stack.b, stack.things
    job, schedule, sub, up = t["job"], t["schedule"], t["subscription"], t["upload"]
    attempts = [
        ("GET", f"/v1/uploads/{up}"),
        ("GET", f"/v1/uploads/{up}/files/model.safetensors"),
        ("HEAD", f"/v1/uploads/{up}/files/model.safetensors"),
        ("PUT", f"/v1/uploads/{up}/files/model.safetensors"),
        ("POST", f"/v1/uploads/{up}/complete"),
        ("DELETE", f"/v1/uploads/{up}"),
        ("GET", f"/v1/jobs/{job}"),
        ("POST", f"/v1/jobs/{job}/cancel"),
        ("GET", f"/v1/jobs/{job}/deliveries"),
        ("GET", "/v1/artifacts/secret-model/versions"),
        ("GET", "/v1/artifacts/secret-model/versions/1"),
        ("GET", "/v1/artifacts/secret-model/versions/latest"),
        ("GET", "/v1/artifacts/secret-model/versions/1/files/model.safetensors"),
        ("GET", "/v1/artifacts/secret-model/versions/1/files/manifest.json"),
        ("GET", f"/v1/schedules/{schedule}"),
        ("GET", f"/v1/schedules/{schedule}/runs"),
        ("PATCH", f"/v1/schedules/{schedule}"),
        ("DELETE", f"/v1/schedules/{schedule}"),
        ("GET", f"/v1/webhooks/{sub}"),
        ("GET", f"/v1/webhooks/{sub}/deliveries"),
        ("DELETE", f"/v1/webhooks/{sub}"),
    ]
    for method, path in attempts:
        if method == "PUT":  # a chunk at offset 0, as A would send it
            headers = {**b, "Upload-Offset": "0", "Content-Type": "application/octet-stream"}
            r = c.put(path, headers=headers, content=b"B's bytes")
        else:
            body = {"enabled": False} if method == "PATCH" else None
            r = c.request(method, path, headers=b, json=body)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
    # B's listings hold nothing of A's
    assert c.get("/v1/jobs", headers=b).json()["items"] == []
    assert c.get("/v1/artifacts", headers=b).json()["items"] == []
    assert c.get("/v1/schedules", headers=b).json()["items"] == []
    assert c.get("/v1/webhooks", headers=b).json()["items"] == []
    # ... and A's things are untouched
    a = stack.a
    assert c.get(f"/v1/jobs/{job}", headers=a).json()["state"] == "queued"
    assert c.get(f"/v1/schedules/{schedule}", headers=a).json()["enabled"] is True
    assert c.get(f"/v1/webhooks/{sub}", headers=a).status_code == 200
    assert c.get("/v1/artifacts/secret-model/versions/1", headers=a).status_code == 200
    upload = c.get(f"/v1/uploads/{up}", headers=a).json()
    assert upload["state"] == "open" and upload["files"][0]["offset"] == 0


def test_tenant_b_cannot_name_tenant_as_artifacts_as_inputs(stack: Stack) -> None:
    for ref in (
        "artifact://secret-model@1",
        "artifact://secret-model",
        "artifact://secret-model@latest",
    ):
        body = problem(stack.submit(stack.b, linear(ref, "public/model")), 422)
        assert body["errors"][0]["pointer"] == "/recipe/models/0/model"
        assert "'secret-model' has no" in body["detail"], body["detail"]
    recipe = edit_recipe("public/model", "artifact://secret-model@1/config.json")
    body = problem(stack.submit(stack.b, recipe), 422)
    assert body["errors"][0]["pointer"] == "/recipe/covariance/paths/0"


def edit_recipe(model: str, corpus: str) -> dict[str, Any]:
    return {
        "edit_method": "rome",
        "model": model,
        "requests": [
            {
                "prompt": "The capital of Japan is",
                "subject": "Japan",
                "target_new": "Paris",
                "target_true": "Tokyo",
            }
        ],
        "covariance": {"source": "text", "paths": [corpus]},
    }


# ---- s3:// ---------------------------------------------------------------------------------


def test_an_s3_input_that_is_missing_or_not_granted_gets_one_answer(stack: Stack) -> None:
    """The artifact bucket (A's artifact, a missing key), A's granted data, B's own grant
    with a missing key, a bucket that does not exist: the same words, only the reference
    differs. A model folder and an edit's corpus alike."""
    art = f"{stack.s3.bucket}/{stack.artifact_prefix}"
    refs = [
        f"s3://{art}/{stack.a_name}/secret-model/v1",  # exists: A's published weights
        f"s3://{art}/{stack.a_name}/nothing/v1",
        f"s3://{art}/_cache",
        f"s3://{DATA_BUCKET}/{stack.a_name}/model",  # exists: A's grant, not B's
        f"s3://{DATA_BUCKET}/{stack.b_name}/missing",  # B's grant, nothing there
        f"s3://{DATA_BUCKET}/{stack.b_name}/../{stack.a_name}/model",  # escapes B's grant
        "s3://no-such-bucket-here/model",
    ]
    answers = set()
    for ref in refs:
        body = problem(stack.submit(stack.b, linear(ref, "public/model")), 422)
        if ".." in ref:  # refused as malformed before any lookup
            assert "no empty, '.' or '..' segments" in body["detail"]
            continue
        assert body["errors"][0]["pointer"] == "/recipe/models/0/model"
        answers.add(body["detail"].replace(ref, "REF"))
    assert len(answers) == 1, answers
    corpus_answers = set()
    for ref in (
        f"s3://{art}/{stack.a_name}/secret-model/v1/config.json",
        f"s3://{DATA_BUCKET}/{stack.a_name}/corpus.txt",
        f"s3://{DATA_BUCKET}/{stack.b_name}/corpus.txt",
        "s3://no-such-bucket-here/corpus.txt",
    ):
        body = problem(stack.submit(stack.b, edit_recipe("public/model", ref)), 422)
        assert body["errors"][0]["pointer"] == "/recipe/covariance/paths/0"
        corpus_answers.add(body["detail"].replace(ref, "REF"))
    assert len(corpus_answers) == 1, corpus_answers
    # B's own data, under its grant, is accepted (and not pinned: s3 has no versions)
    r = stack.submit(stack.b, linear(f"s3://{DATA_BUCKET}/{stack.b_name}/model", "public/model"))
    assert r.status_code == 202, r.text


def test_the_artifact_bucket_can_never_be_granted_nor_read_through_a_grant(stack: Stack) -> None:
    service, s3 = stack.service, stack.s3
    from service.tenancy import artifact_bucket, open_granted_store

    store = artifact_bucket(stack.settings)
    assert store is not None and store.bucket == s3.bucket
    with pytest.raises(GrantError, match="artifact store's bucket"):
        service.tenants.grant_s3(
            stack.b_name,
            f"s3://{s3.bucket}/",
            credentials="store",
            endpoint=s3.endpoint,
            artifact_bucket=store.bucket,
        )
    with pytest.raises(GrantError, match="artifact store's bucket"):  # another spelling
        service.tenants.grant_s3(
            stack.b_name,
            f"s3://{s3.bucket}/",
            credentials="anonymous",
            endpoint=s3.endpoint.replace("127.0.0.1", "localhost"),
            artifact_bucket=store.bucket,
        )
    # a grant made while another bucket was the artifact store is refused when used
    grant_models(service, stack.b_name, s3, f"s3://{s3.bucket}/{stack.artifact_prefix}/")
    access = service.access(service.keys.ensure_tenant(stack.b_name).id)
    g = access.s3_grant_for(s3.bucket, f"{stack.artifact_prefix}/{stack.a_name}/secret-model/v1")
    assert g is not None
    with pytest.raises(GrantError):
        open_granted_store(g, stack.settings)
    ref = f"s3://{s3.bucket}/{stack.artifact_prefix}/{stack.a_name}/secret-model/v1"
    body = problem(stack.submit(stack.b, linear(ref, "public/model")), 422)
    assert "does not exist or is not readable" in body["detail"]


# ---- the Hub ---------------------------------------------------------------------------------


def test_hub_pulls_use_the_tenants_own_token_never_the_operators(stack: Stack) -> None:
    # A reads its private repo with its own token
    r = stack.submit(stack.a, linear("a-org/private", "public/model"))
    assert r.status_code == 202, r.text
    # B cannot, even pinned to the commit, and not with the operator's token either
    for ref in ("a-org/private", f"a-org/private@{stack.things['private_sha']}", "ops/internal"):
        body = problem(stack.submit(stack.b, linear(ref, "public/model")), 422)
        assert body["model"] == ref and "not found" in body["detail"]
        assert OPERATOR_TOKEN not in json.dumps(body) and A_TOKEN not in json.dumps(body)
    # the operator can lend its token to a tenant
    stack.service.tenants.set_operator_hub_token(stack.b_name, True)
    assert stack.submit(stack.b, linear("ops/internal", "public/model")).status_code == 202
    view = stack.client.get("/v1/tenant", headers=stack.b).json()
    assert view["hub_token"] == {"configured": False, "set_at": None, "used": "operator"}
    # ... but a tenant's own token always wins, and is never shown
    view = stack.client.get("/v1/tenant", headers=stack.a).json()
    assert view["hub_token"]["configured"] is True and view["hub_token"]["used"] == "tenant"
    assert A_TOKEN not in json.dumps(view)


def test_hub_pushes_go_only_to_namespaces_granted_to_the_tenant(stack: Stack) -> None:
    recipe = linear("public/model", f"s3://{DATA_BUCKET}/{stack.b_name}/model")
    for repo in ("a-org/soup", "ops/soup", "b-org/soup"):
        body = problem(stack.submit(stack.b, recipe, publish={"hub_repo": repo}), 422)
        assert body["errors"][0]["pointer"] == "/publish/hub_repo"
        assert "may not push" in body["detail"] and "granted: none" in body["detail"]
    stack.service.tenants.grant_hub_push(stack.b_name, "b-org")
    # granted, but B has no token (the operator's is configured, not lent): still refused
    body = problem(stack.submit(stack.b, recipe, publish={"hub_repo": "b-org/soup"}), 422)
    assert "token" in body["detail"]
    stack.client.put("/v1/tenant/hub-token", json={"token": "hf_b_token_123"}, headers=stack.b)
    r = stack.submit(stack.b, recipe, publish={"hub_repo": "b-org/soup"})
    assert r.status_code == 202, r.text
    # A's namespace stays closed to B whatever B holds
    body = problem(stack.submit(stack.b, recipe, publish={"hub_repo": "a-org/soup"}), 422)
    assert "granted: b-org" in body["detail"]


# ---- local paths -----------------------------------------------------------------------------


def test_local_paths_into_the_services_data_are_refused(stack: Stack, tmp_path: Path) -> None:
    for raw in (
        str(tmp_path / "data"),
        str(tmp_path / "data" / "secret-key"),
        f"file://{tmp_path}/data",
        str(tmp_path / "data" / ".." / "data"),
    ):
        body = problem(stack.submit(stack.b, linear(raw, "public/model")), 422)
        assert "service's own data" in body["detail"], raw


# ---- workers hold the line on jobs that never went through the API ---------------------------


def run_directly(stack: Stack, tenant: str, recipe: dict[str, Any]) -> Any:
    """Record a job for ``tenant`` straight in the store (no API checks) and run it once."""
    from workers.runner import run_job

    service = stack.service
    tenant_id = service.keys.ensure_tenant(tenant).id
    request = JobCreate(kind=JobKind.MERGE, recipe=recipe, artifact_name="loot")
    job_id = service.jobs.create_job(tenant_id, request).job.id
    run_job(
        job_id,
        store=service.jobs,
        settings=stack.settings,
        object_store=service.store,
        worker_id="w-boundary",
        work_root=stack.settings.data_dir.parent,
    )
    job = service.jobs.get(tenant_id, job_id)
    assert job is not None
    return job


@pytest.mark.parametrize(
    ("ref", "words"),
    [
        ("s3://{art}/{a}/secret-model/v1", "does not exist or is not readable"),
        ("s3://{data}/{a}/model", "does not exist or is not readable"),
        ("a-org/private@{sha}", "not found"),
        ("ops/internal@{sha_ops}", "not found"),
        ("{tmp}/data", "service's own data"),
    ],
)
def test_a_worker_refuses_what_the_tenant_may_not_read_on_the_first_attempt(
    stack: Stack, tmp_path: Path, ref: str, words: str
) -> None:
    raw = ref.format(
        art=f"{stack.s3.bucket}/{stack.artifact_prefix}",
        a=stack.a_name,
        data=DATA_BUCKET,
        sha=stack.things["private_sha"],
        sha_ops=stack.hub.commit_of("ops/internal"),
        tmp=tmp_path,
    )
    job = run_directly(stack, stack.b_name, linear(raw, raw))
    assert (job.state, job.attempts) == (JobState.FAILED.value, 1)
    assert words in job.error["message"], job.error
    for secret in (OPERATOR_TOKEN, A_TOKEN, stack.s3.secret_key):
        assert secret not in json.dumps(job.error)


# ---- disabled tenants; secrets at rest; key lookup --------------------------------------------


def test_a_disabled_tenant_has_no_working_key_schedule_or_webhook(stack: Stack) -> None:
    from infra.db.schedules import ScheduleStore
    from infra.db.webhooks import WebhookStore

    service, c = stack.service, stack.client
    service.keys.forget_cached()
    assert service.tenants.set_disabled(stack.a_name, True)
    service.keys.forget_cached()  # the API's memory of keys (WEIGHTSMITH_AUTH_CACHE_SECONDS)
    assert problem(c.get("/v1/jobs", headers=stack.a), 401)
    # its schedule does not fire
    fired = fire_schedule(ScheduleStore(service.engine), _NoSubmit(), stack.things["schedule"])
    assert fired.run is None
    # its pending deliveries are held
    with service.engine.begin() as conn:
        job_id = stack.things["job"]
        conn.execute(Job.__table__.update().where(Job.id == job_id).values(state="running"))
    service.jobs.finish_failed(job_id, JobError(message="stopped by the test"))
    hooks = WebhookStore(service.engine, service.box)
    claimed = hooks.claim_due(100, timedelta(seconds=60))
    tenant_a = service.keys.ensure_tenant(stack.a_name).id
    assert [m for m in claimed if m.tenant_id == tenant_a] == []
    # enabled again, everything works
    assert service.tenants.set_disabled(stack.a_name, False)
    service.keys.forget_cached()
    assert c.get("/v1/jobs", headers=stack.a).status_code == 200


class _NoSubmit:
    def pin(self, *args: Any) -> dict[str, str]:
        raise AssertionError("a disabled tenant's schedule must not be pinned")

    def submit(self, *args: Any) -> Any:
        raise AssertionError("a disabled tenant's schedule must not submit a job")


def test_secrets_are_sealed_in_the_database(stack: Stack) -> None:
    service = stack.service
    with service.engine.connect() as conn:
        stored = [
            *conn.scalars(select(Tenant.hub_token).where(Tenant.hub_token.is_not(None))),
            *conn.scalars(select(S3Grant.secret_access_key)),
            *conn.scalars(select(WebhookSubscriptionRow.secret)),
            *conn.scalars(select(WebhookSecretRow.secret)),
        ]
    assert stored and all(v.startswith("enc:v1:") for v in stored)
    dump = " ".join(stored)
    assert A_TOKEN not in dump and stack.s3.secret_key not in dump and "whsec_" not in dump


def test_key_lookup_does_the_same_work_for_a_known_and_an_unknown_prefix(stack: Stack) -> None:
    """The database sees one query by the secret's hash, the same statement whether the
    prefix exists or not (so the answer time tells nothing about which prefixes exist)."""
    keys = stack.service.keys
    known_prefix = stack.a["Authorization"].split("_")[1]
    statements: list[tuple[str, tuple[str, ...]]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        statements.append((statement, tuple(sorted(params)) if isinstance(params, dict) else ()))

    fresh = ApiKeys(keys.engine)  # no cache: every call asks the database
    event.listen(keys.engine, "before_cursor_execute", record)
    try:
        wrong_secret = f"wsk_{known_prefix}_{'0' * 64}"
        unknown = f"wsk_{'f' * 10}_{'0' * 64}"
        assert fresh.authenticate(wrong_secret) is None
        seen_known = list(statements)
        statements.clear()
        assert fresh.authenticate(unknown) is None
        seen_unknown = list(statements)
    finally:
        event.remove(keys.engine, "before_cursor_execute", record)
    assert seen_known == seen_unknown
    queries = [statement for statement, _ in seen_known if statement.startswith("SELECT")]
    assert len(queries) == 1
    assert "secret_sha256 =" in queries[0] and "prefix =" not in queries[0]
