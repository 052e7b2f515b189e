"""A job's life on a worker (workers.runner.run_job), without a broker: SQLite job store,
local object store and tiny real checkpoints."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from infra.artifacts import download_artifact, list_versions
from schemas.jobs import JobState
from tests.support.checkpoints import build_many_tensor_family, huge_finetune, linear, tensors, ties
from tests.support.jobs import TENANT, InProcessJobs, in_process_jobs
from workers.runner import RetryLater

Service = InProcessJobs


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield from in_process_jobs(tmp_path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_successful_job_publishes_a_verified_artifact_that_loads(
    service: Service, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    job_id = service.submit(linear(llama_family["ft1"], llama_family["ft2"]))
    service.run(job_id)

    job = service.job(job_id)
    assert job.state == JobState.SUCCEEDED
    view = job.to_view()
    assert view.artifact is not None and view.artifact.version == 1
    assert view.artifact.uri == "artifact://soup@1"
    assert view.progress.tensors_done == view.progress.tensors_total > 0
    assert [v.version for v in list_versions(service.objects, TENANT, "soup")] == [1]

    out = download_artifact(service.objects, TENANT, "soup", 1, tmp_path / "dl")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifact"]["job_id"] == job_id
    files = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert files and all(sha256(out / path) == digest for path, digest in files.items())

    merged = tensors(out)
    a = tensors(llama_family["ft1"])
    b = tensors(llama_family["ft2"])
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], 0.5 * a[name] + 0.5 * b[name])

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 4
    assert list(service.work_root.iterdir()) == []  # the work directory is gone


def test_the_manifest_timings_count_the_whole_attempt_downloads_included(
    service: Service, llama_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from infra.artifacts import read_manifest
    from workers import runner

    fetch = runner.resolve_inputs

    def slow_fetch(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)  # a download that takes this long
        return fetch(*args, **kwargs)

    monkeypatch.setattr(runner, "resolve_inputs", slow_fetch)
    job_id = service.submit(linear(llama_family["ft1"], llama_family["ft2"]))
    service.run(job_id)

    assert service.job(job_id).state == JobState.SUCCEEDED
    timings = read_manifest(service.objects, TENANT, "soup", 1)["timings"]
    assert timings["resolve_s"] >= 0.5  # resolving and fetching the inputs
    assert timings["total_s"] >= timings["resolve_s"] + timings["merge_s"]


def test_a_running_job_says_what_it_does_from_the_start_inputs_and_their_bytes_included(
    service: Service, llama_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[dict[str, Any]] = []
    update = service.store.update_progress

    def recorded(job_id: str, worker_id: str, **values: Any) -> bool:
        writes.append({k: v for k, v in values.items() if v is not None})
        return update(job_id, worker_id, **values)

    monkeypatch.setattr(service.store, "update_progress", recorded)
    job_id = service.submit(linear(llama_family["ft1"], llama_family["ft2"]))
    service.run(job_id)

    phases = [w["phase"] for w in writes if "phase" in w]
    assert phases[0] == "resolve" and "download" in phases and phases[-1] == "publish"
    downloads = [w["bytes_done"] for w in writes if w.get("phase") == "download"]
    sizes = [sum(f.stat().st_size for f in llama_family[n].iterdir()) for n in ("ft1", "ft2")]
    # 0 before the first input, then after each: the inputs' files (weights, config, …)
    assert downloads[0] == 0 and downloads == sorted(downloads)
    assert 0 < downloads[-1] <= sum(sizes)


def test_a_corrupt_input_fails_the_job_with_what_and_where(
    service: Service, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(llama_family["ft2"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    job_id = service.submit(linear(llama_family["ft1"], broken))
    service.run(job_id)

    job = service.job(job_id)
    assert job.state == JobState.FAILED
    error = job.to_view().error
    assert error is not None
    assert error.model == str(broken)
    assert "model.safetensors" in (error.detail or "")
    assert list_versions(service.objects, TENANT, "soup") == []
    assert list(service.work_root.iterdir()) == []


def test_local_paths_are_refused_unless_the_operator_allows_them(
    service: Service, llama_family: dict[str, Path]
) -> None:
    service.settings = service.settings.model_copy(update={"allow_local_paths": False})
    job_id = service.submit(linear(llama_family["ft1"], llama_family["ft2"]))
    service.run(job_id)

    error = service.job(job_id).to_view().error
    assert error is not None and "WEIGHTSMITH_ALLOW_LOCAL_PATHS" in error.message


@pytest.fixture
def slow_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """20 ms at each of the engine's checks between tensors, so a merge of a many-tensor
    family takes seconds on any machine (a fast one merged it under a second, before a
    cancel or a 1 s time limit could act)."""
    from workers import watch

    should_stop = watch.JobWatch.should_stop

    def slow_should_stop(self: Any) -> bool:
        time.sleep(0.02)
        return should_stop(self)

    monkeypatch.setattr(watch.JobWatch, "should_stop", slow_should_stop)


def test_cancel_while_running_ends_cancelled_and_publishes_nothing(
    service: Service, tmp_path: Path, slow_merge: None
) -> None:
    family = build_many_tensor_family(tmp_path / "many", layers=32)
    job_id = service.submit(ties(family))
    worker = threading.Thread(target=service.run, args=(job_id,))
    worker.start()
    deadline = time.monotonic() + 30
    while service.job(job_id).phase != "merge":
        assert time.monotonic() < deadline, "the merge never started"
        time.sleep(0.02)
    cancelled = service.store.request_cancel(service.tenant_id, job_id)
    assert cancelled is not None and cancelled.state == JobState.RUNNING
    worker.join(timeout=30)

    job = service.job(job_id)
    assert job.state == JobState.CANCELLED
    assert job.tensors_done < (job.tensors_total or 0)
    assert list_versions(service.objects, TENANT, "soup") == []
    assert not list(service.objects.list(f"{TENANT}/"))  # not even a claimed version
    assert list(service.work_root.iterdir()) == []


def test_a_redelivered_message_for_a_finished_job_does_nothing(
    service: Service, llama_family: dict[str, Path]
) -> None:
    job_id = service.submit(linear(llama_family["ft1"], llama_family["ft2"]))
    service.run(job_id, worker_id="w1")
    before = service.job(job_id)

    service.run(job_id, worker_id="w2")

    after = service.job(job_id)
    assert (after.state, after.attempts, after.worker_id) == (JobState.SUCCEEDED, 1, "w1")
    assert after.finished_at == before.finished_at
    assert [v.version for v in list_versions(service.objects, TENANT, "soup")] == [1]


def test_a_message_for_a_job_running_elsewhere_is_retried_later(
    service: Service, llama_family: dict[str, Path]
) -> None:
    job_id = service.submit(linear(llama_family["ft1"], llama_family["ft2"]))
    assert service.store.claim(job_id, "other-worker") is not None

    with pytest.raises(RetryLater) as retry:
        service.run(job_id, worker_id="w2")

    assert 0 < retry.value.delay_s <= service.settings.worker_lost_after
    job = service.job(job_id)
    assert (job.state, job.attempts, job.worker_id) == (JobState.RUNNING, 1, "other-worker")


def test_a_job_whose_worker_was_lost_is_taken_over_and_completed_once(
    service: Service, llama_family: dict[str, Path]
) -> None:
    job_id = service.submit(linear(llama_family["ft1"], llama_family["ft2"]))
    assert service.store.claim(job_id, "dead-worker") is not None
    time.sleep(service.settings.worker_lost_after + 0.2)  # its heartbeat goes stale

    service.run(job_id, worker_id="w2")

    job = service.job(job_id)
    assert (job.state, job.attempts, job.worker_id) == (JobState.SUCCEEDED, 2, "w2")
    assert [v.version for v in list_versions(service.objects, TENANT, "soup")] == [1]


def test_an_artifact_can_be_the_input_of_a_later_merge(
    service: Service, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    first = service.submit(linear(llama_family["ft1"], llama_family["ft2"]), name="soup")
    service.run(first)
    second = service.submit(linear("artifact://soup@1", llama_family["ft3"]), name="soup2")
    service.run(second)

    job = service.job(second)
    assert job.state == JobState.SUCCEEDED, job.error
    out = download_artifact(service.objects, TENANT, "soup2", 1, tmp_path / "dl")
    manifest = json.loads((out / "manifest.json").read_text())
    assert "artifact://soup@1" in json.dumps(manifest["parents"])

    merged = tensors(out)
    a = tensors(llama_family["ft1"])
    b = tensors(llama_family["ft2"])
    c = tensors(llama_family["ft3"])
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(merged[name], 0.5 * (0.5 * a[name] + 0.5 * b[name]) + 0.5 * c[name])


def test_an_unknown_artifact_input_fails_the_job(
    service: Service, llama_family: dict[str, Path]
) -> None:
    job_id = service.submit(linear("artifact://nothing@3", llama_family["ft1"]))
    service.run(job_id)

    error = service.job(job_id).to_view().error
    assert error is not None
    assert error.model == "artifact://nothing@3"
    assert "nothing" in error.message


def test_a_job_past_its_time_limit_stops_and_fails_cleanly(
    service: Service, tmp_path: Path, slow_merge: None
) -> None:
    service.settings = service.settings.model_copy(update={"job_hard_time_limit": 1})
    family = build_many_tensor_family(tmp_path / "many", layers=48)
    job_id = service.submit(ties(family))

    service.run(job_id)

    job = service.job(job_id)
    assert job.state == JobState.FAILED
    assert "time limit (1 s" in job.error["message"]
    assert list_versions(service.objects, TENANT, "soup") == []
    assert list(service.work_root.iterdir()) == []


def test_s3_inputs_are_fetched_and_the_artifact_is_published_to_s3(
    service: Service, llama_family: dict[str, Path], s3_server: Any, tmp_path: Path
) -> None:
    from infra.db.tenants import TenantStore
    from infra.secrets import SecretBox
    from infra.storage import open_store
    from infra.storage.s3 import S3ObjectStore

    run_prefix = f"runner-{secrets.token_hex(4)}"
    inputs = S3ObjectStore(
        "runner-inputs",
        endpoint_url=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        create_bucket=True,
    )
    for f in llama_family["ft1"].iterdir():
        inputs.put_file(f"{run_prefix}/ft1/{f.name}", f)
    s3_server.store(prefix=run_prefix)  # makes the artifact bucket
    service.settings = service.settings.model_copy(
        update={"object_store_url": s3_server.url(f"{run_prefix}/artifacts")}
    )
    service.objects = open_store(service.settings.object_store_url)  # type: ignore[assignment]
    # the tenant reads its inputs through a grant, with the grant's own credentials
    TenantStore(service.store.engine, SecretBox.from_settings(service.settings)).grant_s3(
        TENANT,
        f"s3://runner-inputs/{run_prefix}/",
        credentials="keys",
        endpoint=s3_server.endpoint,
        access_key_id=s3_server.access_key,
        secret_access_key=s3_server.secret_key,
    )
    source = f"s3://runner-inputs/{run_prefix}/ft1"
    job_id = service.submit(linear(source, llama_family["ft2"]))

    service.run(job_id)

    job = service.job(job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    out = download_artifact(service.objects, TENANT, "soup", 1, tmp_path / "dl")
    merged, a, b = tensors(out), tensors(llama_family["ft1"]), tensors(llama_family["ft2"])
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name], 0.5 * a[name] + 0.5 * b[name])


def test_an_unreachable_source_is_retried_then_fails_on_the_last_attempt(
    service: Service, llama_family: dict[str, Path]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    service.settings = service.settings.model_copy(
        update={"hf_endpoint": f"http://127.0.0.1:{closed_port}", "max_attempts": 2}
    )
    service.store.max_attempts = 2
    job_id = service.submit(linear("org/model@" + "a" * 40, llama_family["ft1"]))

    with pytest.raises(RetryLater) as retry:
        service.run(job_id, worker_id="w1")

    # attempt 1 gave the job back to the queue, saying why, and asks for a retry after the
    # backoff of a first attempt: one heartbeat interval, not a lost worker's timeout
    assert retry.value.delay_s == service.settings.worker_heartbeat_interval
    job = service.job(job_id)
    assert (job.state, job.phase, job.attempts, job.worker_id) == ("queued", "retrying", 1, None)
    assert job.error["model"] == "org/model@" + "a" * 40
    service.run(job_id, worker_id="w2")

    job = service.job(job_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 2)
    assert job.error["model"] == "org/model@" + "a" * 40
    assert f"127.0.0.1:{closed_port}" in job.error["detail"]


# ---- permanent failures fail at once ----------------------------------------------------------


def test_a_merge_that_overflows_fails_on_its_first_attempt_naming_the_tensor(
    service: Service, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    # The attack: an overflow (torch's RuntimeError, or ±inf) used to be retried as
    # transient for ten minutes. Weights of 1e300 are refused at submission now; values that
    # overflow only together with the data still reach the engine.
    huge = huge_finetune(llama_family["ft1"], tmp_path / "huge")
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama_family["base"]),
        "models": [
            {"model": str(huge), "parameters": {"weight": 5.0}},
            {"model": str(llama_family["ft2"]), "parameters": {"weight": 1.0}},
        ],
        "parameters": {"normalize": False},
        "seed": 1,
    }
    job_id = service.submit(recipe)

    service.run(job_id)  # no RetryLater: the outcome is recorded now

    job = service.job(job_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
    error = job.error
    assert error["tensor"] in tensors(llama_family["ft1"])
    assert "overflowed float32" in error["message"], error
    assert list(service.objects.list(f"{TENANT}/")) == []  # nothing published, nothing claimed
    assert list(service.work_root.iterdir()) == []


def test_a_module_missing_from_the_worker_fails_at_once_naming_it(
    service: Service, llama_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    # As on a worker image built without it: importing the merge engine fails.
    monkeypatch.setitem(sys.modules, "workers.merge.engine", None)
    job_id = service.submit(linear(llama_family["ft1"], llama_family["ft2"]))

    service.run(job_id)

    job = service.job(job_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
    message = job.error["message"]
    assert "'workers.merge.engine'" in message and "ModuleNotFoundError" in message
    assert "install" in message


@pytest.mark.parametrize("exc", [TypeError, KeyError, AttributeError, AssertionError, ValueError])
def test_a_programming_error_fails_at_once_naming_class_and_tensor_but_no_secret(
    service: Service,
    llama_family: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    exc: type[Exception],
) -> None:
    from pydantic import SecretStr

    from merging import METHODS

    token = "hf_" + secrets.token_hex(16)
    service.settings = service.settings.model_copy(update={"hf_token": SecretStr(token)})
    broken = "model.layers.1.mlp.up_proj.weight"
    method = METHODS["linear"]
    merge = method.merge

    def buggy(x: Any) -> Any:
        if x.name == broken:
            raise exc(f"{token} at {service.work_root}/secret/path")
        return merge(x)

    monkeypatch.setattr(method, "merge", buggy)
    job_id = service.submit(linear(llama_family["ft1"], llama_family["ft2"]))

    service.run(job_id)

    job = service.job(job_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
    assert job.error["tensor"] == broken
    assert f"failed with {exc.__name__}" in job.error["detail"]
    assert token not in json.dumps(job.error) and "secret/path" not in json.dumps(job.error)
    assert list(service.objects.list(f"{TENANT}/")) == []


# ---- a crash while publishing or recording: still one version --------------------------------


def test_a_job_whose_success_could_not_be_recorded_is_retried_into_the_same_version(
    service: Service, llama_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    real = service.store.finish_succeeded
    calls = {"n": 0}

    def database_gone_once(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("UPDATE jobs", {}, ConnectionError("server closed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(service.store, "finish_succeeded", database_gone_once)
    job_id = service.submit(linear(llama_family["ft1"], llama_family["ft2"]))

    with pytest.raises(RetryLater):
        service.run(job_id, worker_id="w1")  # published v1, then the database failed
    waiting = service.job(job_id)
    assert (waiting.state, waiting.phase) == (JobState.QUEUED, "retrying")
    assert waiting.error["message"].startswith("attempt 1 failed with OperationalError")
    service.run(job_id, worker_id="w2")  # the retry merges again, then finds its version

    job = service.job(job_id)
    assert (job.state, job.attempts, job.artifact_version) == (JobState.SUCCEEDED, 2, 1)
    assert [v.version for v in list_versions(service.objects, TENANT, "soup")] == [1]
    claims = list(service.objects.list(f"{TENANT}/soup/versions/"))
    assert [c.key for c in claims] == [f"{TENANT}/soup/versions/v1.claim"]


def test_a_manifest_stored_but_reported_failed_is_not_published_twice(
    service: Service, llama_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from infra.storage import StorageUnavailable

    real = service.objects.put_bytes
    lost = {"done": False}

    def reply_lost_after_the_manifest(key: str, data: bytes, *, if_absent: bool = False) -> Any:
        info = real(key, data, if_absent=if_absent)
        if key.endswith("/manifest.json") and not lost["done"]:
            lost["done"] = True
            raise StorageUnavailable("connection reset while reading the reply")
        return info

    monkeypatch.setattr(service.objects, "put_bytes", reply_lost_after_the_manifest)
    job_id = service.submit(linear(llama_family["ft1"], llama_family["ft3"]))

    with pytest.raises(RetryLater):
        service.run(job_id, worker_id="w1")
    service.run(job_id, worker_id="w2")

    job = service.job(job_id)
    assert (job.state, job.attempts, job.artifact_version) == (JobState.SUCCEEDED, 2, 1)
    assert [v.version for v in list_versions(service.objects, TENANT, "soup")] == [1]
