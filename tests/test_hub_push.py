"""Pushing a job's artifact to the Hugging Face Hub (``publish.hub_repo``).

Jobs run through the real runner with tiny real models; the Hub is the local endpoint of
testbed/hub.py, driven by the real huggingface_hub client (create_repo, preupload, the
LFS batch API, commit), and what was pushed is downloaded back with huggingface_hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

from app.main import create_app
from infra.artifacts import list_versions, read_manifest
from infra.db import ApiKeys, JobStore, make_engine, upgrade_database
from infra.db.tenants import TenantStore
from infra.queue import InProcessQueue
from infra.secrets import SecretBox
from infra.settings import Settings
from infra.storage import LocalObjectStore
from schemas.jobs import JobCreate, JobKind, JobState, PublishOptions
from testbed.api import grant_models, merge_job, models_bucket
from testbed.hub import HubServer
from workers.publish import hub_push
from workers.publish.hub_push import (
    HUB_MANIFEST,
    ArtifactFile,
    HubPushRefused,
    HubTarget,
    HubUnavailable,
    push_artifact,
)
from workers.runner import RetryLater, run_job

TENANT = "acme"
TOKEN = "hf_pushTokenForTests0123456789"


class Worker:
    """A job store, an object store and run_job, with the local Hub as the worker's Hub."""

    def __init__(self, tmp: Path, hub: HubServer, token: str | None, **overrides: Any) -> None:
        """``token``: the tenant's own Hub token (the tenant may push to 'acme')."""
        self.settings = Settings(
            data_dir=tmp / "data",
            database_url=f"sqlite:///{tmp}/data/jobs.db",
            object_store_url=f"file://{tmp}/artifacts",
            allow_local_paths=True,
            hf_endpoint=hub.url,
            worker_heartbeat_interval=1,
            worker_lost_after=2,
            **overrides,
        )
        upgrade_database(self.settings.database_url)
        self.engine = make_engine(self.settings.database_url)
        self.store = JobStore.from_settings(self.settings, self.engine)
        self.objects = LocalObjectStore(tmp / "artifacts")
        self.tenant_id = ApiKeys(self.engine).ensure_tenant(TENANT).id
        self.tenants = TenantStore(self.engine, SecretBox.from_settings(self.settings))
        self.tenants.grant_hub_push(TENANT, "acme")
        if token is not None:
            self.tenants.set_hub_token(self.tenant_id, token)
        self.work_root = tmp / "work"
        self.work_root.mkdir()

    def submit(self, recipe: dict[str, Any], publish: PublishOptions) -> str:
        request = JobCreate(
            kind=JobKind.MERGE, recipe=recipe, artifact_name="soup", publish=publish
        )
        return self.store.create_job(self.tenant_id, request).job.id

    def run(self, job_id: str, worker_id: str = "w1") -> None:
        run_job(
            job_id,
            store=self.store,
            settings=self.settings,
            object_store=self.objects,
            worker_id=worker_id,
            work_root=self.work_root,
        )

    def job(self, job_id: str) -> Any:
        job = self.store.get(self.tenant_id, job_id)
        assert job is not None
        return job


@pytest.fixture
def on_hub(hub: HubServer, llama_family: dict[str, Path]) -> dict[str, Any]:
    """Two fine-tunes on the Hub, a token that may write to 'acme', and a recipe merging them."""
    hub.add_repo("meta/ft1", llama_family["ft1"])
    hub.add_repo("meta/ft2", llama_family["ft2"])
    hub.grant_write(TOKEN, ["acme"])
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": "meta/ft1", "parameters": {"weight": 0.5}},
            {"model": "meta/ft2", "parameters": {"weight": 0.5}},
        ],
        "seed": 1,
    }
    return {"recipe": recipe}


