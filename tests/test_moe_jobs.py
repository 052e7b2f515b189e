"""``kind: moe`` through the service: POST /v1/jobs → embedded worker → a published Mixtral
checkpoint; inputs pinned and tenant-checked like a merge's (an expert that is the tenant's
own artifact is pinned, another tenant's is refused); bad recipes are a 4xx naming the field;
an error only the worker can see fails the job naming the field. Tiny real Llama models,
SQLite and the local object store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from app.main import create_app
from infra.artifacts import download_artifact
from infra.queue import InProcessQueue
from infra.settings import Settings
from schemas.jobs import JobState
from testbed.api import ApiHarness
from testbed.tiny_models import build_gpt2_base, build_llama_base
from tests.support.api import assert_problem
from tests.support.moe import WEIGHTS, build_experts, load_output, moe_recipe
from workers.embedded import EmbeddedWorker

JOB_TIMEOUT_S = 300


@dataclass
class Service:
    api: ApiHarness
    base: Path
    experts: list[Path]
    gpt2: Path

    def submit(self, recipe: dict[str, Any], name: str, **kw: Any) -> Any:
        return self.api.submit({"kind": "moe", "recipe": recipe, "artifact_name": name}, **kw)

    def run(self, recipe: dict[str, Any], name: str) -> dict[str, Any]:
        response = self.submit(recipe, name)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            job: dict[str, Any] = self.api.client.get(
                f"/v1/jobs/{job_id}", headers=self.api.headers
            ).json()
            if JobState(job["state"]).is_terminal:
                return job
            assert time.monotonic() < deadline, f"job {job_id} stuck in {job['state']}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("moe-service")
    base = build_llama_base(tmp / "base", seed=31)
    experts = build_experts(base, tmp, 2)
    gpt2 = build_gpt2_base(tmp / "gpt2", seed=1)
    settings = Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp}/jobs.db",
        object_store_url=f"file://{tmp}/artifacts",
        broker_url=None,
        hf_endpoint=None,
        hf_token=None,
        bootstrap_api_key=None,
        bootstrap_key_file=None,
        allow_local_paths=True,  # the base and one expert are local folders
        worker_heartbeat_interval=1,
        worker_lost_after=60,
    )
    worker = EmbeddedWorker.from_settings(settings)
    client = TestClient(create_app(settings, queue=InProcessQueue(worker.submit)))
    client.__enter__()  # startup migrates the database
    worker.start()
    api = ApiHarness(client, settings, [], tmp)
    api.tenant, api.headers = api.new_tenant()
    # expert 0 is the tenant's own artifact: the job must pin and fetch it
    files = {p.name: p.read_bytes() for p in experts[0].iterdir() if p.is_file()}
    api.publish("expert0", files)
    yield Service(api, base, experts, gpt2)
    worker.stop(timeout=60)
    client.__exit__(None, None, None)


def _recipe(service: Service, **extra: Any) -> dict[str, Any]:
    recipe = moe_recipe(service.base, service.experts, **extra)
    recipe["experts"][0]["source_model"] = "artifact://expert0"
    return recipe


def test_a_moe_job_publishes_the_mixtral_checkpoint(service: Service, tmp_path: Path) -> None:
    job = service.run(_recipe(service), "moe")
    assert job["state"] == "succeeded", job["error"]
    assert job["recipe"]["experts"][0]["source_model"] == "artifact://expert0@1"  # pinned
    progress = job["progress"]
    assert progress["tensors_done"] == progress["tensors_total"] > 0
    store, tenant = service.api.service.store, service.api.tenant
    out = download_artifact(store, tenant, "moe", 1, tmp_path / "moe")
    got = load_output(out)
    for e, src_dir in enumerate(service.experts):
        src = load_file(str(src_dir / WEIGHTS))
        key = f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight"
        assert torch.equal(got[key], src["model.layers.1.mlp.up_proj.weight"]), key
    base = load_file(str(service.base / WEIGHTS))
    assert torch.equal(
        got["model.layers.1.self_attn.q_proj.weight"],
        base["model.layers.1.self_attn.q_proj.weight"],
    )
    assert got["model.layers.0.block_sparse_moe.gate.weight"].shape == (2, 64)


def test_a_bad_moe_recipe_is_a_422_naming_the_field(service: Service) -> None:
    r = service.submit(_recipe(service, experts_per_token=3), "x")
    assert "experts_per_token: 3 is more than the 2 expert(s)" in assert_problem(r, 422)["detail"]
    r = service.submit(_recipe(service, experts_per_token="two"), "x")
    assert assert_problem(r, 422)["errors"][0]["pointer"] == "/recipe/experts_per_token"
    bad = _recipe(service)
    bad["experts"][1]["source_model"] = "artifact://nope"
    detail = assert_problem(service.submit(bad, "x"), 422)["detail"]
    assert detail.startswith("/recipe/experts/1/source_model: ")


def test_another_tenants_artifact_is_refused(service: Service) -> None:
    _, headers = service.api.new_tenant()
    recipe = _recipe(service)
    recipe["experts"][0]["source_model"] = "artifact://expert0@1"
    detail = assert_problem(service.submit(recipe, "stolen", headers=headers), 422)["detail"]
    assert detail.startswith("/recipe/experts/0/source_model: ")


def test_an_error_found_by_the_worker_fails_the_job_naming_the_field(service: Service) -> None:
    recipe = _recipe(service)
    recipe["experts"][1]["source_model"] = str(service.gpt2)
    job = service.run(recipe, "bad-expert")
    assert job["state"] == "failed"
    assert job["error"]["field"] == "experts[1].source_model"
    assert "model_type 'gpt2' differs from the base's 'llama'" in job["error"]["message"]
