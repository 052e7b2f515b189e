"""One job's life on a worker: claim, fetch inputs, merge or edit, publish, record the outcome.

:func:`run_job` is what the Celery task (``workers.tasks``) and the embedded worker
(``workers.embedded``) call with a job id; it needs no broker, so every rule here is tested
directly. The job store is the source of truth:

- **Claim.** ``JobStore.claim`` moves the job to ``running`` and counts the attempt. A
  redelivered message for a finished job, or an unknown one, does nothing. A message for a job
  that still runs under a worker not yet presumed lost raises :class:`RetryLater`: the caller
  retries the message after that delay, by which time the job either finished (nothing to do)
  or its worker's heartbeat went stale (this attempt takes it over).
- **Heartbeat and fencing.** A background thread writes a heartbeat every
  ``worker_heartbeat_interval``; progress is written at most about once a second. When the
  store answers False (the job was taken over by another worker, or finished), the merge stops
  at the next tensor and nothing more is written or published.
- **Cancel** is cooperative: the engine checks the job's cancel flag between tensors.
- **Edits** (``kind: edit``) resolve the recipe's model like a merge's inputs, fetch the
  covariance corpus (s3://, artifact://, local path where allowed), run ``workers.edit`` with
  the covariance cache in the object store (shared by all jobs: docs/editing.md) and publish
  the edited checkpoint the same way. A safety-gate failure fails the job with the metrics in
  its error and publishes nothing, unless the recipe says ``on_gate_failure: publish_flagged``.
- **LoRA extractions** (``kind: extract_lora``) resolve the base and the fine-tune like a
  merge's inputs and run ``workers.extract`` (one tensor of each at a time, cancel checked
  between tensors); the adapter folder is published the same way.
- **MoE assemblies** (``kind: moe``) resolve the base and the experts the same way and run
  ``workers.moe`` (the routers from the prompts, then one tensor at a time, cancel checked
  between tensors); the Mixtral checkpoint is published the same way.
- **Outcome.** Only what is known to be transient is retried (``workers.errors.is_transient``:
  an unreachable or failing source, the Hub, the object store, the database, the network, no
  memory or disk left): the job goes back to ``queued`` with the attempt's error and
  :class:`RetryLater` asks for it again after a backoff (the heartbeat interval, doubled per
  attempt, at most ``worker_lost_after``), until the attempts are used up. Everything else
  fails the job on its first attempt with a message naming the cause: bad input
  (``InputError`` and other ``WeightsmithError``, what was wrong and where), an overflow
  (the merge engine names the tensor, the model and the parameter), a module missing from the
  worker (its name), any other exception (its class, and the tensor when known): running the
  same code on the same input again would fail the same way. Success publishes the output as
  the next artifact version (exactly one per job, whatever crashed before: see
  ``infra.artifacts``) and records it.

The job acts for its tenant only (service.tenancy): Hub requests use the tenant's own token (or
the service's where the operator granted it, else none), ``s3://`` inputs are read with the
credentials of the tenant's grant covering them, local paths only where allowed. The token
goes to the Hub client only, never into the job record, an error message or a log line.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.artifacts import (
    ArtifactError,
    compute_recipe_hash,
    publish_artifact,
)
from infra.logging import log_context
from infra.storage import (
    ObjectStore,
)
from schemas.edit_recipe import EditRecipe
from schemas.jobs import RECIPE_TYPES, ArtifactRef, JobError, JobKind, JobState
from schemas.lora_recipe import ExtractLoraRecipe
from schemas.moe_recipe import MoeRecipe
from schemas.recipe import MergeRecipe
from schemas.references import ReferenceError_, ReferenceKind, parse_reference
from schemas.tenants import TenantAccess
from service.reuse import reusable_recipe_hash
from workers.inputs import fetch_corpus, resolve_inputs, source_settings, tenant_access
from workers.watch import JobWatch

if TYPE_CHECKING:
    from infra.db import Job, JobStore
    from infra.db.parts import PartKey
    from infra.settings import Settings
    from workers.edit.engine import EditGateError
    from workers.sources import ResolvedModel, SourceSettings

log = logging.getLogger("weightsmith.runner")

SendPart = Callable[["PartKey"], None]

# where a worker's device comes from (the embedded worker; a Celery worker's gpu queue)
DEVICE_SETTING = "WEIGHTSMITH_WORKER_DEVICE"


class RetryLater(Exception):
    """Run this job's message again after ``delay_s`` seconds (nothing was recorded)."""

    def __init__(self, job_id: str, delay_s: float, reason: str) -> None:
        super().__init__(f"job {job_id}: {reason}; retry in {delay_s:.1f} s")
        self.job_id = job_id
        self.delay_s = delay_s
        self.reason = reason


