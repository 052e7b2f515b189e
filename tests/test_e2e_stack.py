"""End to end on the production stack, all real and all at once: the API (PostgreSQL job
store, SeaweedFS S3 artifacts, pinning against a local Hugging Face Hub endpoint) hands jobs
to a ``weightsmith worker`` subprocess through Redis; the worker downloads the pinned hub
commits, merges, publishes to S3; the client downloads every file through the API (presigned
S3 redirects), checks each sha256 and loads the merge in transformers.

Also here, because only the full stack shows them: a re-submitted reproducible recipe is
answered with the existing version (recipe hash) instead of running again, and inputs that
break between submission and the worker (a repo deleted: 404; a repo gated against the
worker's token: 401; a corrupted file) fail the job with a clear error and publish nothing.

Redis database 7 belongs to this module (flushed at start): no other worker listens there.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from infra.queue import RUN_JOB_TASK, InProcessQueue
from infra.secrets import new_key
from infra.settings import Settings
from testbed.hub import HubServer
from testbed.postgres import fresh_database
from tests.support.reference_merge import reference_merge

pytestmark = pytest.mark.slow  # the whole stack: a Celery worker process, Redis, PostgreSQL

REDIS_URL = os.environ.get("TEST_E2E_REDIS_URL", "redis://127.0.0.1:6379/7")
ROOT = Path(__file__).resolve().parent.parent
HF_TOKEN = "hf_e2e_" + secrets.token_hex(8)  # the tenant's own
OPERATOR_TOKEN = "hf_operator_" + secrets.token_hex(8)
SECRET_KEYS = new_key()
API_KEY = f"wsk_{secrets.token_hex(5)}_{secrets.token_hex(32)}"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Stack:
    client: TestClient  # the API, sending jobs through Redis to the worker
    held: TestClient  # the same API, but jobs wait until release() sends them
    held_ids: list[str]
    hub: HubServer
    worker_log: Path
    send: Callable[[str], None]

    def release(self, job_id: str) -> None:
        assert job_id in self.held_ids
        self.send(job_id)

    def wait(self, job_id: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            r = self.client.get(f"/v1/jobs/{job_id}", headers=AUTH)
            assert r.status_code == 200, r.text
            view: dict[str, Any] = r.json()
            if view["state"] in ("succeeded", "failed", "cancelled"):
                return view
            if time.monotonic() > deadline:
                tail = self.worker_log.read_text(errors="replace")[-3000:]
                pytest.fail(f"job {job_id} still {view['state']} after {timeout} s\n{tail}")
            time.sleep(0.2)

    def versions(self, name: str) -> list[int]:
        r = self.client.get(f"/v1/artifacts/{name}/versions", headers=AUTH)
        if r.status_code == 404:
            return []
        assert r.status_code == 200, r.text
        return [v["version"] for v in r.json()["items"]]


def _flush_redis() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).flushdb()
    except redis.RedisError as e:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({e})", pytrace=False)


@pytest.fixture(scope="module")
def stack(
    s3_server: Any, llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    from celery import Celery

    _flush_redis()
    root = tmp_path_factory.mktemp("e2e")
    hub = HubServer().start()
    for name in ("base", "ft1", "ft2"):
        hub.add_repo(f"org/{name}", llama_family[name], gated=True, private_token=HF_TOKEN)
    objects = s3_server.url(f"e2e-{secrets.token_hex(4)}", create_bucket="true")
    with fresh_database("weightsmith_e2e") as db_url:
        common = {
            "WEIGHTSMITH_DATABASE_URL": db_url,
            "WEIGHTSMITH_BROKER_URL": REDIS_URL,
            "WEIGHTSMITH_OBJECT_STORE_URL": objects,
            "WEIGHTSMITH_HF_ENDPOINT": hub.url,
            # the service's own token is configured but lent to no tenant: the tenant's is used
            "WEIGHTSMITH_HF_TOKEN": OPERATOR_TOKEN,
            "WEIGHTSMITH_SECRET_KEYS": SECRET_KEYS,
            "WEIGHTSMITH_JOB_HARD_TIME_LIMIT": "300",
            "WEIGHTSMITH_VISIBILITY_TIMEOUT": "400",
            "WEIGHTSMITH_WORKER_HEARTBEAT_INTERVAL": "1",
            "WEIGHTSMITH_WORKER_LOST_AFTER": "5",
        }
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("WEIGHTSMITH_", "HF_"))},
            **common,
            "WEIGHTSMITH_DATA_DIR": str(root / "worker"),
            "HF_HUB_CACHE": str(root / "hf-cache"),
            "HF_HUB_DISABLE_XET": "1",
            "PYTHONPATH": str(ROOT),
        }
        worker_log = root / "worker.log"
        with worker_log.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "weightsmith", "worker", "--queues", "default"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        settings = Settings(
            data_dir=root / "api",
            database_url=db_url,
            broker_url=REDIS_URL,
            object_store_url=objects,
            hf_endpoint=hub.url,
            hf_token=OPERATOR_TOKEN,
            secret_keys=SECRET_KEYS,
            bootstrap_tenant="e2e",
            bootstrap_api_key=API_KEY,
            bootstrap_key_file=None,
            worker_lost_after=5,
            worker_heartbeat_interval=1,
        )
        held_ids: list[str] = []
        producer = Celery("weightsmith-e2e-producer", broker=REDIS_URL)
        try:
            with (
                TestClient(create_app(settings)) as client,
                TestClient(create_app(settings, queue=InProcessQueue(held_ids.append))) as held,
            ):
                # The tenant's own Hub token reads the gated repos (sealed in the database,
                # opened by the worker with the same WEIGHTSMITH_SECRET_KEYS).
                stored = client.put(
                    "/v1/tenant/hub-token",
                    json={"token": HF_TOKEN},
                    headers=AUTH,
                )
                assert stored.status_code == 204, stored.text
                service = client.app.state.service  # type: ignore[attr-defined]
                service.tenants.grant_hub_push("e2e", "org")  # the operator's grant
                yield Stack(
                    client,
                    held,
                    held_ids,
                    hub,
                    worker_log,
                    lambda job_id: producer.send_task(RUN_JOB_TASK, args=[job_id], queue="default"),
                )
        finally:
            try:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
            producer.close()
            hub.stop()


def ties_recipe(seed: int | None = 11) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "hf://org/ft1", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "org/ft2@main", "parameters": {"weight": 0.7, "density": 0.6}},
        ],
        "dtype": "float32",
    }
    if seed is not None:
        recipe["seed"] = seed
    return recipe


def download(stack: Stack, name: str, version: int, dest: Path) -> dict[str, Any]:
    """Every file of a version through the API (following presigned S3 redirects without the
    API key); each size and sha256 checked against the manifest. Returns the manifest."""
    r = stack.client.get(f"/v1/artifacts/{name}/versions/{version}", headers=AUTH)
    assert r.status_code == 200, r.text
    manifest: dict[str, Any] = r.json()
    dest.mkdir(parents=True)
    for entry in manifest["files"]:
        url = f"/v1/artifacts/{name}/versions/{version}/files/{entry['path']}"
        r = stack.client.get(url, headers=AUTH, follow_redirects=False)
        if r.status_code == 307:
            with urllib.request.urlopen(r.headers["location"], timeout=30) as remote:
                data = remote.read()
        else:
            assert r.status_code == 200, r.text
            data = r.content
        assert len(data) == entry["size"], entry["path"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
        target = dest / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return manifest


def test_a_hub_merge_runs_on_the_worker_and_downloads_verified(
    stack: Stack, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    r = stack.client.post(
        "/v1/jobs",
        json={"kind": "merge", "recipe": ties_recipe(), "artifact_name": "e2e-ties"},
        headers=AUTH,
    )
    assert r.status_code == 202, r.text
    submitted = r.json()
    assert submitted["state"] == "queued"
    commits = {n: stack.hub.commit_of(f"org/{n}") for n in ("base", "ft1", "ft2")}
    assert submitted["recipe"]["base_model"] == f"org/base@{commits['base']}"
    assert [m["model"] for m in submitted["recipe"]["models"]] == [
        f"org/ft1@{commits['ft1']}",
        f"org/ft2@{commits['ft2']}",
    ]

    job = stack.wait(submitted["id"])
    assert job["state"] == "succeeded", job["error"]
    assert job["attempts"] == 1
    assert job["artifact"]["name"] == "e2e-ties" and job["artifact"]["version"] == 1
    assert job["progress"]["tensors_done"] == job["progress"]["tensors_total"] > 0

    out = tmp_path / "pulled"
    manifest = download(stack, "e2e-ties", 1, out)
    assert {p["pinned"] for p in manifest["parents"]} == {
        f"org/{n}@{sha}" for n, sha in commits.items()
    }
    # What the hub served was only what a merge needs, at the pinned commits.
    for n in ("base", "ft1", "ft2"):
        assert "model.safetensors" in stack.hub.downloaded(f"org/{n}")

    # The merge matches the independent dense reference, and transformers loads it.
    local = ties_recipe()
    local["base_model"] = str(llama_family["base"])
    local["models"][0]["model"] = str(llama_family["ft1"])
    local["models"][1]["model"] = str(llama_family["ft2"])
    expected = reference_merge(local)
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        merged.update(load_file(shard))
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor.to(merged[name].dtype), msg=name)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 6)


def test_a_resubmitted_reproducible_recipe_reuses_the_published_version(stack: Stack) -> None:
    body = {"kind": "merge", "recipe": ties_recipe(seed=5), "artifact_name": "e2e-reuse"}
    first = stack.wait(stack.client.post("/v1/jobs", json=body, headers=AUTH).json()["id"])
    assert first["state"] == "succeeded", first["error"]
    assert stack.versions("e2e-reuse") == [1]

    # Same recipe, same pinned commits, same seed: answered at once, nothing queued.
    again = stack.held.post("/v1/jobs", json=body, headers=AUTH)
    assert again.status_code == 202, again.text
    view = again.json()
    assert view["state"] == "succeeded" and view["progress"]["phase"] == "reused"
    assert view["artifact"] == first["artifact"]
    assert view["id"] not in stack.held_ids
    assert stack.versions("e2e-reuse") == [1]

    # Opting out, a new seed, no seed, or a hub push: each runs (a new version when it does).
    forced = stack.client.post("/v1/jobs", json={**body, "reuse": False}, headers=AUTH)
    assert stack.wait(forced.json()["id"])["artifact"]["version"] == 2
    reseeded = {**body, "recipe": ties_recipe(seed=6)}
    assert stack.held.post("/v1/jobs", json=reseeded, headers=AUTH).json()["state"] == "queued"
    pushed = {**body, "publish": {"hub_repo": "org/pushed"}}  # the push is part of the job
    assert stack.held.post("/v1/jobs", json=pushed, headers=AUTH).json()["state"] == "queued"
    unseeded = {**body, "recipe": ties_recipe(seed=None)}
    assert stack.held.post("/v1/jobs", json=unseeded, headers=AUTH).json()["state"] == "queued"
    assert stack.versions("e2e-reuse") == [1, 2]


def _submit_held(stack: Stack, recipe: dict[str, Any], name: str) -> str:
    r = stack.held.post(
        "/v1/jobs", json={"kind": "merge", "recipe": recipe, "artifact_name": name}, headers=AUTH
    )
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    assert job_id in stack.held_ids
    return job_id


def _assert_failed_cleanly(stack: Stack, job_id: str, name: str, *words: str) -> dict[str, Any]:
    job = stack.wait(job_id)
    assert job["state"] == "failed", job
    error = job["error"]
    text = " ".join(str(v) for v in error.values() if v)
    for word in words:
        assert word in text, text
    assert HF_TOKEN not in str(job) and OPERATOR_TOKEN not in str(job)
    assert stack.versions(name) == []  # nothing published, not even partially
    return error


def test_a_hub_repo_deleted_after_submission_fails_the_job_clearly(
    stack: Stack, llama_family: dict[str, Path]
) -> None:
    stack.hub.add_repo("org/vanishing", llama_family["ft1"], gated=True, private_token=HF_TOKEN)
    recipe = ties_recipe()
    recipe["models"][0]["model"] = "org/vanishing"
    job_id = _submit_held(stack, recipe, "e2e-404")
    stack.hub.delete_repo("org/vanishing")
    stack.release(job_id)
    error = _assert_failed_cleanly(stack, job_id, "e2e-404", "org/vanishing", "not found")
    assert error["model"].startswith("org/vanishing@")


def test_a_hub_repo_gated_against_the_tenants_token_fails_the_job_clearly(
    stack: Stack, llama_family: dict[str, Path]
) -> None:
    stack.hub.add_repo("org/gating", llama_family["ft2"], gated=True, private_token=HF_TOKEN)
    recipe = ties_recipe()
    recipe["models"][1]["model"] = "org/gating"
    job_id = _submit_held(stack, recipe, "e2e-401")
    # The repo's conditions change: the tenant's token no longer has access.
    stack.hub.add_repo("org/gating", llama_family["ft2"], private_token="hf_someone_else")
    stack.release(job_id)
    error = _assert_failed_cleanly(stack, job_id, "e2e-401", "org/gating", "gated")
    assert error["model"].startswith("org/gating@")


def test_a_corrupted_hub_file_fails_the_job_clearly(
    stack: Stack, llama_family: dict[str, Path]
) -> None:
    stack.hub.add_repo("org/corrupt", llama_family["ft1"], gated=True, private_token=HF_TOKEN)
    recipe = ties_recipe()
    recipe["models"][0]["model"] = "org/corrupt"
    job_id = _submit_held(stack, recipe, "e2e-corrupt")
    stack.hub.corrupt("org/corrupt", "model.safetensors")
    stack.release(job_id)
    _assert_failed_cleanly(stack, job_id, "e2e-corrupt", "org/corrupt", "model.safetensors")
