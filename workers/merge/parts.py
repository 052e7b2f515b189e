"""A merge split into parts, each a range of whole output shards, that any process may run.

The output's shard layout is fixed by the plan and ``output.shard_size`` (tensors in plan
order, a new shard when the next tensor would overflow the current one), so a part that owns
shards [first, end) writes exactly the files a single run writes for them, byte for byte.
The steps, each run by every part and then combined:

1. **Statistics passes** (``scope: global`` TIES, PCB; none for most methods). Pass ``k`` of
   the method's statistic is read by each part over its own tensors
   (:func:`read_pass`: the statistic's code runs unchanged, replaying passes ``< k`` from
   their combined results and stopping at the end of pass ``k`` with what it gathered);
   :func:`merging.statistics.combine_partials` adds the parts' integer histograms and takes
   their maxima, so the combined result, and the statistic built from all of them
   (:func:`statistics_from`), are bit-identical to one process reading everything.
2. **Merge**: each part writes its shards (:func:`write_part`) with the statistic.
3. **Finish**: the index (the same bytes as a single run's), config, tokenizer, model card
   and manifest beside all the shards (:func:`finish_parts`).

:func:`run_merge_in_parts` runs the steps in one process, part after part, each in a
session of its own (the tests' check of the split against one run);
:func:`run_merge_in_processes` runs each step's parts at once in local worker processes
(``weightsmith merge`` with ``parallelism``); workers/split_merge.py runs them as job parts
on any workers, with the job store as the barrier between steps.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from merging import threads as merge_threads
from merging.statistics import Partial, combine_partials
from schemas.recipe import MergeRecipe
from workers.merge.engine import MergeResult, MergeSession, PassRead, PassSchedule
from workers.merge.progress import Progress, ProgressCallback
from workers.tensors.writer import plan_shards, split_shards, write_index

if TYPE_CHECKING:
    from workers.sources import ResolvedModel, SourceSettings

ShardRange = tuple[int, int]


def plan_parts(session: MergeSession, parallelism: int) -> list[ShardRange]:
    """The parts of the output for ``parallelism`` workers: contiguous shard ranges of
    about equal bytes; fewer than asked when the output has fewer shards."""
    return split_shards(plan_shards(session.specs, session.shard_size), parallelism)


def output_bytes(session: MergeSession) -> int:
    """Tensor bytes of the output (what automatic splitting compares with its threshold)."""
    return sum(s.nbytes for s in session.specs)


def pass_count(session: MergeSession) -> int:
    """How many statistics passes the method makes (steps before the merge step)."""
    statistic = session.merge.statistic
    return statistic.passes if statistic is not None else 0


def part_tensors(session: MergeSession, shards: ShardRange) -> set[str]:
    layout = plan_shards(session.specs, session.shard_size)
    return {spec.name for shard in layout[shards[0] : shards[1]] for spec in shard}


def read_pass(
    session: MergeSession, index: int, shards: ShardRange, combined: list[Partial]
) -> Partial:
    """Statistics pass ``index`` over the part's tensors (``combined``: the results of the
    passes before it, over every part): what it gathered, to combine with the other
    parts'. Empty when the statistic needs no pass after all (density 1 everywhere)."""
    if len(combined) != index:
        raise ValueError(f"pass {index} needs the {index} passes before it, got {len(combined)}")
    try:
        session.statistics(
            PassSchedule(combined, read=index, tensors=part_tensors(session, shards))
        )
    except PassRead as done:
        if done.index != index:  # cannot happen: the schedule replays every earlier pass
            raise RuntimeError(f"pass {done.index} ended while reading pass {index}") from None
        return done.partial
    return {}


def statistics_from(session: MergeSession, combined: list[Partial]) -> dict[str, Any]:
    """The statistic from every pass's combined result (no reading); {} when none."""
    if pass_count(session) == 0:
        return {}
    return session.statistics(PassSchedule(combined))