class _LostJob(Exception):
    """The store says this worker no longer owns the job: stop without writing anything."""


def run_job(
    job_id: str,
    *,
    store: JobStore,
    settings: Settings,
    object_store: ObjectStore,
    worker_id: str,
    device: str = "cpu",
    work_root: Path | None = None,
    send_part: SendPart | None = None,
) -> None:
    """Run job ``job_id`` to its end, or do nothing if it is not this call's to run.

    ``send_part``: how a merge split into parts (workers.split_merge) asks other workers for
    its parts (the Celery task sends them to its own queue); None: this worker runs them all.

    ``device``: where the job computes (``WEIGHTSMITH_WORKER_DEVICE`` for the embedded
    worker and a Celery worker's gpu queue; ``workers.devices``); a device this machine does
    not have fails the job before any work, naming the setting.

    Raises :class:`RetryLater` when the message should be handled again later; every other
    outcome is recorded in the job store. ``work_root`` is where the per-job work directory
    (downloaded inputs, merge output) is made; it is removed when the job ends, however it ends.
    """
    with log_context(job_id=job_id):  # every log line until it returns names the job
        job = store.claim(job_id, worker_id)
        if job is None:
            delay = store.retry_claim_after(job_id)
            if delay is None:
                log.info("job %s: finished or unknown, message ignored", job_id)
                return
            raise RetryLater(job_id, delay, "still running under another worker")
        log.info("job %s: attempt %d/%d on %s", job_id, job.attempts, job.max_attempts, worker_id)

        watch = JobWatch(
            store,
            job_id,
            worker_id,
            settings.worker_heartbeat_interval,
            time_limit_s=soft_time_limit(settings),
        )
        work = Path(tempfile.mkdtemp(prefix=f"weightsmith-job-{job_id}-", dir=work_root))
        watch.start()
        try:
            _run_claimed(
                job,
                store=store,
                settings=settings,
                object_store=object_store,
                watch=watch,
                work=work,
                device=device,
                send_part=send_part,
            )
        except _LostJob:
            log.warning("job %s: taken over by another worker; this attempt stops", job_id)
        except RetryLater:
            raise
        except Exception as e:
            watch.stop()
            if watch.lost:  # not ours any more: whoever holds the job records its outcome
                log.warning("job %s: attempt failed (%s) after it was taken over", job_id, e)
                return
            _failed_attempt(job, store, settings, worker_id, e)
        finally:
            watch.stop()
            shutil.rmtree(work, ignore_errors=True)
            if job.kind == JobKind.MERGE.value:
                from workers.split_merge import remove_ended_job_work

                # a split merge that ended: its parts' work files go, every attempt's
                remove_ended_job_work(store, object_store, job_id)


