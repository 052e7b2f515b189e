"""Edit jobs through the service: POST /v1/jobs → embedded worker → artifact, on the real
SmolLM2-135M (testbed/smollm2.py), with SQLite and the local object store.

One app and one worker serve the whole module; the jobs run one after the other and share
the covariance cache in the object store. CI time on 2 CPU cores is the constraint: a small
plain-text corpus (2,048 tokens, published as an artifact and read as
``artifact://corpora@1/corpus.txt``), 3 context templates, and the later jobs stop after
one optimisation step (their gate is set so that any edit trips it).

Slow (minutes on 2 CPU cores): ``pytest -m "not slow"`` leaves these out.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from infra.queue import InProcessQueue
from infra.settings import Settings
from schemas.jobs import PROBLEM_JSON, JobState
from testbed.api import ApiHarness
from testbed.smollm2 import write_text_corpus
from workers.edit.covariance import COMPUTED
from workers.embedded import EmbeddedWorker

pytestmark = pytest.mark.slow

PROMPT, SUBJECT, NEW, TRUE = "The capital of Japan is", "Japan", "Paris", "Tokyo"
CORPUS = "artifact://corpora@1/corpus.txt"
JOB_TIMEOUT_S = 1800


@dataclass
class Service:
    api: ApiHarness
    worker: EmbeddedWorker

    def submit(self, recipe: dict[str, Any], name: str) -> Any:
        return self.api.submit({"kind": "edit", "recipe": recipe, "artifact_name": name})

    def run(self, recipe: dict[str, Any], name: str) -> dict[str, Any]:
        response = self.submit(recipe, name)
        assert response.status_code == 202, response.text
        return self.wait(response.json()["id"])

    def wait(self, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            job: dict[str, Any] = self.api.client.get(
                f"/v1/jobs/{job_id}", headers=self.api.headers
            ).json()
            if JobState(job["state"]).is_terminal:
                return job
            assert time.monotonic() < deadline, f"job {job_id} stuck in {job['state']}"
            time.sleep(0.2)

    def get(self, path: str) -> Any:
        return self.api.client.get(path, headers=self.api.headers)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("edit-service")
    settings = Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp}/jobs.db",
        object_store_url=f"file://{tmp}/artifacts",
        broker_url=None,
        hf_endpoint=None,
        hf_token=None,
        bootstrap_api_key=None,
        bootstrap_key_file=None,
        allow_local_paths=True,  # the SmolLM2 fixture is a local folder
        worker_heartbeat_interval=1,
        worker_lost_after=60,
    )
    worker = EmbeddedWorker.from_settings(settings)
    client = TestClient(create_app(settings, queue=InProcessQueue(worker.submit)))
    client.__enter__()  # startup migrates the database
    worker.start()
    api = ApiHarness(client, settings, [], tmp)
    api.tenant, api.headers = api.new_tenant()
    corpus = write_text_corpus(tmp / "corpus.txt")
    api.publish("corpora", {"corpus.txt": corpus.read_bytes()})
    yield Service(api, worker)
    worker.stop(timeout=60)
    client.__exit__(None, None, None)


def _recipe(model: str, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "edit_method": "rome",
        "model": model,
        "requests": [
            {
                "prompt": PROMPT,
                "subject": SUBJECT,
                "target_new": NEW,
                "target_true": TRUE,
                "paraphrase_prompts": ["The capital city of Japan is"],
                "neighborhood_prompts": ["The capital of Germany is", "The capital of Italy is"],
            }
        ],
        "hyperparameters": {"layers": [5], "context_template_counts": [[3, 5]]},
        "covariance": {"source": "text", "paths": [CORPUS], "tokens": 2048},
    }
    for key, value in changes.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


# A gate no edit passes (any change has ‖ΔW‖/‖W‖ > 1e-9), after one optimisation step.
QUICK_TRIP = {
    "hyperparameters": {"layers": [5], "context_template_counts": [[3, 5]], "v_num_grad_steps": 1},
    "gate": {"max_relative_update_norm": 1e-9},
}


@pytest.fixture(scope="module")
def edit_job(service: Service, smollm2: Path) -> dict[str, Any]:
    return service.run(_recipe(str(smollm2)), "japan-paris")


@pytest.fixture(scope="module")
def gate_job(service: Service, smollm2: Path, edit_job: dict[str, Any]) -> dict[str, Any]:
    before = COMPUTED["layers"]
    job = service.run(_recipe(str(smollm2), **QUICK_TRIP), "japan-gate")
    job["covariances_computed"] = COMPUTED["layers"] - before
    return job


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _download(service: Service, name: str, version: int, dest: Path) -> dict[str, Any]:
    """Every file of a version through the API, each checked against the manifest."""
    manifest: dict[str, Any] = service.get(f"/v1/artifacts/{name}/versions/{version}").json()
    for entry in manifest["files"]:
        target = dest / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"/v1/artifacts/{name}/versions/{version}/files/{entry['path']}"
        with (
            service.api.client.stream("GET", url, headers=service.api.headers) as r,
            target.open("wb") as f,
        ):
            assert r.status_code == 200, url
            for chunk in r.iter_bytes():
                f.write(chunk)
        assert _sha256(target) == entry["sha256"], entry["path"]
        assert target.stat().st_size == entry["size"]
    return manifest


@torch.no_grad()
def _mean_log_prob(model: Any, tokenizer: Any, prompt: str, target: str) -> float:
    """Mean log P(target tokens | prompt) by one plain forward pass (no weightsmith code)."""
    p = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + " " + target)["input_ids"]
    assert full[: len(p)] == p
    logits = model(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
    return sum(float(logits[i - 1, full[i]]) for i in range(len(p), len(full))) / (
        len(full) - len(p)
    )


def test_an_edit_job_publishes_a_model_that_prefers_the_new_target(
    service: Service, edit_job: dict[str, Any], smollm2: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert edit_job["state"] == "succeeded", edit_job["error"]
    assert edit_job["artifact"]["uri"] == "artifact://japan-paris@1"
    manifest = _download(service, "japan-paris", 1, tmp_path / "edited")

    assert manifest["kind"] == "edit" and manifest["flagged"] is False
    gate = manifest["metrics"]["gate"]
    assert gate["passed"] is True and gate["failures"] == []
    assert gate["checks"] and all(
        c["value"] <= c["bound"] if c["kind"] == "max" else c["value"] >= c["bound"]
        for c in gate["checks"]
    )
    assert manifest["metrics"]["efficacy"] == 1.0
    assert manifest["artifact"]["job_id"] == edit_job["id"]
    assert [c["cache"] for c in manifest["covariance"]] == ["miss"]
    assert {"edit/factors.safetensors", "edit/original.safetensors"} <= {
        f["path"] for f in manifest["files"]
    }
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    scores = {}
    for label, folder in (("before", smollm2), ("after", tmp_path / "edited")):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        scores[label] = {t: _mean_log_prob(model, tokenizer, PROMPT, t) for t in (NEW, TRUE)}
    assert scores["before"][TRUE] > scores["before"][NEW]
    assert scores["after"][NEW] > scores["after"][TRUE]


def test_a_gate_failure_fails_the_job_with_its_metrics_and_publishes_nothing(
    service: Service, gate_job: dict[str, Any]
) -> None:
    assert gate_job["state"] == "failed"
    error = gate_job["error"]
    assert error["field"] == "gate"
    assert "safety gate" in error["message"] and "‖ΔW‖/‖W‖" in error["message"]
    assert "> 1e-09" in error["message"]
    metrics = error["metrics"]
    assert metrics["gate"]["passed"] is False
    ratio = metrics["relative_update_norm"]["5"]
    assert ratio > 1e-9 and f"{ratio:.4f}" in error["message"]
    assert "publish_flagged" in error["detail"] and "perplexity_ratio" in error["detail"]
    assert service.get("/v1/artifacts/japan-gate/versions").status_code == 404


def test_a_second_job_on_the_same_model_and_layer_reuses_the_cached_covariance(
    service: Service, edit_job: dict[str, Any], gate_job: dict[str, Any]
) -> None:
    assert gate_job["covariances_computed"] == 0
    objects = service.worker.object_store
    entries = [i.key for i in objects.list("_cache/covariance/") if i.key.endswith(".json")]
    assert len(entries) == 1  # one statistic, shared by both jobs
    provenance = json.loads(objects.get_bytes(entries[0]))
    manifest = service.get("/v1/artifacts/japan-paris/versions/1").json()
    assert provenance["created_at"] == manifest["covariance"][0]["created_at"]
    assert (provenance["layer"], provenance["tokens"]) == (5, 2048)
    assert provenance["corpus_source"] == "text" and CORPUS in provenance["corpus"]


def test_an_edited_artifact_is_the_input_of_a_later_edit_published_flagged(
    service: Service, edit_job: dict[str, Any], gate_job: dict[str, Any]
) -> None:
    recipe = _recipe("artifact://japan-paris", on_gate_failure="publish_flagged", **QUICK_TRIP)
    # the edited model already says Paris: move it on to London
    recipe["requests"][0].update(target_new="London", target_true=NEW, paraphrase_prompts=[])
    job = service.run(recipe, "japan-twice")

    assert job["state"] == "succeeded", job["error"]
    assert job["recipe"]["model"] == "artifact://japan-paris@1"  # pinned at submission
    manifest = service.get("/v1/artifacts/japan-twice/versions/1").json()
    assert manifest["flagged"] is True and manifest["metrics"]["gate"]["passed"] is False
    assert manifest["metrics"]["paraphrase"] is None  # nothing to measure: null, not NaN
    assert manifest["parents"][0]["pinned"] == "artifact://japan-paris@1"
    # the first edit changed layer 5's output projection only, which does not feed layer
    # 5's key: its C, keyed by the tensors that do, is the first edit's (docs/editing.md)
    (record,) = manifest["covariance"]
    first = service.get("/v1/artifacts/japan-paris/versions/1").json()["covariance"][0]
    assert record["cache"] == "hit" and record["key"] == first["key"]
    assert manifest["model_revision"] == f"artifact://{service.api.tenant}/japan-paris@1"


def test_a_missing_corpus_fails_the_job_naming_the_field(service: Service, smollm2: Path) -> None:
    recipe = _recipe(str(smollm2), covariance={"paths": ["artifact://corpora@1/wiki.txt"]})
    job = service.run(recipe, "japan-nocorpus")

    assert job["state"] == "failed"
    assert job["error"]["field"] == "covariance.paths[0]"
    assert "has no file 'wiki.txt'" in job["error"]["message"]


def test_an_unpinned_artifact_corpus_is_refused_at_submission(
    service: Service, smollm2: Path
) -> None:
    recipe = _recipe(str(smollm2), covariance={"paths": ["artifact://corpora/corpus.txt"]})
    response = service.submit(recipe, "japan-bad")

    assert response.status_code == 422
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert "needs a pinned version number" in response.text
    assert "covariance/paths/0" in response.text


def test_an_edited_artifact_is_an_input_of_a_later_merge(
    service: Service, edit_job: dict[str, Any], smollm2: Path, tmp_path: Path
) -> None:
    from safetensors import safe_open

    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": "artifact://japan-paris@1", "parameters": {"weight": 0.5}},
            {"model": str(smollm2), "parameters": {"weight": 0.5}},
        ],
        "seed": 1,
    }
    response = service.api.submit({"kind": "merge", "recipe": recipe, "artifact_name": "half"})
    assert response.status_code == 202, response.text
    job = service.wait(response.json()["id"])

    assert job["state"] == "succeeded", job["error"]
    manifest = service.get("/v1/artifacts/half/versions/1").json()
    assert "artifact://japan-paris@1" in [p["pinned"] for p in manifest["parents"]]
    name = "model.layers.5.mlp.down_proj.weight"
    edited_manifest = service.get("/v1/artifacts/japan-paris/versions/1").json()
    weights = {}
    for artifact, doc in (("half", manifest), ("japan-paris", edited_manifest)):
        for entry in doc["files"]:  # the tensor's shard: merges write their own sharding
            if "/" in entry["path"] or not entry["path"].endswith(".safetensors"):
                continue
            target = tmp_path / artifact / entry["path"]
            target.parent.mkdir(exist_ok=True)
            service.worker.object_store.download_file(
                f"{service.api.tenant}/{artifact}/v1/{entry['path']}",
                target,
                sha256=entry["sha256"],
            )
            with safe_open(str(target), "pt") as f:
                if name in f.keys():  # noqa: SIM118
                    weights[artifact] = f.get_tensor(name)
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as f:
        original = f.get_tensor(name)
    assert not torch.equal(weights["japan-paris"], original)
    expected = 0.5 * weights["japan-paris"] + 0.5 * original
    assert torch.allclose(weights["half"], expected, atol=1e-6)


def test_an_edit_job_reports_its_phases_and_stops_when_cancelled(
    service: Service, smollm2: Path, edit_job: dict[str, Any]
) -> None:
    response = service.submit(_recipe(str(smollm2)), "japan-cancelled")
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    phases = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not phases or phases[-1] not in ("templates", "covariance", "probe", "edit"):
        job = service.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] in ("queued", "running"), job
        phase = job["progress"]["phase"]
        if phase and phase.startswith("covariance:"):  # "covariance:{step} D/T tokens"
            assert re.fullmatch(r"covariance:(sampling|statistics) \d+/\d+ tokens", phase)
            phase = "covariance"
        if phase and phase not in phases:
            phases.append(phase)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancel = service.api.client.post(f"/v1/jobs/{job_id}/cancel", headers=service.api.headers)
    assert cancel.status_code in (200, 202), cancel.text

    job = service.wait(job_id)

    assert job["state"] == "cancelled"
    order = [
        *("starting", "resolve", "download", "fetch-corpus"),
        *("load", "templates", "covariance", "probe", "edit"),
    ]
    assert phases == sorted(phases, key=order.index)  # seen in order (fast ones may be missed)
    assert service.get("/v1/artifacts/japan-cancelled/versions").status_code == 404
