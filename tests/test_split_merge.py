"""A merge split into parts (workers/merge/parts.py, workers/split_merge.py): the same bytes
as one run, statistics combined exactly, the parts' job semantics in the job store, and
``parallelism`` validated. Without a broker: the job's worker runs every part itself (the
embedded worker's way); tests/test_split_merge_celery.py runs them on three Celery workers.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from infra.artifacts import download_artifact, list_versions
from infra.db.parts import PartStore
from infra.settings import Settings
from merging import statistics
from merging.statistics import combine_partials
from schemas.jobs import JobError, JobState
from schemas.recipe import MergeRecipe
from testbed.api import MERGE_RECIPE, merge_job
from tests.support.api import assert_problem
from tests.support.checkpoints import (
    build_many_tensor_family,
    huge_finetune,
    slow,
    tensors,
)
from tests.support.jobs import TENANT, InProcessJobs, in_process_jobs
from tests.support.split_outputs import family_recipe, same_output
from workers.merge.engine import MergeSession, run_merge
from workers.merge.parts import (
    pass_count,
    plan_parts,
    read_pass,
    run_merge_in_parts,
    statistics_from,
)
from workers.split_merge import parallelism_for
from workers.tensors.writer import TensorSpec, split_shards

# ---- the engine: parts in one process ---------------------------------------------------------


METHODS = [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.3, "scope": "global"}),
    ("pcb", {"density": 0.2}),
    ("dare_ties", {"density": 0.5}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05}),
]


@pytest.mark.parametrize(("method", "parameters"), METHODS, ids=[m for m, _ in METHODS])
def test_a_merge_in_parts_writes_the_same_files_as_one_run(
    llama_family: dict[str, Path], tmp_path: Path, method: str, parameters: dict[str, Any]
) -> None:
    r = MergeRecipe.model_validate(family_recipe(llama_family, method, **parameters))
    one = run_merge(r, tmp_path / "one")
    split = run_merge_in_parts(r, tmp_path / "three", 3)

    shards = [p for p in split.out_dir.iterdir() if p.name.startswith("model-")]
    assert len(shards) > 3  # the parts own several shards each
    same_output(one.out_dir, split.out_dir)


def test_each_part_owns_whole_shards_of_about_equal_size() -> None:
    specs = [TensorSpec(f"t{i}", torch.float32, (n,)) for i, n in enumerate([10, 10, 10, 30, 10])]
    layout = [[s] for s in specs]  # one tensor per shard: 40, 40, 40, 120, 40 bytes

    assert split_shards(layout, 1) == [(0, 5)]
    # 280 bytes in 2: the first part ends once it holds 140 (shards 0-3 hold 240)
    assert split_shards(layout, 2) == [(0, 4), (4, 5)]
    assert split_shards(layout, 3) == [(0, 3), (3, 4), (4, 5)]
    assert split_shards(layout, 5) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert split_shards(layout, 9) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]  # one per shard


def test_partials_combine_by_adding_counts_and_taking_maxima() -> None:
    a = {"0/high": torch.tensor([1, 0, 2]), "max/0": torch.tensor([0.5], dtype=torch.float64)}
    b = {"0/high": torch.tensor([0, 3, 1]), "max/0": torch.tensor([-1.0], dtype=torch.float64)}
    c = {"0/high": torch.tensor([4, 0, 0])}

    out = combine_partials([a, b, c])

    assert out["0/high"].tolist() == [5, 3, 3]
    assert out["max/0"].tolist() == [0.5]
    assert a["0/high"].tolist() == [1, 0, 2]  # the inputs are left alone


def _split_statistics(r: MergeRecipe, parts: int) -> dict[str, Any]:
    with MergeSession(r) as coordinator:
        ranges = plan_parts(coordinator, parts)
        combined: list[dict[str, torch.Tensor]] = []
        for index in range(pass_count(coordinator)):
            partials = []
            for shards in ranges:
                with MergeSession(r) as part:
                    partials.append(read_pass(part, index, shards, combined))
            combined.append(combine_partials(partials))
        return statistics_from(coordinator, combined)


def test_global_ties_threshold_from_parts_is_the_exact_kth_magnitude(
    llama_family: dict[str, Path],
) -> None:
    density = 0.3
    r = MergeRecipe.model_validate(
        family_recipe(llama_family, "ties", density=density, scope="global")
    )
    split = _split_statistics(r, 4)
    with MergeSession(r) as whole:
        single = whole.statistics()

    assert split == single  # bit for bit: floats compared with ==
    # independently: the k-th largest |τ| of each model over all its float tensors, sorted
    base = tensors(llama_family["base"])
    for i, name in enumerate(("ft1", "ft2", "ft3")):
        ft = tensors(llama_family[name])
        tau = torch.cat(
            [(ft[n].float() - base[n].float()).abs().reshape(-1) for n in base if n in ft]
        )
        k = max(1, int(density * tau.numel()))
        expected = float(torch.sort(tau, descending=True).values[k - 1])
        assert split["ties_threshold"][i] == expected


def test_pcb_statistics_from_parts_are_bit_identical_to_one_process(
    llama_family: dict[str, Path],
) -> None:
    r = MergeRecipe.model_validate(family_recipe(llama_family, "pcb", density=0.2))
    split = _split_statistics(r, 3)
    with MergeSession(r) as whole:
        single = whole.statistics()

    assert split["pcb_bounds"] == single["pcb_bounds"]
    assert all(math.isfinite(v) for b in split["pcb_bounds"].values() for v in b)


def test_parallelism_comes_from_the_recipe_or_the_operators_size_threshold() -> None:
    base = {"merge_method": "linear", "models": [{"model": "/a"}, {"model": "/b"}]}
    plain = MergeRecipe.model_validate(base)
    asked = MergeRecipe.model_validate({**base, "parallelism": 12})
    settings = Settings(merge_max_parallelism=8)
    auto = Settings(merge_max_parallelism=8, merge_parallel_above=1000)

    assert parallelism_for(plain, settings, 10**9) == 1
    assert parallelism_for(asked, settings, 10) == 8  # capped by the operator
    assert parallelism_for(plain, auto, 1000) == 1
    assert parallelism_for(plain, auto, 2500) == 3  # one part per 1000 bytes
    assert parallelism_for(plain, auto, 10**9) == 8
    assert "parallelism" not in asked.model_dump()  # not part of what the artifact records


# ---- the job: parts in the job store ----------------------------------------------------------


Service = InProcessJobs


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield from in_process_jobs(tmp_path)


def test_a_split_job_publishes_the_same_artifact_as_a_single_worker_job(
    service: Service, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    r = family_recipe(llama_family, "ties", density=0.4, scope="global")
    single = service.run(service.submit(r, "one"))
    split = service.run(service.submit({**r, "parallelism": 3}, "three"))

    assert (single.state, split.state) == (JobState.SUCCEEDED, JobState.SUCCEEDED), split.error
    a = download_artifact(service.objects, TENANT, "one", 1, tmp_path / "a")
    b = download_artifact(service.objects, TENANT, "three", 1, tmp_path / "b")
    same_output(a, b)
    # the parts' record: 2 statistics passes and the merge, 3 parts each, one attempt each
    rows = service.parts.parts(split.id)
    assert [(p.step, p.part) for p in rows] == [(s, i) for s in range(3) for i in range(3)]
    assert {(p.state, p.attempts) for p in rows} == {("done", 1)}
    view = split.to_view().progress
    assert view.tensors_done == view.tensors_total
    assert not list(service.objects.list("_parts/"))  # the work files are gone
    assert list(service.work_root.iterdir()) == []


def test_a_failing_part_fails_the_job_naming_the_tensor_and_publishes_nothing(
    service: Service, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    huge = huge_finetune(llama_family["ft2"], tmp_path / "huge")
    r = family_recipe(llama_family, "task_arithmetic")
    r["models"][1]["model"] = str(huge)
    r["output"]["dtype"] = "float16"
    job = service.run(service.submit({**r, "parallelism": 3}, "broken"))

    assert job.state == JobState.FAILED
    assert job.error["tensor"] is not None and job.error["field"] == "output.dtype"
    assert job.error["tensor"] in job.error["detail"]
    failed = [p for p in service.parts.parts(job.id) if p.state == "failed"]
    assert failed and failed[0].error["tensor"] == job.error["tensor"]
    assert list_versions(service.objects, TENANT, "broken") == []
    assert not list(service.objects.list("_parts/"))


def test_cancelling_a_split_job_stops_its_parts_and_publishes_nothing(
    service: Service, tmp_path: Path
) -> None:
    family = build_many_tensor_family(tmp_path / "many", layers=32)
    r = {**slow(family, 100), "parallelism": 3, "output": {"shard_size": 2_000_000}}
    job_id = service.submit(r, "gone")  # parts that run for seconds

    def cancel_mid_part() -> None:  # once the first part runs
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(p.state == "running" for p in service.parts.parts(job_id)):
                service.store.request_cancel(service.tenant_id, job_id)
                return
            time.sleep(0.005)

    canceller = threading.Thread(target=cancel_mid_part)
    canceller.start()
    job = service.run(job_id)
    canceller.join()

    assert job.state == JobState.CANCELLED, job.error
    rows = service.parts.parts(job_id)
    assert rows and not all(p.state == "done" for p in rows)  # stopped before the end
    assert list_versions(service.objects, TENANT, "gone") == []
    assert not list(service.objects.list("_parts/"))
    assert list(service.work_root.iterdir()) == []


# ---- the work files' sweep --------------------------------------------------------------------


def test_a_split_job_that_ends_deletes_the_work_files_of_its_earlier_attempts(
    service: Service, llama_family: dict[str, Path]
) -> None:
    job_id = service.submit(
        {**family_recipe(llama_family, "task_arithmetic"), "parallelism": 3}, "x"
    )
    # attempt 1's coordinator failed (transiently) before it could delete its work files
    assert service.store.claim(job_id, "crashed") is not None
    leftover = f"_parts/{job_id}/a1/parts/1/a1-0123abcd/model-00002-of-00016.safetensors"
    service.objects.put_bytes(leftover, b"half a shard")
    service.store.release_for_retry(job_id, "crashed", JobError(message="storage hiccup"))

    job = service.run(job_id)  # attempt 2

    assert (job.state, job.attempts) == (JobState.SUCCEEDED, 2), job.error
    assert not list(service.objects.list("_parts/"))


def test_a_plain_merge_leaves_other_jobs_work_files_alone(
    service: Service, llama_family: dict[str, Path]
) -> None:
    other = f"_parts/{'f' * 8}-0000-4000-8000-{'0' * 12}/a1/step0/part0.safetensors"
    service.objects.put_bytes(other, b"someone else's")
    job = service.run(service.submit(family_recipe(llama_family, "task_arithmetic"), "plain"))

    assert job.state == JobState.SUCCEEDED, job.error
    assert [i.key for i in service.objects.list("_parts/")] == [other]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_the_sweep_deletes_the_work_files_of_ended_or_unknown_jobs_once_old_enough(
    service: Service,
    llama_family: dict[str, Path],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    kind: str,
) -> None:
    from tests.support.stores import make_store
    from workers.split_merge import sweep_part_leftovers

    objects = make_store(kind, request, tmp_path)
    store = service.store
    r = family_recipe(llama_family, "task_arithmetic")
    queued = service.submit(r, "q")
    running = service.submit(r, "r")
    assert store.claim(running, "w") is not None
    failed = service.submit(r, "f")
    assert store.claim(failed, "w") is not None
    store.finish_failed(failed, JobError(message="broken"), worker_id="w")
    cancelled = service.submit(r, "c")
    store.request_cancel(service.tenant_id, cancelled)
    unknown = "0badc0de-0000-4000-8000-000000000000"
    for job_id in (queued, running, failed, cancelled, unknown):
        for key in ("a1/step0/part0.safetensors", "a2/parts/1/a1-00ff00ff/model.safetensors"):
            objects.put_bytes(f"_parts/{job_id}/{key}", job_id.encode())
    objects.put_bytes("acme/keep/versions/v1.claim", b"{}")  # not a work file

    def left() -> set[str]:
        return {i.key.split("/")[1] for i in objects.list("_parts/")}

    everything = {queued, running, failed, cancelled, unknown}
    # written just now: a part of an ended job may still be uploading
    assert sweep_part_leftovers(store, objects, older_than_s=3600) == []
    assert left() == everything

    later = datetime.now(UTC) + timedelta(hours=2)
    swept = sweep_part_leftovers(store, objects, older_than_s=3600, now=later)

    assert sorted(swept) == sorted([failed, cancelled, unknown])
    assert left() == {queued, running}  # a job that may still run keeps its files
    assert objects.exists("acme/keep/versions/v1.claim")
    assert sweep_part_leftovers(store, objects, older_than_s=3600, now=later) == []


def test_the_embedded_workers_housekeeping_sweeps_the_work_files(
    service: Service, llama_family: dict[str, Path]
) -> None:
    from workers.embedded import EmbeddedWorker

    settings = service.settings.model_copy(update={"merge_parts_sweep_after": 0})
    failed = service.submit(family_recipe(llama_family, "task_arithmetic"), "f")
    assert service.store.claim(failed, "w") is not None
    service.store.finish_failed(failed, JobError(message="broken"), worker_id="w")
    service.objects.put_bytes(f"_parts/{failed}/a1/step0/part2.safetensors", b"left over")

    worker = EmbeddedWorker(settings, store=service.store, object_store=service.objects)
    worker.start()  # its first housekeeping runs before it returns
    worker.stop(timeout=10)

    assert not list(service.objects.list("_parts/"))


# ---- the part rows' rules ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_a_part_is_claimed_once_taken_over_when_its_worker_is_lost_and_fenced(
    service: Service, llama_family: dict[str, Path]
) -> None:
    clock = Clock()
    parts = PartStore(service.store.engine, worker_lost_after=timedelta(seconds=3), clock=clock)
    job_id = service.submit(family_recipe(llama_family, "task_arithmetic"), "rules")
    job = service.store.claim(job_id, "coordinator")
    assert job is not None
    (key,) = parts.start_step(job_id, job.attempts, 0, [{"shards": [0, 1]}], max_attempts=2)

    first = parts.claim_part(key, "w1")
    assert first is not None and first.attempts == 1
    assert parts.claim_part(key, "w2") is None  # held by a live worker
    assert parts.retry_part_after(key) == 3.0

    clock.now += timedelta(seconds=4)  # w1's heartbeat is stale: w1 was killed
    second = parts.claim_part(key, "w2")
    assert second is not None and second.attempts == 2
    assert not parts.heartbeat_part(key, "w1")  # fenced: w1 learns it lost the part
    assert not parts.finish_part(key, "w1", {"files": {}})
    assert parts.finish_part(key, "w2", {"files": {"x": 1}})
    assert parts.claim_part(key, "w3") is None
    assert parts.retry_part_after(key) is None  # done: a redelivered message does nothing
    (row,) = parts.parts(job_id)
    assert (row.state, row.attempts, row.worker_id, row.result) == (
        "done",
        2,
        "w2",
        {"files": {"x": 1}},
    )


def test_a_part_whose_workers_keep_dying_fails_after_its_attempts(
    service: Service, llama_family: dict[str, Path]
) -> None:
    clock = Clock()
    parts = PartStore(service.store.engine, worker_lost_after=timedelta(seconds=3), clock=clock)
    job_id = service.submit(family_recipe(llama_family, "task_arithmetic"), "dying")
    job = service.store.claim(job_id, "coordinator")
    assert job is not None
    (key,) = parts.start_step(job_id, job.attempts, 0, [{}], max_attempts=2)
    for worker in ("w1", "w2"):
        assert parts.claim_part(key, worker) is not None
        clock.now += timedelta(seconds=4)

    assert parts.claim_part(key, "w3") is None
    (row,) = parts.parts(job_id)
    assert row.state == "failed" and "gave up after 2 attempts" in row.error["message"]


def test_a_new_attempt_of_the_job_fences_off_the_parts_of_the_old_one(
    service: Service, llama_family: dict[str, Path]
) -> None:
    parts = service.parts
    job_id = service.submit(family_recipe(llama_family, "task_arithmetic"), "fenced")
    job = service.store.claim(job_id, "coordinator-1")
    assert job is not None
    (old,) = parts.start_step(job_id, job.attempts, 0, [{}], max_attempts=3)
    assert parts.claim_part(old, "w1") is not None

    # the job's worker is lost; a new attempt (2) starts its parts over
    service.store.release_for_retry(job_id, "coordinator-1", JobError(message="lost"))
    again = service.store.claim(job_id, "coordinator-2")
    assert again is not None and again.attempts == 2
    (new,) = parts.start_step(job_id, again.attempts, 0, [{}], max_attempts=3)

    assert not parts.finish_part(old, "w1", {})  # the old attempt's part is gone
    assert parts.claim_part(old, "w9") is None and parts.retry_part_after(old) is None
    assert parts.part_should_stop(old) and not parts.part_should_stop(new)
    assert parts.claim_part(new, "w1") is not None


# ---- parallelism in the recipe ----------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 65, 2.5, "three", True])
def test_a_bad_parallelism_is_a_422_naming_the_field(make_api: Any, value: Any) -> None:
    api = make_api()
    body = assert_problem(api.submit(merge_job({**MERGE_RECIPE, "parallelism": value})), 422)
    assert [e["pointer"] for e in body["errors"]] == ["/recipe/parallelism"]
    assert api.enqueued == []


def test_a_parallelism_above_the_operators_maximum_is_a_422_saying_what_is_allowed(
    make_api: Any,
) -> None:
    api = make_api(merge_max_parallelism=4)
    body = assert_problem(api.submit(merge_job({**MERGE_RECIPE, "parallelism": 5})), 422)
    assert [e["pointer"] for e in body["errors"]] == ["/recipe/parallelism"]
    assert "at most 4" in body["detail"]
    assert api.enqueued == []


def test_pcb_statistics_when_the_sampled_window_misses_fall_back_to_radix_passes(
    llama_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process takes PCB's two-pass shortcut (clip bounds from the extremes, the
    quantile from a window guessed from a sample); a window that misses falls back to the
    radix passes. Both give what the parts' four radix passes give, bit for bit."""
    from merging.methods import pcb

    r = MergeRecipe.model_validate(family_recipe(llama_family, "pcb", density=0.2))
    split = _split_statistics(r, 2)
    took: list[str] = []
    shortcut = pcb.PcbGlobal._in_two_passes
    radix = pcb.PcbGlobal._quantiles

    def spy_shortcut(self, *a, **k):  # type: ignore[no-untyped-def]
        took.append("shortcut")
        return shortcut(self, *a, **k)

    def spy_radix(self, *a, **k):  # type: ignore[no-untyped-def]
        took.append("radix")
        return radix(self, *a, **k)

    monkeypatch.setattr(pcb.PcbGlobal, "_in_two_passes", spy_shortcut)
    monkeypatch.setattr(pcb.PcbGlobal, "_quantiles", spy_radix)
    with MergeSession(r) as whole:
        hit = whole.statistics()
    assert took == ["shortcut"] and hit["pcb_bounds"] == split["pcb_bounds"]

    took.clear()  # a window far above every B: nothing below k is in it
    monkeypatch.setattr(statistics, "quantile_window", lambda sample, q, spread: (1e30, 2e30))
    with MergeSession(r) as whole:
        missed = whole.statistics()
    assert took == ["shortcut", "radix"] and missed["pcb_bounds"] == split["pcb_bounds"]


def test_global_ties_threshold_when_the_sampled_window_misses_falls_back_to_radix(
    llama_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process finds global TIES' thresholds in one pass (a window guessed from a
    sample of stretches spread over the model); a window that misses falls back to the
    two radix passes. Both equal the parts' radix passes, bit for bit."""
    from merging.methods import task_vectors

    r = MergeRecipe.model_validate(family_recipe(llama_family, "ties", density=0.3, scope="global"))
    split = _split_statistics(r, 2)
    took: list[object] = []
    one_pass = task_vectors.TiesGlobal._in_one_pass

    def spy(self, *a, **k):  # type: ignore[no-untyped-def]
        found = one_pass(self, *a, **k)
        took.append(found is not None)
        return found

    monkeypatch.setattr(task_vectors.TiesGlobal, "_in_one_pass", spy)
    with MergeSession(r) as whole:
        hit = whole.statistics()
    assert took == [True] and hit == split

    took.clear()  # a window below every |τ|: the rank is above it
    monkeypatch.setattr(statistics, "quantile_window", lambda sample, q, spread: (-2.0, -1.0))
    with MergeSession(r) as whole:
        missed = whole.statistics()
    assert took == [False] and missed == split