def _run_claimed(
    job: Job,
    *,
    store: JobStore,
    settings: Settings,
    object_store: ObjectStore,
    watch: JobWatch,
    work: Path,
    device: str,
    send_part: SendPart | None = None,
) -> None:
    from workers.devices import resolve_device
    from workers.edit.engine import EditGateError
    from workers.errors import CancelledError

    try:
        # the worker's device (WEIGHTSMITH_WORKER_DEVICE), checked before any work
        compute = str(resolve_device(device, field=DEVICE_SETTING))
        access = tenant_access(store, settings, job.tenant_id)
        tenant = access.name
        recipe = _parse_recipe(job)
        # an edit loads its model with transformers and an extraction reads safetensors
        # only: never pickle weights
        allow_pickle = isinstance(recipe, MergeRecipe) and recipe.allow_pickle
        sources = source_settings(settings, access, allow_pickle=allow_pickle)
        watch.report_phase("resolve")
        watch.check()
        resolved = resolve_inputs(recipe, sources, settings, object_store, access, work, watch)
        if isinstance(recipe, EditRecipe):
            result: Any = _edit(
                recipe, work, settings, object_store, access, resolved, watch, compute
            )
        elif isinstance(recipe, MergeRecipe):
            from workers.split_merge import run_merge_job

            # in one piece, or split into parts run by many workers (docs/recipes.md)
            result = run_merge_job(
                job,
                recipe,
                work / "out",
                sources=sources,
                resolved=resolved,
                device=compute,
                watch=watch,
                store=store,
                settings=settings,
                object_store=object_store,
                send_part=send_part,
            )
        else:
            result = _build(recipe, work / "out", sources, resolved, compute, watch)
    except CancelledError:
        if watch.lost:
            raise _LostJob from None
        if watch.timed_out:
            message = (
                f"the job ran longer than its time limit ({settings.job_hard_time_limit} s, "
                "WEIGHTSMITH_JOB_HARD_TIME_LIMIT) and was stopped; nothing was published"
            )
            error = JobError(message=message, detail=message)
            store.finish_failed(job.id, error, worker_id=watch.worker_id)
            log.warning("job %s: %s", job.id, message)
            return
        store.finish_cancelled(job.id, worker_id=watch.worker_id)
        log.info("job %s: cancelled, nothing published", job.id)
        return
    except EditGateError as e:
        if watch.lost:
            raise _LostJob from None
        store.finish_failed(job.id, _gate_failure(e), worker_id=watch.worker_id)
        log.info("job %s: the edit failed its safety gate; nothing published", job.id)
        return
    # Any other exception goes to run_job, which retries it or fails the job (_failed_attempt).
    if watch.lost:
        raise _LostJob
    if store.is_cancel_requested(job.id):
        store.finish_cancelled(job.id, worker_id=watch.worker_id)
        log.info("job %s: cancelled after merging, nothing published", job.id)
        return
    watch.report_phase("publish")
    if watch.lost:
        raise _LostJob
    parents = [str(p.get("pinned")) for p in result.manifest.get("parents", [])]
    # The hash a later submission of the same pinned recipe looks up (app/submission.py);
    # for a job that is not reproducible, one that includes the parents as resolved.
    digest = _reusable_hash(job, parents) or compute_recipe_hash(
        kind=job.kind, recipe=job.recipe, parents=parents, seed=result.seed
    )
    try:
        version = publish_artifact(
            object_store,
            tenant,
            job.artifact_name,
            result.out_dir,
            job_id=job.id,
            recipe_hash=digest,
        )
    except ArtifactError as e:
        store.finish_failed(
            job.id, JobError(message=str(e), file=e.file, detail=str(e)), worker_id=watch.worker_id
        )
        return
    from workers.publish.hub_push import push_job_artifact

    # publish.hub_repo: push the version to the Hub; a refused push fails the job here.
    pushed = push_job_artifact(
        job,
        version,
        result.out_dir,
        store=store,
        settings=settings,
        object_store=object_store,
        worker_id=watch.worker_id,
        access=access,
    )
    if not pushed:
        return
    ref = ArtifactRef(name=version.name, version=version.version, uri=version.reference)
    if store.finish_succeeded(job.id, ref, worker_id=watch.worker_id) is None:
        # Taken over while publishing: the other attempt finds this version by job id.
        log.warning("job %s: published v%d but the job was taken over", job.id, version.version)
        return
    log.info("job %s: published %s", job.id, version.reference)