def encode_partial(partial: Partial) -> bytes:
    """A pass's partial as safetensors bytes (exact: int64 counts, float64 maxima)."""
    return save_tensors({k: v.contiguous() for k, v in partial.items()})


def decode_partial(data: bytes) -> Partial:
    return dict(load_tensors(data))


def write_part(
    session: MergeSession, staging: Path, stats: dict[str, Any], shards: ShardRange
) -> tuple[dict[str, tuple[int, str]], list[str]]:
    """Merge the part's tensors into its shard files in ``staging``; their (size, sha256)
    by file name, and the notes the method left on the way."""
    before = len(session.merge.notes)
    digests = session.write(staging, stats, shards)
    return digests, session.merge.notes[before:]


def finish_parts(
    session: MergeSession,
    staging: Path,
    digests: dict[str, tuple[int, str]],
    notes: list[str],
) -> dict[str, Any]:
    """With every part's shards in ``staging`` (``digests``: theirs, ``notes``: the parts'
    notes in part order): write the index, config, tokenizer, model card and manifest."""
    index, digest = write_index(staging, session.specs, session.shard_size)
    return session.finalize(staging, {**digests, index.name: digest}, notes)


def run_merge_in_parts(
    recipe: MergeRecipe,
    out_dir: Path,
    parallelism: int,
    *,
    seed: int | None = None,
    **session: Any,
) -> MergeResult:
    """The split merge's steps in one process, part after part: each part in a session of
    its own (as a separate worker would have), partials combined between the passes.
    ``session``: :class:`MergeSession`'s other arguments. The output equals
    :func:`workers.merge.engine.run_merge`'s, byte for byte but for the manifest's timings
    and time of creation."""
    from workers.publish.output import StagedOutput

    run_seed = seed if seed is not None else recipe.seed
    if run_seed is None:  # drawn once: every part must use the same
        run_seed = random.SystemRandom().randrange(2**63)

    def open_session() -> MergeSession:
        return MergeSession(recipe, seed=run_seed, **session)

    output = StagedOutput(Path(out_dir))
    try:
        with open_session() as coordinator:
            parts = plan_parts(coordinator, parallelism)
            combined: list[Partial] = []
            t1 = time.perf_counter()
            for index in range(pass_count(coordinator)):
                partials = []
                for shards in parts:
                    with open_session() as part:
                        partials.append(read_pass(part, index, shards, combined))
                combined.append(combine_partials(partials))
            coordinator.timings["statistics_s"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            digests: dict[str, tuple[int, str]] = {}
            notes: list[str] = []
            for shards in parts:
                with open_session() as part:
                    stats = statistics_from(part, combined)
                    written, part_notes = write_part(part, output.path, stats, shards)
                digests.update(written)
                notes.extend(part_notes)
            coordinator.timings["merge_s"] = time.perf_counter() - t2
            manifest = finish_parts(coordinator, output.path, digests, notes)
        output.publish()
        return MergeResult(
            out_dir=output.out_dir,
            seed=run_seed,
            manifest=manifest,
            files=sorted(output.out_dir.iterdir()),
        )
    except BaseException:
        output.discard()
        raise


# ---- the parts in local worker processes (``weightsmith merge`` with ``parallelism``) ----------

# How often a part's process reports its progress to the parent, at most (seconds).
PROCESS_PROGRESS_S = 0.2


@dataclass(frozen=True)
class _PartTask:
    """One step of one part, for a worker process (everything it needs, picklable)."""

    recipe: MergeRecipe
    seed: int
    session: dict[str, Any]  # MergeSession's other arguments
    step: int
    passes: int
    part: int
    shards: ShardRange
    combined: list[bytes]  # every earlier pass's combined partial, encoded
    staging: Path


_channel: tuple[Any, Any] | None = None  # a worker process's (progress queue, stop event)


def _start_process(queue: Any, stop: Any, threads: int) -> None:
    """A worker process's initializer: its channel to the parent, its share of the cores."""
    import torch

    global _channel
    _channel = (queue, stop)
    torch.set_num_threads(threads)
    merge_threads.limit(threads)  # numpy's work on the pool too


def _run_part_task(task: _PartTask) -> Any:
    """In a worker process: one step of one part, in a session of its own (as a worker of a
    split job would). A statistics pass returns its partial (encoded), the merge step the
    digests of the shards it wrote into the shared staging folder, and its notes; either
    with the part's final progress counts (tensors, bytes), which the parent takes from the
    result rather than from the queue (whose last message may arrive after the result).
    Stops at the next tensor once the parent sets the stop event (another part failed,
    Ctrl-C)."""
    assert _channel is not None, "run by the pool of run_merge_in_processes only"
    queue, stop = _channel
    last = 0.0

    def report(p: Progress) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROCESS_PROGRESS_S:
            last = now
            queue.put((task.step, task.part, p.tensors_done, p.bytes_done))

    combined = [decode_partial(b) for b in task.combined]
    with MergeSession(
        task.recipe, seed=task.seed, progress=report, cancelled=stop.is_set, **task.session
    ) as session:
        if task.step < task.passes:
            result: Any = encode_partial(read_pass(session, task.step, task.shards, combined))
        else:
            stats = statistics_from(session, combined)
            result = write_part(session, task.staging, stats, task.shards)
        tracker = session.merge.progress  # the part's last count, whatever the throttle skipped
        return result, tracker.tensors_done, tracker.bytes_done


class _Steps:
    """The parent's side: one step at a time across the pool, progress summed over parts."""

    def __init__(
        self,
        pool: Any,
        queue: Any,
        template: _PartTask,
        parts: list[ShardRange],
        report: ProgressCallback,
        totals: tuple[int, int],
    ) -> None:
        self.pool = pool
        self.queue = queue
        self.template = template
        self.parts = parts
        self.report = report
        self.totals = totals
        self.before = (0, 0)  # tensors and bytes counted by the steps already done
        self.counts: dict[int, tuple[int, int]] = {}

    def run(self, step: int, combined: list[bytes], phase: str) -> list[Any]:
        """Every part's result of ``step``, in part order; the first failure raised as soon
        as it happens."""
        from concurrent.futures import FIRST_EXCEPTION, wait

        self.counts = {}
        futures = [
            self.pool.submit(
                _run_part_task,
                replace(self.template, step=step, part=i, shards=shards, combined=combined),
            )
            for i, shards in enumerate(self.parts)
        ]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=PROCESS_PROGRESS_S, return_when=FIRST_EXCEPTION)
            if self._drain(step):
                self._report(phase)
            for f in futures:
                if f.done() and f.exception() is not None:
                    f.result()  # raises the part's error
        finished = [f.result() for f in futures]
        self._drain(step)
        for part, (_, tensors, nbytes) in enumerate(finished):
            self.counts[part] = (tensors, nbytes)  # each part's final count, exactly
        self._report(phase)
        self.before = self._sums()
        return [result for result, _, _ in finished]

    def _drain(self, step: int) -> bool:
        import queue as queue_module

        changed = False
        while True:
            try:
                s, part, tensors, nbytes = self.queue.get_nowait()
            except queue_module.Empty:
                return changed
            if s == step:
                self.counts[part] = (tensors, nbytes)
                changed = True

    def _sums(self) -> tuple[int, int]:
        return (
            self.before[0] + sum(c[0] for c in self.counts.values()),
            self.before[1] + sum(c[1] for c in self.counts.values()),
        )

    def _report(self, phase: str) -> None:
        tensors, nbytes = self._sums()
        self.report(Progress(phase, tensors, self.totals[0], nbytes, self.totals[1]))


