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
session of its own (the tests' check of the split against one run); workers/split_merge.py
runs them as job parts on any workers, with the job store as the barrier between steps.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from merging.statistics import Partial, combine_partials
from schemas.recipe import MergeRecipe
from workers.merge.engine import MergeResult, MergeSession, PassRead, PassSchedule
from workers.tensors.writer import plan_shards, split_shards, write_index

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


__all__ = [
    "decode_partial",
    "encode_partial",
    "finish_parts",
    "output_bytes",
    "pass_count",
    "plan_parts",
    "read_pass",
    "run_merge_in_parts",
    "statistics_from",
    "write_part",
]