def _failed_attempt(
    job: Job, store: JobStore, settings: Settings, worker_id: str, e: Exception
) -> None:
    """Record what an attempt that raised ``e`` means for the job.

    A transient failure (workers.errors.is_transient: network, storage, database, memory, a
    source or the Hub unavailable) gives the job back to the queue and asks for a retry after
    a short backoff while attempts remain; on the last attempt it fails the job. Anything else
    (bad input, overflow, a missing module, a programming error) fails the job at once, with
    a message naming the cause: rerunning the same code on the same input fails the same way.
    """
    from workers.errors import failure_details, is_transient

    transient = is_transient(e)
    if not transient or job.attempts >= job.max_attempts:
        error = JobError(**failure_details(e, retried=job.attempts if transient else None))
        store.finish_failed(job.id, error, worker_id=worker_id)
        if transient:
            log.error("job %s: failed on its last attempt: %s", job.id, error.detail, exc_info=e)
        elif _is_weightsmith(e):
            log.info("job %s: failed: %s", job.id, e)
        else:
            log.error("job %s: failed, not retried: %s", job.id, error.detail, exc_info=e)
        return
    delay = retry_delay(settings, job.attempts)
    released = store.release_for_retry(
        job.id, worker_id, JobError(**failure_details(e, retried=job.attempts, retrying=True))
    )
    if released is None:
        return  # finished or taken over meanwhile: nothing to retry
    if released.state != JobState.QUEUED:
        log.info("job %s: attempt failed (%s) and its cancel request ended it", job.id, e)
        return
    log.warning(
        "job %s: attempt %d/%d failed (%s: %s); retrying in %.0f s",
        job.id,
        job.attempts,
        job.max_attempts,
        type(e).__name__,
        e if _is_weightsmith(e) else "see the traceback",
        delay,
        exc_info=not _is_weightsmith(e),
    )
    raise RetryLater(job.id, delay, f"attempt {job.attempts} failed ({type(e).__name__})") from e


def _is_weightsmith(e: BaseException) -> bool:
    from workers.errors import WeightsmithError

    return isinstance(e, WeightsmithError)


def retry_delay(settings: Settings, attempt: int) -> float:
    """Seconds before retrying after failed attempt ``attempt`` (1, 2, ...): the heartbeat
    interval, doubled per attempt, at most ``worker_lost_after``."""
    base = float(settings.worker_heartbeat_interval)
    return min(float(settings.worker_lost_after), base * 2.0 ** max(0, attempt - 1))


def soft_time_limit(settings: Settings) -> float:
    """Seconds after which a running job stops itself (between tensors) and fails cleanly:
    a little before the hard limit, at which Celery kills the process mid-tensor."""
    hard = float(settings.job_hard_time_limit)
    return hard - min(60.0, 0.05 * hard)


# ---- inputs ---------------------------------------------------------------------------------


def _parse_recipe(job: Job) -> MergeRecipe | EditRecipe | ExtractLoraRecipe | MoeRecipe:
    from pydantic import ValidationError

    from schemas.recipe import format_validation_error
    from workers.errors import InputError

    kinds = {kind.value: recipe for kind, recipe in RECIPE_TYPES.items()}
    model = kinds.get(job.kind)
    if model is None:
        valid = ", ".join(kinds)
        raise InputError(f"{job.kind} jobs are not supported (valid: {valid})", field="kind")
    try:
        return model.model_validate(job.recipe)
    except ValidationError as e:
        raise InputError("; ".join(format_validation_error(e)), field="recipe") from None


