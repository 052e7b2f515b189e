"""One merge job across many workers: its parts as units of work in the job store.

A merge job whose recipe asks for ``parallelism: N`` (or whose output is larger than
``WEIGHTSMITH_MERGE_PARALLEL_ABOVE``) is split into parts, each a range of whole output
shards (workers/merge/parts.py). The worker that claimed the job is its *coordinator*: it
keeps the job's claim, heartbeat, cancel check and publish exactly as for any job, and runs
the merge in steps, one per statistics pass of the method and then the merge itself:

1. it records the step's parts (``job_parts``, infra/db/parts.py), sends one message per
   part (``weightsmith.run_merge_part``) to its own queue but the first, and runs the first
   part itself;
2. any worker takes a part's message and runs it (:func:`run_part`): claims the part (its
   own fencing token and attempt count), fetches the inputs for the tenant, reads its pass
   or merges its shards, and stores what it made under the job's work prefix in the object
   store (``_parts/{job}/a{attempt}/``: a pass's partial histograms, or its shard files,
   each attempt under keys of its own; the coordinator's own merge parts write straight into
   its output folder) before it marks the part done;
3. the coordinator waits for every part of the step (the job store is the barrier),
   running parts that no other worker took within ``STEAL_AFTER_S`` itself, so a job never
   waits for a free worker (the
   embedded worker, which has no broker, runs all the parts this way, one after the other);
   a part whose worker was lost (killed) is taken over once its heartbeat is stale by its
   redelivered message (``acks_late``, ``reject_on_worker_lost``), or by the coordinator
   when no message did within another ``worker_lost_after``, as a new attempt of the part;
4. after a statistics step it combines the parts' partials exactly (integer sums, maxima)
   and stores them for the next step; after the merge step it fetches every part's shards
   (sha256 checked), writes the index, config, tokenizer, model card and manifest, and the
   job publishes the folder as one artifact version, as a single-worker merge would.

The job's progress is the sum over its parts; a cancel of the job stops every part at its
next tensor; a part that fails fails the job with the part's error (naming the tensor), and
nothing is published. A new attempt of the job (its coordinator died) starts the parts over:
the earlier attempt's parts are fenced off by the job's attempt number.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.db.parts import DONE, FAILED, QUEUED, RUNNING, PartKey, PartStore
from schemas.jobs import JobError
from schemas.recipe import MergeRecipe
from workers.errors import CancelledError, WeightsmithError
from workers.watch import Beating

if TYPE_CHECKING:
    from infra.db import Job, JobStore
    from infra.db.models import JobPart
    from infra.settings import Settings
    from infra.storage import ObjectStore
    from workers.merge.engine import MergeResult, MergeSession, Progress
    from workers.sources import ResolvedModel, SourceSettings
    from workers.watch import JobWatch

log = logging.getLogger("weightsmith.split_merge")

WORK_PREFIX = "_parts"  # never a tenant's (tenant names start with a letter or digit)
POLL_S = 0.1  # how often the coordinator looks at its parts
# A queued part the other workers have not taken within this time is run by the coordinator
# (at once when there are no other workers: the embedded worker).
STEAL_AFTER_S = 2.0
PROGRESS_INTERVAL_S = 1.0

SendPart = Callable[[PartKey], None]


class PartFailedError(WeightsmithError):
    """A part of the merge failed: the job fails with the part's error, as it stands."""

    @classmethod
    def from_record(cls, error: dict[str, Any] | None) -> PartFailedError:
        e = JobError.model_validate(error or {"message": "a part of the merge failed"})
        return cls(e.message, field=e.field, model=e.model, tensor=e.tensor, file=e.file)


class PartRetryLater(Exception):
    """Run this part's message again after ``delay_s`` (it is held by a live worker, or a
    transient failure gave it back)."""

    def __init__(self, key: PartKey, delay_s: float, reason: str) -> None:
        super().__init__(f"job {key.job_id} part {key.part} step {key.step}: {reason}")
        self.delay_s = delay_s


