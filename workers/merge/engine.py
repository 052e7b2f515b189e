"""The streaming merge engine: one tensor at a time, in bounded memory.

run_merge resolves the recipe's inputs, checks every tensor's shape and dtype from the
safetensors headers before any math (plan.py), makes the extra streaming passes that
whole-model statistics need (``scope: global`` TIES, PCB; passes.py), then streams each
output tensor through the method (merging/methods/) into a staging directory that is renamed
into place only when complete. Peak memory is the inputs of one tensor (plus float32 working
copies), never the model; a method whose math is element-wise gets each tensor a block at a
time, so its memory is a few blocks.

The roles: plan.py (what to write), inputs.py (the input models), reading.py (reading
their tensors), parameters.py (the recipe's values per tensor), progress.py, passes.py
(statistics passes) and, here, the run and the merge of one tensor with the checks of its
result.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.inputs import WORK_CHUNK, Scratch, TensorInputs
from merging.method import MergeInputError
from merging.randomness import DrawsAhead
from merging.threads import machine_cores
from schemas.recipe import MergeRecipe
from workers.devices import resolve_device
from workers.errors import CancelledError, InputError, WeightsmithError, locate
from workers.merge.allocator import fix_malloc_thresholds
from workers.merge.inputs import open_merge_inputs, resolve, tokenizer_source
from workers.merge.parameters import ParameterResolver
from workers.merge.passes import ModelPasses, PassRead, PassSchedule
from workers.merge.plan import PlannedTensor, num_layers, plan_tensors
from workers.merge.progress import Progress, ProgressCallback, ProgressTracker
from workers.merge.reading import InputReader
from workers.merge.transfer import DeviceTransfer
from workers.merge.vocabulary import build_vocabulary, mergekit_order, vocab_size_key
from workers.sources import ResolvedModel, SourceSettings
from workers.tensors.writer import ShardedWriter, TensorSpec

__all__ = [
    "MergeResult",
    "MergeSession",
    "PassRead",
    "PassSchedule",
    "Progress",
    "ProgressCallback",
    "merge_in_session",
    "overflow_limit",
    "run_merge",
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_F32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class MergeResult:
    out_dir: Path
    seed: int
    manifest: dict[str, Any]
    files: list[Path] = field(default_factory=list)


def run_merge(
    recipe: MergeRecipe,
    out_dir: Path,
    *,
    seed: int | None = None,
    device: str = "cpu",
    sources: SourceSettings | None = None,
    base_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
    resolved: dict[str, ResolvedModel] | None = None,
    started: float | None = None,
) -> MergeResult:
    """Merge per ``recipe`` into ``out_dir`` (which must not exist or be empty).

    ``seed`` overrides the recipe's seed; with neither, a random seed is drawn and recorded.
    ``resolved`` may map reference strings to already resolved models (the service pins and
    fetches inputs itself). ``started``: the ``time.perf_counter()`` at which the work began
    (a job's attempt, its downloads included): the manifest's ``timings`` count from it
    (``resolve_s`` is then resolving and fetching the inputs, ``total_s`` everything up to the
    manifest); default now. On any failure nothing is left at ``out_dir``.
    """
    from workers.publish.output import StagedOutput

    StagedOutput(Path(out_dir))  # the output folder is checked before any work
    with MergeSession(
        recipe,
        seed=seed,
        device=device,
        sources=sources,
        base_dir=base_dir,
        progress=progress,
        cancelled=cancelled,
        resolved=resolved,
        started=started,
    ) as session:
        return merge_in_session(session, Path(out_dir))


def merge_in_session(session: MergeSession, out_dir: Path) -> MergeResult:
    """The whole merge of an open session in this process: statistics, every shard, the
    rest of the folder, published at ``out_dir`` at once (nothing there on failure)."""
    from workers.publish.output import StagedOutput

    output = StagedOutput(out_dir)
    try:
        t1 = time.perf_counter()
        stats = session.statistics()
        session.timings["statistics_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        digests = session.write(output.path, stats)
        session.timings["merge_s"] = time.perf_counter() - t2
        manifest = session.finalize(output.path, digests, session.merge.notes)
        output.publish()
        return MergeResult(
            out_dir=out_dir, seed=session.seed, manifest=manifest, files=sorted(out_dir.iterdir())
        )
    except BaseException:
        output.discard()
        raise


class MergeSession:
    """One merge's inputs opened, its output planned and checked against the headers, and
    the steps of the merge over them: :meth:`statistics`, :meth:`write` (all the shards, or
    a range of them: one part of a merge split across workers) and :meth:`finalize` (the
    index, config, tokenizer, model card and manifest). A context manager: the inputs are
    closed on exit. Every process of a split merge builds the same session from the same
    recipe, inputs and seed, so the plan and shard layout agree everywhere."""

    def __init__(
        self,
        recipe: MergeRecipe,
        *,
        seed: int | None = None,
        device: str = "cpu",
        sources: SourceSettings | None = None,
        base_dir: Path | None = None,
        progress: ProgressCallback | None = None,
        cancelled: Callable[[], bool] | None = None,
        resolved: dict[str, ResolvedModel] | None = None,
        started: float | None = None,
    ) -> None:
        fix_malloc_thresholds()  # the merge's buffers reused, not page-faulted in again
        self.recipe = recipe
        self.timings: dict[str, float] = {}
        self.t0 = time.perf_counter() if started is None else started
        run_seed = seed if seed is not None else recipe.seed
        if run_seed is None:
            run_seed = random.SystemRandom().randrange(2**63)
        self.seed: int = run_seed
        dev = resolve_device(device)
        settings = sources or SourceSettings(allow_pickle=recipe.allow_pickle)
        report = progress or (lambda _p: None)
        is_cancelled = cancelled or (lambda: False)
        self.inputs: list[Any] = []
        self._exit = contextlib.ExitStack()
        try:
            report(Progress("resolve", 0, 0, 0, 0))
            opened = open_merge_inputs(recipe, settings, base_dir, resolved or {})
            self.opened = opened
            self.inputs = inputs = opened.inputs
            self.timings["resolve_s"] = time.perf_counter() - self.t0
            self.base = base = next((i for i in inputs if i.role == "base"), None)
            models = [i for i in inputs if i.role != "base"]
            self.tokenizer_src = tokenizer_source(
                recipe, inputs, settings, base_dir, resolved or {}
            )
            self.vocabulary = vocabulary = None
            self.config_updates = dict(opened.layout.config_updates) if opened.layout else {}
            if recipe.vocabulary is not None:
                self.vocabulary = vocabulary = build_vocabulary(
                    recipe,
                    {
                        str(ref): resolve(ref.base, settings, base_dir, resolved or {}).path
                        for ref in recipe.input_references()
                    },
                    str(recipe.base_model) if recipe.base_model is not None else None,
                    self.tokenizer_src,
                )
                self.config_updates[vocab_size_key(opened.config_source.path)] = vocabulary.rows
            plan = plan_tensors(recipe, base, models, vocabulary.rows if vocabulary else None)
            params = ParameterResolver(
                recipe, num_layers(base or models[0], plan), layout=opened.layout
            )
            out_dtype = _DTYPES[recipe.output_dtype] if recipe.output_dtype else None
            self.specs = [
                TensorSpec(name, _output_dtype(p, out_dtype), p.shape) for name, p in plan.items()
            ]
            transfer = DeviceTransfer.for_device(dev)
            self._exit.callback(transfer.close)
            reader = InputReader(
                base,
                models,
                plan,
                dev,
                vocabulary=vocabulary,
                input_order=mergekit_order(recipe),
                transfer=transfer,
            )
            self.merge = _Merge(recipe, reader, params, run_seed, report, is_cancelled)
            threads = torch.get_num_threads()
            torch.set_num_threads(_compute_threads(threads))
            self._exit.callback(torch.set_num_threads, threads)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> MergeSession:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._exit.close()
        for i in self.inputs:
            i.reader.close()
        self.inputs = []

    @property
    def shard_size(self) -> int:
        return self.recipe.output.shard_size

    def statistics(self, schedule: PassSchedule | None = None) -> dict[str, Any]:
        """The method's whole-model statistics ({} when it needs none). ``schedule``: for a
        part of a split merge, which pass to read over which tensors (it raises
        :class:`PassRead` with the partial), or the combined passes to rebuild them from."""
        self.merge.passes.schedule = schedule
        return self.merge.statistics()

    def write(
        self, staging: Path, stats: dict[str, Any], shards: tuple[int, int] | None = None
    ) -> dict[str, tuple[int, str]]:
        """Merge every tensor (or those of the shards [first, end)) into ``staging``; returns
        the (size, sha256) of each file written (the shards, and the index for a whole run)."""
        merge = self.merge
        staging.mkdir(parents=True, exist_ok=shards is not None)
        writer = ShardedWriter(staging, self.specs, max_shard_bytes=self.shard_size, shards=shards)
        dtypes = {s.name: s.dtype for s in self.specs}
        try:
            # whole-tensor read-ahead for the tensors that are not streamed in blocks
            names = writer.names
            whole = [n for n in names if not merge.streamed(n)]
            merge.draws_ahead = merge.draws_in_order(names)
            with merge.reader.reading(whole):
                for name in names:
                    merge.check_cancel()
                    merge.write_tensor(name, stats, writer, dtypes[name])
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            if merge.draws_ahead is not None:
                merge.draws_ahead.close()
                merge.draws_ahead = None
        return writer.digests

    def finalize(
        self, staging: Path, digests: dict[str, tuple[int, str]], notes: list[str]
    ) -> dict[str, Any]:
        """Config, tokenizer, model card and (last) the manifest, beside the shards and the
        index in ``staging`` (``digests``: theirs); returns the manifest."""
        from workers.publish.output import finalize_output

        self.merge.progress.publishing()
        inputs = self.inputs
        base = self.base
        return finalize_output(
            staging,
            recipe=self.recipe,
            seed=self.seed,
            base=base.resolved if base else None,
            models=[r for r in self.opened.parents if base is None or r is not base.resolved],
            config_source=self.opened.config_source.path,
            config_updates=self.config_updates or None,
            tokenizer_source=self.tokenizer_src,
            tokenizer=self.vocabulary.tokenizer if self.vocabulary else None,
            written=[],
            writer_digests=digests,
            out_dtype=self.recipe.output_dtype,
            notes=notes,
            timings=self.timings,
            started=self.t0,
            publish_started=time.perf_counter(),
            # one entry per (checkpoint, adapter): a slice's sources repeat them
            adapters=list(
                {
                    (str(i.resolved.reference), str(i.adapter.reference)): (i.resolved, i.adapter)
                    for i in inputs
                    if i.adapter is not None
                }.values()
            ),
        )


def _compute_threads(current: int) -> int:
    """Threads for torch's element-wise math: one core is left to the read-ahead and writer
    threads (file copies and sha256). The math runs on cache-sized blocks, where an extra
    thread gains little and, on a busy machine, a thread pool waiting for a descheduled
    member loses a lot."""
    return max(1, min(current, machine_cores() - 1))


def is_overflow(e: BaseException) -> bool:
    """An arithmetic overflow: Python's, or torch refusing a scalar beyond the tensor's dtype
    ("value cannot be converted to type float without overflow")."""
    if isinstance(e, (OverflowError, FloatingPointError)):
        return True
    return isinstance(e, RuntimeError) and "overflow" in str(e)


def overflow_limit(dtype: torch.dtype) -> float:
    """The smallest magnitude a float32 value rounds to ±inf at when cast to ``dtype``.

    Round to nearest even: values below max + ulp(max)/2 round down to ``finfo.max``, so the
    limit is (2 − ε/2)·2^emax with max = (2 − ε)·2^emax (65520 for float16)."""
    if not dtype.is_floating_point or dtype.itemsize >= 4:
        return math.inf  # the merge computes in float32: it cannot exceed float32 or wider
    info = torch.finfo(dtype)
    return float(info.max) / (2 - float(info.eps)) * (2 - float(info.eps) / 2)


def _output_dtype(p: PlannedTensor, out_dtype: torch.dtype | None) -> torch.dtype:
    if not p.is_float or out_dtype is None:
        return p.dtype
    return out_dtype


class _Merge:
    """The merge of each tensor through the method, and the checks of what it gives."""

    def __init__(
        self,
        recipe: MergeRecipe,
        reader: InputReader,
        params: ParameterResolver,
        seed: int,
        report: ProgressCallback,
        cancelled: Callable[[], bool],
    ) -> None:
        self.method = recipe.method
        self.reader = reader
        self.plan = reader.plan
        self.params = params
        self.seed = seed
        self.cancelled = cancelled
        self.notes: list[str] = []
        self.scratch = Scratch()  # work buffers reused from tensor to tensor
        self.draws_ahead: DrawsAhead | None = None  # while write() runs a drawing method
        first = next(iter(self.plan))
        self.statistic = self.method.whole_model_statistic(params.shared(first))
        passes = self.statistic.passes if self.statistic else 0
        per_pass = sum(reader.input_bytes(n) for n, p in self.plan.items() if p.is_float)
        self.progress = ProgressTracker(
            report,
            tensors_total=len(self.plan) * (1 + passes),
            bytes_total=sum(reader.input_bytes(n) for n in self.plan) + per_pass * passes,
        )
        self.passes = ModelPasses(
            reader, params, self.progress, self._pass_inputs, self.check_cancel
        )

    def check_cancel(self) -> None:
        if self.cancelled():
            raise CancelledError("the merge was cancelled")

    def tensor_inputs(self, name: str, stats: dict[str, Any], *, whole: bool) -> TensorInputs:
        holders = self.reader.holders(name)
        return TensorInputs(
            name=name,
            shape=self.plan[name].shape,
            count=len(holders),
            model_indices=[m.index for m in holders if m.index is not None],
            params=[self.params.for_model(m, name) for m in holders],
            shared=self.params.shared(name),
            seed=self.seed,
            whole=whole,
            blocks=self.reader.blocks(name, whole=whole),
            stats=stats,
            notes=self.notes,
            scratch=self.scratch,
            draws_ahead=self.draws_ahead,
        )

    def draws_in_order(self, names: list[str]) -> DrawsAhead | None:
        """For a method that draws at random: its draws over ``names``, made ahead on a
        thread in the order the merge asks for them (each fine-tuned model of each float
        tensor in turn). Draws are made on the CPU whatever the device (randomness.py)."""
        if not self.method.draws_random:
            return None
        order = [
            (m.index, name, self.plan[name].numel)
            for name in names
            if self.plan[name].is_float
            for m in self.reader.holders(name)
            if m.index is not None
        ]
        return DrawsAhead(self.seed, order, chunk=WORK_CHUNK)

    def _pass_inputs(self, name: str) -> TensorInputs:
        return self.tensor_inputs(name, {}, whole=False)

    def streamed(self, name: str) -> bool:
        """Whether the merge pass streams this tensor block by block."""
        return (
            self.plan[name].is_float
            and not self.reader.aligns(name)
            and not self.method.whole_tensor(self.params.shared(name))
        )

    def statistics(self) -> dict[str, Any]:
        """The method's whole-model statistics (extra passes), or {} when it needs none."""
        if self.statistic is None:
            return {}
        try:
            return self.statistic.compute(self.passes)
        except Exception as e:
            if not is_overflow(e):
                raise
            raise self.overflow_error(self.passes.current_tensor) from None

    def write_tensor(
        self, name: str, stats: dict[str, Any], writer: ShardedWriter, dtype: torch.dtype
    ) -> None:
        p = self.plan[name]
        try:
            if not p.is_float:
                src = self.reader.base
                if src is None:  # copied from the first model that has it
                    src = next(m for m in self.reader.models if name in m.reader)
                writer.write(name, self.reader.read(src, name).to(dtype))
            else:
                streamed = self.streamed(name)
                x = self.tensor_inputs(name, stats, whole=not streamed)
                if self.reader.base is None and x.count == 0:
                    raise InputError("no input has this tensor", tensor=name)
                transfer = self.reader.transfer
                if streamed:
                    writer.begin(name)
                    for block in self.method.merge(x):
                        self._check_output(x, block, dtype)
                        if transfer.staged:  # copied back while the next block computes
                            for part in transfer.download(block, dtype):
                                writer.append(part)
                        else:
                            # a copy: the method may reuse the block's buffer for the next one
                            writer.append(block.to("cpu", dtype, copy=True))
                    writer.end()
                else:
                    (out,) = self.method.merge(x)
                    self._check_output(x, out, dtype)
                    if transfer.staged:  # through the output ring, written while the next computes
                        writer.begin(name)
                        for part in transfer.download(out, dtype):
                            writer.append(part)
                        writer.end()
                    else:
                        writer.write(name, out.cpu().to(dtype))
        except MergeInputError as e:
            raise InputError(e.message, tensor=name, field=e.field) from None
        except WeightsmithError as e:
            if e.tensor is None:
                e.tensor = name
            raise
        except Exception as e:
            if is_overflow(e):  # e.g. torch refusing a weight of 1e300 as a float32 scalar
                raise self.overflow_error(name) from None
            locate(e, tensor=name)  # the job's error names the tensor
            raise
        self.progress.advance("merge", self.reader.input_bytes(name))

    def _check_output(self, x: TensorInputs, out: torch.Tensor, dtype: torch.dtype) -> None:
        """Refuse NaN/Inf in a merged tensor (or block), and values that the cast to the
        output ``dtype`` would turn into ±inf (float16 ends at 65504). One aminmax, as before."""
        if out.numel() == 0:
            return
        lo_t, hi_t = torch.aminmax(out)
        lo, hi = float(lo_t), float(hi_t)  # aminmax propagates NaN
        if math.isfinite(lo) and math.isfinite(hi):
            limit = overflow_limit(dtype)
            if -limit < lo and hi < limit:
                return
            peak = hi if hi >= limit else lo
            name = str(dtype).removeprefix("torch.")
            raise InputError(
                f"the merged values reach {peak:.5g}, beyond the range of the output dtype "
                f"{name} (±{float(torch.finfo(dtype).max):.5g}), where they would become "
                "infinite: publish as bfloat16 or float32 (output.dtype), or merge with "
                "smaller weights",
                tensor=x.name,
                field="output.dtype",
            )
        # a damaged input is the likelier cause: name it (the streaming element-wise methods
        # leave the inputs' check to this one)
        for inp in self.reader.inputs_of(x.name):
            if not self.reader.is_finite(inp, x.name):
                self.reader.raise_not_finite(inp, x.name)
        raise self.overflow_error(x.name)

    def overflow_error(self, name: str | None) -> InputError:
        """The error for a merge whose arithmetic overflowed float32 (or produced NaN) on
        tensor ``name``: names the parameter and model responsible when one value alone is
        beyond float32's range, else the tensor and the parameters to check."""
        culprit = (
            self.params.out_of_range(name, self.reader.holders(name)) if name is not None else None
        )
        if culprit is not None:
            field_, model, value = culprit
            return InputError(
                f"{field_.rsplit('.', 1)[-1]} = {value:g} is beyond float32's range "
                f"(±{_F32_MAX:.4g}), so the merge overflows; use a value of sensible size",
                field=field_,
                model=model,
                tensor=name,
            )
        return InputError(
            "the merge overflowed float32 or produced NaN or infinite values (check weights, "
            "lambda and normalize)",
            tensor=name,
            field="parameters",
        )