def _reusable_hash(job: Job, parents: list[str]) -> str | None:
    """service.reuse's hash of the job, with its parents as this worker resolved them."""
    try:
        pinned = [parse_reference(p) for p in parents]
    except ReferenceError_:
        return None
    return reusable_recipe_hash(job.kind, job.recipe, pinned)


def _build(
    recipe: MergeRecipe | ExtractLoraRecipe | MoeRecipe,
    out_dir: Path,
    sources: SourceSettings,
    resolved: dict[str, ResolvedModel],
    device: str,
    watch: JobWatch,
) -> Any:
    """A merge, extract_lora or moe job's engine, run on the fetched inputs into ``out_dir``
    (each engine stages its output and publishes it to ``out_dir`` only when complete)."""
    run: Callable[..., Any]
    if isinstance(recipe, ExtractLoraRecipe):
        from workers.extract import run_extract_lora as run
    elif isinstance(recipe, MoeRecipe):
        from workers.moe import run_moe as run
    else:
        from workers.merge.engine import run_merge as run
    return run(
        recipe,
        out_dir,
        device=device,
        sources=sources,
        progress=watch.report,
        cancelled=watch.should_stop,
        resolved=resolved,
        started=watch.started,
    )


# ---- edit -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EditOutput:
    """An edit's output directory as the publish step reads it (like a merge result)."""

    out_dir: Path
    manifest: dict[str, Any]
    seed: int


def _edit(
    recipe: EditRecipe,
    work: Path,
    settings: Settings,
    object_store: ObjectStore,
    access: TenantAccess,
    resolved: dict[str, ResolvedModel],
    watch: JobWatch,
    device: str,
) -> _EditOutput:
    """Run the edit engine on the fetched model, with the shared covariance cache."""
    from workers.edit.causal_trace import ObjectStoreTraceCache
    from workers.edit.covariance import ObjectStoreCovarianceCache
    from workers.edit.engine import run_edit

    model = resolved[str(recipe.model)]
    revision = None  # the engine's default: hub commit, else the weights' content hash
    if recipe.model.kind is ReferenceKind.ARTIFACT:
        # artifact names are per tenant: qualify the version so the shared cache is safe
        revision = f"artifact://{access.name}/{recipe.model.location}@{model.revision}"
    corpus = None
    if recipe.covariance.source == "text":
        watch.report_phase("fetch-corpus")
        corpus = fetch_corpus(recipe, settings, object_store, access, work / "corpus", watch)
    result = run_edit(
        recipe,
        work / "out",
        resolved=model,
        revision=revision,
        corpus_files=corpus,
        cache=ObjectStoreCovarianceCache(object_store),
        trace_cache=ObjectStoreTraceCache(object_store),
        progress=watch.report_phase,
        cancelled=watch.should_stop,
        covariance_progress=watch.report_covariance,
        started=watch.started,
        device=device,
    )
    assert result.out_dir is not None
    return _EditOutput(result.out_dir, result.manifest, recipe.seed)


def _gate_failure(e: EditGateError) -> JobError:
    """The job's error for an edit stopped by its safety gate: what tripped, and every
    metric (efficacy, neighborhood, perplexity ratio, ‖ΔW‖/‖W‖, denominators)."""
    from workers.edit.checkpoint import json_safe

    m = e.metrics
    summary = ", ".join(
        f"{k} {m[k]:.4g}"
        for k in ("efficacy", "paraphrase", "neighborhood", "perplexity_ratio")
        if isinstance(m.get(k), float)
    )
    norms = m.get("relative_update_norm") or {}
    if norms:
        summary += ", ‖ΔW‖/‖W‖ " + ", ".join(f"layer {k}: {v:.4g}" for k, v in norms.items())
    detail = (
        f"{e.message}. Measured: {summary}. Nothing was published; to publish anyway "
        "(flagged in the manifest) set on_gate_failure: publish_flagged"
    )
    return JobError(message=e.message, field="gate", detail=detail, metrics=json_safe(m))