@pytest.fixture
def worker(tmp_path: Path, hub: HubServer) -> Iterator[Worker]:
    w = Worker(tmp_path, hub, TOKEN)
    yield w
    w.engine.dispose()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_job_pushes_its_artifact_in_one_commit_that_downloads_back_byte_for_byte(
    worker: Worker, hub: HubServer, on_hub: dict[str, Any], tmp_path: Path
) -> None:
    job_id = worker.submit(on_hub["recipe"], PublishOptions(hub_repo="acme/soup"))
    worker.run(job_id)

    view = worker.job(job_id).to_view()
    assert view.state == JobState.SUCCEEDED, view.error
    commit = view.publish.hub_commit
    assert commit is not None
    assert (commit.repo, commit.branch, commit.artifact) == (
        "acme/soup",
        "main",
        "artifact://soup@1",
    )
    assert commit.commit_sha == hub.commit_of("acme/soup", "main")
    assert commit.commit_url.endswith(f"/acme/soup/commit/{commit.commit_sha}")
    assert hub.commits("acme/soup") == [commit.commit_sha]  # one commit for every file
    message = hub.commit_message("acme/soup", commit.commit_sha)
    assert message is not None and "artifact://soup@1" in message and job_id in message
    assert not hub.is_private("acme/soup")

    # Downloaded back with huggingface_hub, every file has the manifest's sha256.
    manifest = read_manifest(worker.objects, TENANT, "soup", 1)
    folder = Path(
        snapshot_download("acme/soup", revision=commit.commit_sha, cache_dir=tmp_path / "dl")
    )
    assert {e["path"] for e in manifest["files"]} >= {
        "config.json",
        "README.md",
        "model.safetensors.index.json",
    }
    for entry in manifest["files"]:
        assert sha256_of(folder / entry["path"]) == entry["sha256"], entry["path"]
    assert json.loads((folder / HUB_MANIFEST).read_text()) == manifest

    # The model card names the Hub parents; the weights went through the LFS basic transfer.
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == ["meta/ft1", "meta/ft2"]
    assert front["base_model_relation"] == "merge"
    shards = [e for e in manifest["files"] if e["path"].endswith(".safetensors")]
    stored = hub.files("acme/soup", commit.commit_sha)
    assert shards and all(stored[e["path"]] for e in shards)  # stored as LFS
    assert not stored["config.json"] and not stored["README.md"]
    assert sorted(hub.lfs_uploads("acme/soup")) == sorted(e["sha256"] for e in shards)
    puts = [r for r in hub.requests if r.method == "PUT"]
    assert len(puts) == len(shards) and not any(r.authorized for r in puts)