def part_store(store: JobStore) -> PartStore:
    return PartStore(store.engine, worker_lost_after=store.worker_lost_after)


def parallelism_for(recipe: MergeRecipe, settings: Settings, output_bytes: int) -> int:
    """How many parts to split the merge into: the recipe's ``parallelism``, else one per
    ``merge_parallel_above`` bytes of output when the operator set it; at most the
    operator's maximum."""
    most = settings.merge_max_parallelism
    if recipe.parallelism is not None:
        return min(recipe.parallelism, most)
    above = settings.merge_parallel_above
    if above is None or output_bytes <= above:
        return 1
    return min(most, math.ceil(output_bytes / above))


# ---- the job's coordinator -------------------------------------------------------------------


def run_merge_job(
    job: Job,
    recipe: MergeRecipe,
    out_dir: Path,
    *,
    sources: SourceSettings,
    resolved: dict[str, ResolvedModel],
    device: str,
    watch: JobWatch,
    store: JobStore,
    settings: Settings,
    object_store: ObjectStore,
    send_part: SendPart | None,
) -> MergeResult:
    """A merge job's engine run: in one piece (``run_merge``), or split into parts."""
    from workers.merge.engine import MergeSession, merge_in_session
    from workers.merge.parts import output_bytes, plan_parts

    session = MergeSession(
        recipe,
        device=device,
        sources=sources,
        progress=watch.report,
        cancelled=watch.should_stop,
        resolved=resolved,
        started=watch.started,
    )
    with session:
        ranges = plan_parts(session, parallelism_for(recipe, settings, output_bytes(session)))
        if len(ranges) <= 1:
            return merge_in_session(session, out_dir)
        log.info("job %s: merge split into %d parts", job.id, len(ranges))
        coordinator = _Coordinator(
            job,
            session,
            ranges,
            parts=part_store(store),
            store=store,
            settings=settings,
            object_store=object_store,
            watch=watch,
            send_part=send_part,
            run_here=lambda key, here: run_part(
                key,
                deliver_to=here,
                store=store,
                settings=settings,
                object_store=object_store,
                worker_id=f"{watch.worker_id}:coordinator",
                device=device,
                resolved=resolved,
                sources=sources,
            ),
        )
        return coordinator.run(out_dir)