def run_merge_in_processes(
    recipe: MergeRecipe,
    out_dir: Path,
    parallelism: int,
    *,
    seed: int | None = None,
    device: str = "cpu",
    sources: SourceSettings | None = None,
    base_dir: Path | None = None,
    progress: ProgressCallback | None = None,
) -> MergeResult:
    """The merge split into ``parallelism`` parts run by as many local worker processes at
    once, step by step as on the workers of a split job (:func:`read_pass`,
    :func:`statistics_from` and :func:`write_part`, each part in a session of its own, the
    partials combined exactly between the passes); this process plans the parts and writes
    the index, config, tokenizer, model card and manifest. The output equals
    :func:`workers.merge.engine.run_merge`'s, byte for byte but for the manifest's timings
    and time of creation. With ``parallelism`` 1 (or an output of one shard) the merge runs
    in this process. The inputs are resolved (fetched) once, here; the processes share the
    cores. On a failure or Ctrl-C the other parts stop at their next tensor and nothing is
    left at ``out_dir``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from workers.merge.engine import merge_in_session
    from workers.publish.output import StagedOutput

    if parallelism < 1:
        raise ValueError(f"parallelism must be at least 1, got {parallelism}")
    report = progress or (lambda _p: None)
    out_dir = Path(out_dir)
    output = StagedOutput(out_dir)  # the output folder is checked before any work
    with MergeSession(
        recipe, seed=seed, device=device, sources=sources, base_dir=base_dir, progress=report
    ) as coordinator:
        parts = plan_parts(coordinator, parallelism)
        if len(parts) <= 1:
            return merge_in_session(coordinator, out_dir)
        resolved: dict[str, ResolvedModel] = {}
        for inp in coordinator.inputs:  # fetched once: every part reads the same files
            resolved.setdefault(str(inp.resolved.reference), inp.resolved)
            if inp.adapter is not None:
                resolved.setdefault(str(inp.adapter.reference), inp.adapter)
        template = _PartTask(
            recipe=recipe,
            seed=coordinator.seed,
            session={
                "device": device,
                "sources": sources,
                "base_dir": base_dir,
                "resolved": resolved,
            },
            step=0,
            passes=pass_count(coordinator),
            part=0,
            shards=parts[0],
            combined=[],
            staging=output.path,
        )
        tracker = coordinator.merge.progress
        cores = merge_threads.machine_cores()
        context = multiprocessing.get_context("spawn")  # no forked torch or reader threads
        queue, stop = context.Queue(), context.Event()
        pool = ProcessPoolExecutor(
            max_workers=len(parts),
            mp_context=context,
            initializer=_start_process,
            initargs=(queue, stop, max(1, cores // len(parts))),
        )
        try:
            steps = _Steps(
                pool, queue, template, parts, report, (tracker.tensors_total, tracker.bytes_total)
            )
            combined: list[bytes] = []
            t1 = time.perf_counter()
            for step in range(template.passes):
                partials = [decode_partial(b) for b in steps.run(step, combined, "statistics")]
                combined = [*combined, encode_partial(combine_partials(partials))]
            coordinator.timings["statistics_s"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            output.path.mkdir(parents=True)
            digests: dict[str, tuple[int, str]] = {}
            notes: list[str] = []
            for written, part_notes in steps.run(template.passes, combined, "merge"):
                digests.update(written)
                notes.extend(part_notes)  # in part order, as one run has them
            coordinator.timings["merge_s"] = time.perf_counter() - t2
            tracker.tensors_done, tracker.bytes_done = steps.before
            manifest = finish_parts(coordinator, output.path, digests, notes)
            output.publish()
        except BaseException:
            stop.set()  # the parts still running stop at their next tensor
            pool.shutdown(wait=True, cancel_futures=True)
            output.discard()
            raise
        finally:
            pool.shutdown(wait=True)
            queue.close()
        return MergeResult(
            out_dir=out_dir,
            seed=coordinator.seed,
            manifest=manifest,
            files=sorted(out_dir.iterdir()),
        )


__all__ = [
    "decode_partial",
    "encode_partial",
    "finish_parts",
    "output_bytes",
    "pass_count",
    "plan_parts",
    "read_pass",
    "run_merge_in_parts",
    "run_merge_in_processes",
    "statistics_from",
    "write_part",
]