def test_a_job_retried_after_publishing_reuses_its_version_and_makes_no_second_commit(
    worker: Worker,
    hub: HubServer,
    on_hub: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = worker.submit(on_hub["recipe"], PublishOptions(hub_repo="acme/soup"))
    calls = []
    real = JobStore.finish_succeeded

    def crash_once(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        from sqlalchemy.exc import OperationalError

        calls.append(1)
        if len(calls) == 1:  # the database is lost between pushing and recording success
            raise OperationalError("UPDATE jobs", {}, ConnectionError("server closed"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(JobStore, "finish_succeeded", crash_once)
    with pytest.raises(RetryLater) as retry:
        worker.run(job_id, "w1")
    first = hub.commit_of("acme/soup")
    time.sleep(retry.value.delay_s + 0.2)
    worker.run(job_id, "w2")

    job = worker.job(job_id)
    assert (job.state, job.attempts) == (JobState.SUCCEEDED, 2)
    assert [v.version for v in list_versions(worker.objects, TENANT, "soup")] == [1]
    assert hub.commits("acme/soup") == [first]  # the same content again: no new commit
    assert job.to_view().publish.hub_commit.commit_sha == first


def test_a_rejected_token_fails_the_job_and_the_token_appears_nowhere(
    tmp_path: Path,
    hub: HubServer,
    on_hub: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bad = "hf_notAValidToken987654321"
    w = Worker(tmp_path, hub, bad)
    job_id = w.submit(on_hub["recipe"], PublishOptions(hub_repo="acme/soup"))
    w.run(job_id)

    view = w.job(job_id).to_view()
    assert view.state == JobState.FAILED
    assert view.error is not None and view.error.field == "publish.hub_repo"
    message = view.error.message
    assert "acme/soup" in message and "HTTP 401" in message and "/v1/tenant/hub-token" in message
    assert "artifact://soup@1 was published" in message
    # The version stays published (immutable and complete); nothing reached the Hub.
    assert [v.version for v in list_versions(w.objects, TENANT, "soup")] == [1]
    assert view.publish is not None and view.publish.hub_commit is None
    assert not hub.lfs_uploads("acme/soup")
    assert bad not in view.model_dump_json()
    assert bad not in caplog.text
    with w.engine.connect() as conn:  # stored sealed, not as it was given
        assert bad not in str(conn.exec_driver_sql("SELECT hub_token FROM tenants").all())
    w.engine.dispose()


def test_a_hub_down_after_the_in_job_retries_fails_the_last_attempt_clearly(
    tmp_path: Path,
    hub: HubServer,
    on_hub: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub_push, "RETRY_DELAYS_S", (0.0, 0.0))
    hub.fail("/api/repos/create", 503)
    w = Worker(tmp_path, hub, TOKEN, max_attempts=1)
    job_id = w.submit(on_hub["recipe"], PublishOptions(hub_repo="acme/soup"))
    w.run(job_id)

    job = w.job(job_id)
    assert job.state == JobState.FAILED
    message = job.error["message"]
    assert "artifact://soup@1 was published" in message and "acme/soup" in message
    assert "HTTP 503" in message and "tried 3 times" in message
    assert hub.count(method="POST", path_contains="/api/repos/create") == 3
    w.engine.dispose()


# ---- push_artifact on its own ---------------------------------------------------------------


def artifact_folder(root: Path, files: dict[str, bytes]) -> tuple[Path, list[ArtifactFile]]:
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    entries = [ArtifactFile(n, hashlib.sha256(d).hexdigest()) for n, d in sorted(files.items())]
    return root, entries


def manifest_of(entries: list[ArtifactFile]) -> bytes:
    return json.dumps({"files": [{"path": e.path, "sha256": e.sha256} for e in entries]}).encode()


def target(hub: HubServer, repo: str = "acme/out", **kwargs: Any) -> HubTarget:
    return HubTarget(repo=repo, endpoint=hub.url, token=TOKEN, **kwargs)


CARD = b"---\nbase_model:\n- meta/ft1\nbase_model_relation: merge\n---\n# out\n"


def test_a_private_push_to_a_branch_creates_both_and_anonymous_readers_are_refused(
    hub: HubServer, tmp_path: Path
) -> None:
    hub.grant_write(TOKEN, ["acme"])
    folder, files = artifact_folder(
        tmp_path / "a", {"model.safetensors": b"\x01" * 4096, "README.md": CARD}
    )
    pushed = push_artifact(
        target(hub, branch="dev", private=True),
        folder,
        files,
        manifest_of(files),
        commit_message="m",
    )

    assert hub.is_private("acme/out")
    assert hub.commit_of("acme/out", "dev") == pushed.sha
    assert set(hub.files("acme/out", "main")) == {".gitattributes"}  # main is untouched
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/out", "README.md", revision="dev", cache_dir=tmp_path / "anon")
    got = hf_hub_download(
        "acme/out", "README.md", revision="dev", token=TOKEN, cache_dir=tmp_path / "owner"
    )
    assert Path(got).read_bytes() == CARD


def test_a_new_version_replaces_the_files_of_the_previous_push_and_an_identical_push_is_a_no_op(
    hub: HubServer, tmp_path: Path
) -> None:
    hub.grant_write(TOKEN, ["acme"])
    hub.add_repo("acme/out", {"notes.txt": b"kept: not weightsmith's"})
    old, old_files = artifact_folder(
        tmp_path / "v1",
        {"model-00001-of-00002.safetensors": b"a" * 100, "model-00002-of-00002.safetensors": b"b"},
    )
    push_artifact(target(hub), old, old_files, manifest_of(old_files), commit_message="v1")
    new, new_files = artifact_folder(tmp_path / "v2", {"model.safetensors": b"c" * 100})
    second = push_artifact(target(hub), new, new_files, manifest_of(new_files), commit_message="v2")

    assert set(hub.files("acme/out")) == {"notes.txt", "model.safetensors", HUB_MANIFEST}
    again = push_artifact(target(hub), new, new_files, manifest_of(new_files), commit_message="v2")
    assert again.sha == second.sha == hub.commit_of("acme/out")
    assert len(hub.commits("acme/out")) == 2


def test_a_transient_hub_error_is_retried_and_a_403_is_not(hub: HubServer, tmp_path: Path) -> None:
    hub.grant_write(TOKEN, ["acme"])
    folder, files = artifact_folder(tmp_path / "a", {"config.json": b"{}"})
    hub.fail("/commit/", 503, times=1)
    slept: list[float] = []
    pushed = push_artifact(
        target(hub),
        folder,
        files,
        manifest_of(files),
        commit_message="m",
        retry_delays_s=(2.5,),
        sleep=slept.append,
    )
    assert slept == [2.5] and pushed.sha == hub.commit_of("acme/out")

    with pytest.raises(HubPushRefused) as refused:
        push_artifact(
            target(hub, repo="other/out"), folder, files, manifest_of(files), commit_message="m"
        )
    assert "HTTP 403" in refused.value.message and "'other'" in refused.value.message


def test_an_unreachable_hub_is_transient(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder, files = artifact_folder(tmp_path / "a", {"config.json": b"{}"})
    unreachable = HubTarget(repo="acme/out", endpoint=f"http://127.0.0.1:{port}", token=TOKEN)
    with pytest.raises(HubUnavailable) as down:
        push_artifact(
            unreachable,
            folder,
            files,
            manifest_of(files),
            commit_message="m",
            retry_delays_s=(0.0,),
        )
    assert "unreachable" in down.value.message and "tried 2 times" in down.value.message
    assert TOKEN not in str(down.value)


# ---- submission -----------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path, s3_server: Any) -> Iterator[Any]:
    """Build an app whose tenant may push to 'acme', with or without a Hub token of its
    own; returns (client, headers)."""
    clients: list[TestClient] = []

    def make(token: str | None) -> tuple[TestClient, dict[str, str]]:
        settings = Settings(
            data_dir=tmp_path / f"data-{len(clients)}",
            database_url=f"sqlite:///{tmp_path}/jobs-{len(clients)}.db",
            object_store_url=f"file://{tmp_path}/artifacts",
            broker_url=None,
            hf_token="hf_operator_token_not_granted",
            bootstrap_api_key=None,
            bootstrap_key_file=None,
        )
        client = TestClient(create_app(settings, queue=InProcessQueue(lambda _: None)))
        client.__enter__()
        clients.append(client)
        service = client.app.state.service  # type: ignore[attr-defined]
        key = service.keys.create_key(TENANT)
        service.tenants.grant_hub_push(TENANT, "acme")
        grant_models(service, TENANT, models_bucket(s3_server))
        headers = {"Authorization": f"Bearer {key}"}
        if token is not None:
            r = client.put("/v1/tenant/hub-token", json={"token": token}, headers=headers)
            assert r.status_code == 204, r.text
        return client, headers

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_a_hub_push_is_refused_at_submission_when_the_tenant_has_no_token(api: Any) -> None:
    client, headers = api(None)  # the service has a token, but did not grant it
    body = {**merge_job(), "publish": {"hub_repo": "acme/soup"}}
    response = client.post("/v1/jobs", json=body, headers=headers)

    assert response.status_code == 422
    problem = response.json()
    assert [e["pointer"] for e in problem["errors"]] == ["/publish/hub_repo"]
    assert "/v1/tenant/hub-token" in problem["detail"]
    assert client.post("/v1/jobs", json=merge_job(), headers=headers).status_code == 202


def test_a_hub_push_to_a_namespace_not_granted_is_refused_at_submission(api: Any) -> None:
    client, headers = api("hf_x")
    body = {**merge_job(), "publish": {"hub_repo": "other-org/soup"}}
    response = client.post("/v1/jobs", json=body, headers=headers)

    assert response.status_code == 422
    problem = response.json()
    assert [e["pointer"] for e in problem["errors"]] == ["/publish/hub_repo"]
    assert "granted: acme" in problem["detail"]


def test_a_job_with_a_hub_push_is_accepted_with_a_token_and_shows_its_options(api: Any) -> None:
    client, headers = api("hf_x")
    body = {**merge_job(), "publish": {"hub_repo": "acme/soup", "private": True, "branch": "dev"}}
    response = client.post("/v1/jobs", json=body, headers=headers)

    assert response.status_code == 202, response.text
    publish = response.json()["publish"]
    assert publish == {
        "hub_repo": "acme/soup",
        "private": True,
        "branch": "dev",
        "hub_commit": None,
    }
    bad = {**merge_job(), "publish": {"hub_repo": "not a repo"}}
    response = client.post("/v1/jobs", json=bad, headers=headers)
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/publish/hub_repo"
    smuggled = {**merge_job(), "publish": {"hub_repo": "acme/soup", "hub_commit": {}}}
    assert client.post("/v1/jobs", json=smuggled, headers=headers).status_code == 422