class _Coordinator:
    def __init__(
        self,
        job: Job,
        session: MergeSession,
        ranges: list[tuple[int, int]],
        *,
        parts: PartStore,
        store: JobStore,
        settings: Settings,
        object_store: ObjectStore,
        watch: JobWatch,
        send_part: SendPart | None,
        run_here: Callable[[PartKey, Path | None], None],
    ) -> None:
        self.job = job
        self.session = session
        self.ranges = ranges
        self.parts = parts
        self.store = store
        self.settings = settings
        self.objects = object_store
        self.watch = watch
        self.send_part = send_part
        self.run_here = run_here
        self.prefix = f"{WORK_PREFIX}/{job.id}/a{job.attempts}"
        progress = session.merge.progress
        self.tensors_total, self.bytes_total = progress.tensors_total, progress.bytes_total
        self.tensors_before = self.bytes_before = 0  # counted by the steps already done

    def run(self, out_dir: Path) -> MergeResult:
        from merging.statistics import combine_partials
        from workers.merge.engine import MergeResult
        from workers.merge.parts import decode_partial, encode_partial, finish_parts, pass_count
        from workers.publish.output import StagedOutput

        output = StagedOutput(out_dir)
        passes = pass_count(self.session)
        combined: list[str] = []  # object keys of each statistics pass's combined partials
        try:
            t1 = time.perf_counter()
            for step in range(passes):
                rows = self._step(step, passes, combined, "statistics")
                partials = [
                    decode_partial(self.objects.get_bytes((r.result or {})["partial"]))
                    for r in rows
                ]
                key = f"{self.prefix}/step{step}/combined.safetensors"
                self.objects.put_bytes(key, encode_partial(combine_partials(partials)))
                combined.append(key)
            self.session.timings["statistics_s"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            staging = output.path
            staging.mkdir(parents=True)
            # the parts this worker runs write their shards straight into the output
            rows = self._step(passes, passes, combined, "merge", here=staging)
            self.session.timings["merge_s"] = time.perf_counter() - t2
            digests: dict[str, tuple[int, str]] = {}
            notes: list[str] = []
            for row in rows:  # in part order: the notes as a single run would have them
                assert row.result is not None
                for name, (size, sha, key) in sorted(row.result["files"].items()):
                    if key is not None:  # None: written here, by this worker
                        self.objects.download_file(key, staging / name, sha256=sha)
                    digests[name] = (int(size), str(sha))
                notes.extend(row.result["notes"])
            self.watch.check()
            tracker = self.session.merge.progress  # the parts' counts, for the last report
            tracker.tensors_done, tracker.bytes_done = self.tensors_before, self.bytes_before
            manifest = finish_parts(self.session, staging, digests, notes)
            output.publish()
            return MergeResult(
                out_dir=out_dir,
                seed=self.session.seed,
                manifest=manifest,
                files=sorted(out_dir.iterdir()),
            )
        except BaseException:
            output.discard()
            raise
        finally:
            # the part rows stay (their attempts are the job's record); the work files go
            try:
                self.objects.delete_prefix(self.prefix + "/")
            except Exception:  # leftovers under _parts/ are harmless; the log says so
                log.warning("job %s: could not delete %s/", self.job.id, self.prefix)

    def _step(
        self, step: int, passes: int, combined: list[str], phase: str, here: Path | None = None
    ) -> list[JobPart]:
        """Run one step across the parts; its rows once every part is done. ``here``: where
        the merge step's parts run by this worker write their shards."""
        specs: list[dict[str, Any]] = [
            {
                "shards": list(r),
                "seed": self.session.seed,
                "prefix": self.prefix,
                "passes": passes,
                "combined": combined,
            }
            for r in self.ranges
        ]
        keys = self.parts.start_step(
            self.job.id, self.job.attempts, step, specs, self.settings.max_attempts
        )
        steal_at = time.monotonic()
        if self.send_part is not None:
            for key in keys[1:]:  # the first part is this worker's own: it is here anyway
                self.send_part(key)
            steal_at += STEAL_AFTER_S
        try:
            self.run_here(keys[0], here)
        except PartRetryLater as e:  # a transient failure gave it back: the loop retries it
            log.info("%s", e)
        last_report = 0.0
        while True:
            if self.watch.should_stop():
                raise CancelledError("the merge was cancelled")
            rows = self.parts.parts(self.job.id, step)
            failed = next((r for r in rows if r.state == FAILED), None)
            if failed is not None:
                raise PartFailedError.from_record(failed.error)
            tensors = sum(r.tensors_done for r in rows)
            nbytes = sum(r.bytes_done for r in rows)
            if all(r.state == DONE for r in rows):
                self.tensors_before += tensors
                self.bytes_before += nbytes
                return rows
            now = time.monotonic()
            if now - last_report >= PROGRESS_INTERVAL_S:
                last_report = now
                self._report(phase, tensors, nbytes)
            # A part nobody runs (all workers busy, or none but this one): run it here. A
            # part whose worker was lost is left to its redelivered message for another
            # lost-after period (a backstop for a message that is gone too).
            lost = datetime.now(UTC) - self.parts.worker_lost_after * (
                1 if self.send_part is None else 2
            )
            waiting = [
                k
                for k, r in zip(keys, rows, strict=True)
                if (r.state == QUEUED and now >= steal_at)
                or (r.state == RUNNING and (r.heartbeat_at is None or r.heartbeat_at < lost))
            ]
            ran = False
            for key in waiting:
                if self.parts.retry_part_after(key) == 0.0:
                    try:
                        self.run_here(key, here)
                        ran = True
                    except PartRetryLater as e:
                        log.info("%s", e)
                    break
            if not ran:
                time.sleep(POLL_S)

    def _report(self, phase: str, tensors: int, nbytes: int) -> None:
        from workers.merge.engine import Progress

        self.watch.report(
            Progress(
                phase,
                self.tensors_before + tensors,
                self.tensors_total,
                self.bytes_before + nbytes,
                self.bytes_total,
            )
        )


# ---- the work files' sweep --------------------------------------------------------------------


def job_work_prefix(job_id: str) -> str:
    """Where a split merge job keeps its work files in the artifact store, every attempt."""
    return f"{WORK_PREFIX}/{job_id}/"


def remove_job_work(object_store: ObjectStore, job_id: str) -> int:
    """Delete the job's work files (best effort: a failure is logged, the sweep retries);
    how many were deleted."""
    try:
        removed = object_store.delete_prefix(job_work_prefix(job_id))
    except Exception:
        log.warning("job %s: could not delete %s", job_id, job_work_prefix(job_id), exc_info=True)
        return 0
    if removed:
        log.info("job %s: deleted %d work file(s) of its parts", job_id, removed)
    return removed


def remove_ended_job_work(store: JobStore, object_store: ObjectStore, job_id: str) -> int:
    """After an attempt of a merge job: if the job has ended (succeeded, failed, cancelled)
    and was split into parts, delete its work files, every attempt's (a part still
    uploading after this is left to :func:`sweep_part_leftovers`). Best effort."""
    from schemas.jobs import JobState

    try:
        state = store.states([job_id]).get(job_id)
        if state is None or not JobState(state).is_terminal or not part_store(store).parts(job_id):
            return 0
    except Exception:
        log.warning("job %s: could not look up its parts", job_id, exc_info=True)
        return 0
    return remove_job_work(object_store, job_id)


def sweep_part_leftovers(
    store: JobStore,
    object_store: ObjectStore,
    *,
    older_than_s: float,
    now: datetime | None = None,
) -> list[str]:
    """Delete the work files (``_parts/{job}/``) of split merge jobs that have ended or that
    the job store does not know, once nothing under them was written for ``older_than_s``
    (WEIGHTSMITH_MERGE_PARTS_SWEEP_AFTER): what a crashed coordinator, or a part still
    uploading after its job ended, left behind. A running or queued job's files are never
    touched. Returns the ids of the jobs whose files were deleted."""
    from schemas.jobs import JobState

    base = WORK_PREFIX + "/"
    ids = sorted({p[len(base) :].split("/", 1)[0] for p in object_store.list_prefixes(base)} - {""})
    if not ids:
        return []
    states = store.states(ids)
    cutoff = (now or datetime.now(UTC)).timestamp() - older_than_s
    swept: list[str] = []
    for job_id in ids:
        state = states.get(job_id)
        if state is not None and not JobState(state).is_terminal:
            continue
        newest = max(
            (
                i.last_modified.timestamp()
                for i in object_store.list(job_work_prefix(job_id))
                if i.last_modified is not None
            ),
            default=None,
        )
        if newest is not None and newest > cutoff:
            continue  # written lately: a part of it may still be uploading
        if remove_job_work(object_store, job_id):
            swept.append(job_id)
    if swept:
        log.warning("swept the leftover work files of %d split merge job(s)", len(swept))
    return swept


# ---- a part, on any worker -------------------------------------------------------------------


class PartWatch(Beating):
    """A running part's heartbeat (with its progress), and its stop signal: the part taken
    over or gone, the job cancelled, or no longer running this attempt."""

    def __init__(
        self, parts: PartStore, store: JobStore, key: PartKey, worker_id: str, interval: float
    ) -> None:
        self.parts = parts
        self.store = store
        self.key = key
        self.worker_id = worker_id
        self.interval = interval
        self.lost = False
        self.cancelled = False
        self.tensors_done = 0
        self.bytes_done = 0
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._beating("part-heartbeat")

    def _write(self) -> None:
        try:
            if not self.parts.heartbeat_part(
                self.key,
                self.worker_id,
                tensors_done=self.tensors_done,
                bytes_done=self.bytes_done,
            ):
                self.lost = True
        except Exception:  # a database hiccup: the next beat tries again
            log.warning("part heartbeat failed", exc_info=True)

    def _beat(self) -> None:
        while not self._stopped.wait(self.interval):
            self._write()
            if self.lost:
                return

    def report(self, p: Progress) -> None:
        self.tensors_done, self.bytes_done = p.tensors_done, p.bytes_done
        now = time.monotonic()
        if now - self._last_write >= PROGRESS_INTERVAL_S:
            self._last_write = now
            self._write()

    def report_inputs(self, fetched: int, total: int, nbytes: int) -> None:
        log.info("part inputs: %d/%d fetched, %d bytes", fetched, total, nbytes)

    def should_stop(self) -> bool:
        if self.lost or self.cancelled:
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= 0.25:
            self._last_cancel_check = now
            self.cancelled = self.parts.part_should_stop(self.key)
        return self.lost or self.cancelled

    def check(self) -> None:
        if self.should_stop():
            raise CancelledError("the merge was cancelled")


def run_part(
    key: PartKey,
    *,
    store: JobStore,
    settings: Settings,
    object_store: ObjectStore,
    worker_id: str,
    device: str = "cpu",
    work_root: Path | None = None,
    resolved: dict[str, ResolvedModel] | None = None,
    sources: SourceSettings | None = None,
    deliver_to: Path | None = None,
) -> None:
    """Run one part of a split merge, or do nothing if it is not this call's to run.

    Raises :class:`PartRetryLater` when the message should be handled again later (the part
    runs under a worker not yet presumed lost, or a transient failure gave it back); every
    other outcome is recorded in the part's row. ``resolved``/``sources``: the job's inputs
    already fetched (the coordinator running a part itself); else they are fetched here.
    ``deliver_to``: the coordinator's output folder, where a merge part it runs itself writes
    its shards (nothing to upload); else they go to the artifact store's work prefix."""
    from workers.errors import failure_details, is_transient

    parts = part_store(store)
    row = parts.claim_part(key, worker_id)
    if row is None:
        delay = parts.retry_part_after(key)
        if delay is None:
            log.info("job %s part %d step %d: done or gone", key.job_id, key.part, key.step)
            return
        raise PartRetryLater(key, delay, "held by another worker")
    log.info(
        "job %s: part %d step %d, attempt %d on %s",
        key.job_id,
        key.part,
        key.step,
        row.attempts,
        worker_id,
    )
    watch = PartWatch(parts, store, key, worker_id, settings.worker_heartbeat_interval)
    work = Path(tempfile.mkdtemp(prefix=f"weightsmith-part-{key.job_id}-", dir=work_root))
    watch.start()
    try:
        result = _run_claimed_part(
            key,
            row,
            store,
            settings,
            object_store,
            watch,
            work,
            device,
            resolved,
            sources,
            deliver_to,
        )
        watch.stop()
        done = {"tensors_done": watch.tensors_done, "bytes_done": watch.bytes_done}
        if watch.lost or not parts.finish_part(key, worker_id, result, **done):
            log.warning(
                "job %s part %d: taken over; this attempt's output dropped", key.job_id, key.part
            )
    except CancelledError:
        log.info("job %s part %d: stopped (cancelled or taken over)", key.job_id, key.part)
    except Exception as e:
        watch.stop()
        if watch.lost:
            return
        if is_transient(e) and row.attempts < row.max_attempts:
            parts.release_part(key, worker_id)
            delay = float(settings.worker_heartbeat_interval)
            raise PartRetryLater(
                key, delay, f"attempt {row.attempts} failed ({type(e).__name__})"
            ) from e
        error = JobError(**failure_details(e))
        if not isinstance(e, WeightsmithError):
            log.error("job %s part %d failed: %s", key.job_id, key.part, error.detail, exc_info=e)
        parts.fail_part(key, worker_id, error)
    finally:
        watch.stop()
        shutil.rmtree(work, ignore_errors=True)


def _run_claimed_part(
    key: PartKey,
    row: JobPart,
    store: JobStore,
    settings: Settings,
    object_store: ObjectStore,
    watch: PartWatch,
    work: Path,
    device: str,
    resolved: dict[str, ResolvedModel] | None,
    sources: SourceSettings | None,
    deliver_to: Path | None = None,
) -> dict[str, Any]:
    from workers.merge.engine import MergeSession
    from workers.merge.parts import (
        decode_partial,
        encode_partial,
        read_pass,
        statistics_from,
        write_part,
    )

    spec = row.spec
    if resolved is None or sources is None:
        sources, resolved = _fetch_inputs(key, store, settings, object_store, watch, work)
    job_recipe = _job_recipe(store, key)
    shards = (int(spec["shards"][0]), int(spec["shards"][1]))
    combined = [decode_partial(object_store.get_bytes(k)) for k in spec["combined"]]
    with MergeSession(
        job_recipe,
        seed=int(spec["seed"]),
        device=device,
        sources=sources,
        progress=watch.report,
        cancelled=watch.should_stop,
        resolved=resolved,
    ) as session:
        if key.step < int(spec["passes"]):
            partial = read_pass(session, key.step, shards, combined)
            where = f"{spec['prefix']}/step{key.step}/part{key.part}.safetensors"
            object_store.put_bytes(where, encode_partial(partial))  # the same bytes each time
            return {"partial": where}
        stats = statistics_from(session, combined)
        out = deliver_to if deliver_to is not None else work / "out"
        digests, notes = write_part(session, out, stats, shards)
    if deliver_to is not None:
        return {
            "files": {n: [size, sha, None] for n, (size, sha) in digests.items()},
            "notes": notes,
        }
    # each attempt its own keys: a stale attempt still uploading never mixes with this one
    token = f"{spec['prefix']}/parts/{key.part}/a{row.attempts}-{uuid.uuid4().hex[:8]}"
    files = {}
    for name, (size, sha) in digests.items():
        watch.check()
        object_store.put_file(f"{token}/{name}", out / name, sha256=sha)
        files[name] = [size, sha, f"{token}/{name}"]
    return {"files": files, "notes": notes}


def _job_recipe(store: JobStore, key: PartKey) -> MergeRecipe:
    parts = part_store(store)
    job = parts.job(key.job_id)
    if job is None:
        raise CancelledError("the job is gone")
    return MergeRecipe.model_validate(job.recipe)


def _fetch_inputs(
    key: PartKey,
    store: JobStore,
    settings: Settings,
    object_store: ObjectStore,
    watch: PartWatch,
    work: Path,
) -> tuple[SourceSettings, dict[str, ResolvedModel]]:
    """The job's inputs on this worker, for its tenant (as the job's own attempt does)."""
    from workers.inputs import resolve_inputs, source_settings, tenant_access

    job = part_store(store).job(key.job_id)
    if job is None:
        raise CancelledError("the job is gone")
    recipe = MergeRecipe.model_validate(job.recipe)
    access = tenant_access(store, settings, job.tenant_id)
    sources = source_settings(settings, access, allow_pickle=recipe.allow_pickle)
    return sources, resolve_inputs(recipe, sources, settings, object_store, access, work, watch)


__all__ = [
    "PartFailedError",
    "PartRetryLater",
    "PartWatch",
    "job_work_prefix",
    "parallelism_for",
    "remove_ended_job_work",
    "remove_job_work",
    "run_merge_job",
    "run_part",
    "sweep_part_leftovers",
]
