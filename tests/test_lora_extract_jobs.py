"""``kind: extract_lora`` through the service: POST /v1/jobs → embedded worker → a published
PEFT adapter, whose artifact is then a ``BASE+ADAPTER`` input of a merge job; bad recipes and
another tenant's artifact are refused with a 4xx naming the field. Tiny real Llama models,
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
from testbed.tiny_models import build_llama_base
from tests.support.api import assert_problem
from tests.support.lora_extract import WEIGHTS, build_low_rank_finetune, is_decoder_linear, low_rank
from tests.support.merge_cases import load_output
from workers.embedded import EmbeddedWorker

JOB_TIMEOUT_S = 300


@dataclass
class Service:
    api: ApiHarness
    worker: EmbeddedWorker
    base: Path
    ft: Path

    def submit(self, kind: str, recipe: dict[str, Any], name: str, **kw: Any) -> Any:
        body = {"kind": kind, "recipe": recipe, "artifact_name": name}
        return self.api.submit(body, **kw)

    def run(self, kind: str, recipe: dict[str, Any], name: str) -> dict[str, Any]:
        response = self.submit(kind, recipe, name)
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


def _rank_two(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor | None:
    return low_rank(shape, 2, 0.02, gen) if is_decoder_linear(name) else None


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("extract-service")
    base = build_llama_base(tmp / "base", seed=31)
    build_low_rank_finetune(base, tmp / "ft", _rank_two, seed=2)
    settings = Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp}/jobs.db",
        object_store_url=f"file://{tmp}/artifacts",
        broker_url=None,
        hf_endpoint=None,
        hf_token=None,
        bootstrap_api_key=None,
        bootstrap_key_file=None,
        allow_local_paths=True,  # the base is a local folder
        worker_heartbeat_interval=1,
        worker_lost_after=60,
    )
    worker = EmbeddedWorker.from_settings(settings)
    client = TestClient(create_app(settings, queue=InProcessQueue(worker.submit)))
    client.__enter__()  # startup migrates the database
    worker.start()
    api = ApiHarness(client, settings, [], tmp)
    api.tenant, api.headers = api.new_tenant()
    # the fine-tune is the tenant's own artifact: the job must pin and fetch it
    api.publish("ft", {p.name: p.read_bytes() for p in (tmp / "ft").iterdir() if p.is_file()})
    yield Service(api, worker, base, tmp / "ft")
    worker.stop(timeout=60)
    client.__exit__(None, None, None)


def test_an_extraction_job_publishes_an_adapter_that_a_merge_job_applies(
    service: Service, tmp_path: Path
) -> None:
    recipe = {"base": str(service.base), "model": "artifact://ft", "rank": 2, "seed": 3}
    job = service.run("extract_lora", recipe, "ft-lora")
    assert job["state"] == "succeeded", job["error"]
    assert job["recipe"]["model"] == "artifact://ft@1"  # pinned at submission
    total = len(load_file(str(service.base / WEIGHTS)))
    assert job["progress"]["tensors_done"] == job["progress"]["tensors_total"] == total
    store, tenant = service.api.service.store, service.api.tenant
    adapter = download_artifact(store, tenant, "ft-lora", 1, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file()

    merge = {
        "merge_method": "linear",
        "models": [{"model": f"{service.base}+artifact://ft-lora@1", "parameters": {"weight": 1}}],
    }
    job = service.run("merge", merge, "ft-again")
    assert job["state"] == "succeeded", job["error"]
    merged = download_artifact(store, tenant, "ft-again", 1, tmp_path / "merged")
    got, want = load_output(merged), load_file(str(service.ft / WEIGHTS))
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.allclose(got[name], w, atol=1e-6, rtol=0), name


def test_a_bad_extraction_recipe_is_a_422_naming_the_field(service: Service) -> None:
    base = str(service.base)
    r = service.submit("extract_lora", {"base": base, "model": "artifact://ft", "rank": 2.5}, "x")
    body = assert_problem(r, 422)
    assert body["errors"][0]["pointer"] == "/recipe/rank"
    r = service.submit(
        "extract_lora", {"base": base, "model": "artifact://ft", "rank": 2, "energy": 0.5}, "x"
    )
    assert "rank: give either rank" in assert_problem(r, 422)["detail"]
    r = service.submit("extract_lora", {"base": base, "model": "artifact://nope", "rank": 2}, "x")
    assert assert_problem(r, 422)["detail"].startswith("/recipe/model: ")


def test_another_tenants_artifact_is_refused(service: Service) -> None:
    _, headers = service.api.new_tenant()
    recipe = {"base": str(service.base), "model": "artifact://ft@1", "rank": 2}
    r = service.submit("extract_lora", recipe, "stolen", headers=headers)
    assert assert_problem(r, 422)["detail"].startswith("/recipe/model: ")


def test_an_error_found_by_the_worker_fails_the_job_naming_the_field(service: Service) -> None:
    recipe = {
        "base": str(service.base),
        "model": "artifact://ft@1",
        "rank": 2,
        "target_modules": ["q_proj", "attention"],
    }
    job = service.run("extract_lora", recipe, "bad-target")
    assert job["state"] == "failed"
    assert job["error"]["field"] == "target_modules[1]"
    assert "'attention' matches no module" in job["error"]["message"]
