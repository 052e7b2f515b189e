"""The streaming merge engine: one tensor at a time, in bounded memory.

run_merge resolves the recipe's inputs, checks every tensor's shape and dtype from the
safetensors headers before any math, makes the extra streaming passes that whole-model
statistics need (``scope: global`` TIES, PCB), then streams each output tensor through
the method into a staging directory that is renamed into place only when complete.
Peak memory is the inputs of one tensor (plus float32 working copies), never the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from schemas.methods import METHODS, ParamScope
from schemas.recipe import MergeRecipe, layer_position, resolve_parameter
from schemas.references import ModelReference
from workers.errors import CancelledError, InputError, WeightsmithError, locate
from workers.merge.blocks import Block, block_ranges, stream_blocks
from workers.merge.methods import BLOCKED_FUNCTIONS, METHOD_FUNCTIONS, TensorInputs
from workers.merge.readahead import ReadAhead
from workers.merge.statistics import GLOBAL_STATISTICS
from workers.sources import ResolvedModel, SourceSettings, resolve_reference
from workers.tensors.reader import CheckpointReader
from workers.tensors.safetensors_format import DTYPES
from workers.tensors.writer import ShardedWriter, TensorSpec

if set(METHOD_FUNCTIONS) != set(METHODS):  # the schema table and the engine must agree
    raise RuntimeError(f"methods without implementation: {set(METHODS) ^ set(METHOD_FUNCTIONS)}")

_LAYER = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_F32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class Progress:
    phase: str  # resolve, statistics, merge, publish
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


ProgressCallback = Callable[[Progress], None]


@dataclass
class MergeResult:
    out_dir: Path
    seed: int
    manifest: dict[str, Any]
    files: list[Path] = field(default_factory=list)


@dataclass
class _Input:
    """One input model: its recipe role, resolved location and open reader."""

    role: str  # "base" or f"models[{i}]"
    entry_params: dict[str, Any] | None
    resolved: ResolvedModel
    reader: CheckpointReader
    index: int | None  # position among fine-tuned models (None for the base)

    @property
    def label(self) -> str:
        return str(self.resolved.reference)


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
) -> MergeResult:
    """Merge per ``recipe`` into ``out_dir`` (which must not exist or be empty).

    ``seed`` overrides the recipe's seed; with neither, a random seed is drawn and recorded.
    ``resolved`` may map reference strings to already resolved models (the service pins and
    fetches inputs itself). On any failure nothing is left at ``out_dir``.
    """
    from workers.publish.output import finalize_output

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(
            f"output directory {str(out_dir)!r} already exists and is not empty", field="out"
        )
    run_seed = seed if seed is not None else recipe.seed
    if run_seed is None:
        run_seed = random.SystemRandom().randrange(2**63)
    dev = _check_device(device)
    settings = sources or SourceSettings(allow_pickle=recipe.allow_pickle)
    report = progress or (lambda _p: None)
    is_cancelled = cancelled or (lambda: False)

    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    # parent directories this run creates (innermost first): removed again if it fails
    new_parents = [d for d in (out_dir.parent, *out_dir.parent.parents) if not d.exists()]
    shutil.rmtree(staging, ignore_errors=True)
    inputs: list[_Input] = []
    exit_stack = contextlib.ExitStack()
    try:
        report(Progress("resolve", 0, 0, 0, 0))
        inputs = _open_inputs(recipe, settings, base_dir, resolved or {})
        timings["resolve_s"] = time.perf_counter() - t0
        base = next((i for i in inputs if i.role == "base"), None)
        models = [i for i in inputs if i.role != "base"]
        tokenizer_src = _tokenizer_source(recipe, inputs, settings, base_dir, resolved or {})
        plan = _plan(recipe, base, models)
        num_layers = _num_layers(base or models[0], plan)
        out_dtype = _DTYPES[recipe.output_dtype] if recipe.output_dtype else None
        specs = [TensorSpec(name, _output_dtype(p, out_dtype), p.shape) for name, p in plan.items()]
        ctx = _Context(recipe, base, models, plan, num_layers, run_seed, dev, report, is_cancelled)
        threads = torch.get_num_threads()
        torch.set_num_threads(_compute_threads(threads))
        exit_stack.callback(torch.set_num_threads, threads)
        t1 = time.perf_counter()
        try:
            stats = ctx.global_statistics()
        except Exception as e:
            if not is_overflow(e):
                raise
            raise ctx.overflow_error(ctx.current_tensor) from None
        timings["statistics_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        staging.mkdir(parents=True)
        writer = ShardedWriter(staging, specs, max_shard_bytes=recipe.output.shard_size)
        try:
            # whole-tensor read-ahead for the tensors that are not streamed in blocks
            dense = [s.name for s in specs if not ctx.streamed(s.name, stats)]
            with ctx.reading(dense):
                for spec in specs:
                    ctx.check_cancel()
                    ctx.merge_tensor(spec.name, stats, writer, spec.dtype)
            shards = writer.close()
        except BaseException:
            writer.abort()
            raise
        timings["merge_s"] = time.perf_counter() - t2
        report(Progress("publish", len(specs), len(specs), ctx.bytes_done, ctx.bytes_total))
        t3 = time.perf_counter()
        manifest = finalize_output(
            staging,
            recipe=recipe,
            seed=run_seed,
            base=base.resolved if base else None,
            models=[m.resolved for m in models],
            config_source=(base or models[0]).resolved.path,
            tokenizer_source=tokenizer_src,
            written=shards,
            writer_digests=writer.digests,
            out_dtype=recipe.output_dtype,
            notes=ctx.notes,
            timings=timings,
            started=t0,
            publish_started=t3,
        )
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
        return MergeResult(
            out_dir=out_dir, seed=run_seed, manifest=manifest, files=sorted(out_dir.iterdir())
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for d in new_parents:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    finally:
        exit_stack.close()
        for i in inputs:
            i.reader.close()


def _compute_threads(current: int) -> int:
    """Threads for torch's element-wise math: one core is left to the read-ahead and writer
    threads (file copies and sha256). The math runs on cache-sized blocks, where an extra
    thread gains little and, on a busy machine, a thread pool waiting for a descheduled
    member loses a lot."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(current, cores - 1))


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


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf. aminmax propagates NaN and is ~15× faster than isfinite().all()."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(
            f"unknown device {device!r}; use cpu or cuda[:N]", field="device"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "device 'cuda' was asked for but no CUDA GPU is available; use cpu", field="device"
        )
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}; use cpu or cuda", field="device")
    return dev


def _resolve(
    ref: ModelReference,
    settings: SourceSettings,
    base_dir: Path | None,
    resolved: dict[str, ResolvedModel],
) -> ResolvedModel:
    if str(ref) in resolved:
        return resolved[str(ref)]
    return resolve_reference(ref, settings, base_dir=base_dir)


def _open_inputs(
    recipe: MergeRecipe,
    settings: SourceSettings,
    base_dir: Path | None,
    resolved: dict[str, ResolvedModel],
) -> list[_Input]:
    out: list[_Input] = []
    try:
        if recipe.base_model is not None and recipe.method.needs_base:
            entry = recipe.base_entry
            r = _resolve(recipe.base_model, settings, base_dir, resolved)
            out.append(
                _Input(
                    "base", entry.parameters if entry else None, r, _open_reader(r, recipe), None
                )
            )
        fine = {id(e) for e in recipe.fine_tuned}
        index = 0
        for pos, entry in enumerate(recipe.models):
            if id(entry) not in fine:
                continue
            r = _resolve(entry.model, settings, base_dir, resolved)
            reader = _open_reader(r, recipe)
            out.append(_Input(f"models[{pos}]", entry.parameters, r, reader, index))
            index += 1
    except BaseException:
        for inp in out:
            inp.reader.close()
        raise
    return out


def _open_reader(r: ResolvedModel, recipe: MergeRecipe) -> CheckpointReader:
    return CheckpointReader(r.path, label=str(r.reference), allow_pickle=recipe.allow_pickle)


def _tokenizer_source(
    recipe: MergeRecipe,
    inputs: list[_Input],
    settings: SourceSettings,
    base_dir: Path | None,
    resolved: dict[str, ResolvedModel],
) -> Path | None:
    src = recipe.tokenizer_source
    if src is None or src == "base":
        first = next((i for i in inputs if i.role == "base"), inputs[0] if inputs else None)
        return first.resolved.path if first else None
    assert isinstance(src, ModelReference)
    for i in inputs:
        if i.resolved.reference == src:
            return i.resolved.path
    return _resolve(src, settings, base_dir, resolved).path


@dataclass(frozen=True)
class _Planned:
    shape: tuple[int, ...]
    dtype_code: str  # of the base (or the first model having it)
    holders: tuple[int, ...]  # indices into the fine-tuned list of models having the tensor
    in_base: bool

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype_code].is_floating_point


def _torch_dtype(code: str) -> torch.dtype:
    return DTYPES[code]


def _output_dtype(p: _Planned, out_dtype: torch.dtype | None) -> torch.dtype:
    if not p.is_float or out_dtype is None:
        return _torch_dtype(p.dtype_code)
    return out_dtype


def _vocab_size(path: Path) -> int | None:
    cfg = _read_config(path)
    for key in ("vocab_size", "n_vocab"):
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    text = cfg.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        return int(text["vocab_size"])
    return None


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"config.json is not valid JSON: {e}", file=str(cfg_path)) from None
    return data if isinstance(data, dict) else {}


def _plan(recipe: MergeRecipe, base: _Input | None, models: list[_Input]) -> dict[str, _Planned]:
    """Output tensors with shapes and holders, checked from headers only (no data read)."""
    reference = base or models[0]
    ref_vocab = _vocab_size(reference.resolved.path)
    for m in models:
        v = _vocab_size(m.resolved.path)
        if ref_vocab is not None and v is not None and v != ref_vocab:
            raise InputError(
                f"vocabulary size {v} differs from {ref_vocab} of {reference.label!r}; merging "
                "models with different vocabularies needs a tokenizer plan, which weightsmith "
                "does not support yet: merge models that share a tokenizer",
                model=m.label,
                field=f"{m.role}.model",
            )
    if base is not None:
        names = list(base.reader.names)
    else:
        seen: dict[str, None] = {}
        for m in models:
            for n in m.reader.names:
                seen.setdefault(n, None)
        names = sorted(seen)
    plan: dict[str, _Planned] = {}
    for name in names:
        ref_in = (
            base
            if base is not None and name in base.reader
            else next(m for m in models if name in m.reader)
        )
        info = ref_in.reader.info(name)
        holders = []
        for m in models:
            if name not in m.reader:
                continue
            mi = m.reader.info(name)
            if tuple(mi.shape) != tuple(info.shape):
                vocab_hint = (
                    " — the vocabularies differ; merging them needs a tokenizer plan"
                    if _is_embedding(name)
                    else ""
                )
                raise InputError(
                    f"shape {tuple(mi.shape)} differs from {tuple(info.shape)} in "
                    f"{ref_in.label!r}{vocab_hint}",
                    model=m.label,
                    tensor=name,
                )
            if mi.dtype != info.dtype:
                raise InputError(
                    f"dtype {mi.dtype} differs from {info.dtype} in {ref_in.label!r}; convert "
                    "the inputs to one dtype first",
                    model=m.label,
                    tensor=name,
                )
            assert m.index is not None
            holders.append(m.index)
        plan[name] = _Planned(tuple(info.shape), info.dtype, tuple(holders), base is not None)
    if base is not None:
        for m in models:
            extra = [n for n in m.reader.names if n not in base.reader]
            if extra:
                more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
                raise InputError(
                    f"tensor is missing from the base model {base.label!r}{more}; the method "
                    f"{recipe.merge_method!r} computes differences from the base, so every "
                    "tensor must exist there",
                    model=m.label,
                    tensor=extra[0],
                )
    if not plan:
        raise InputError("the inputs contain no tensors", model=reference.label)
    return plan


def _is_embedding(name: str) -> bool:
    return any(k in name for k in ("embed", "lm_head", "wte", "word_embeddings", "output.weight"))


def _num_layers(first: _Input, plan: dict[str, _Planned]) -> int:
    cfg = _read_config(first.resolved.path)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return int(cfg[key])
    layers = [int(m.group(1)) for n in plan if (m := _LAYER.search(n))]
    return max(layers) + 1 if layers else 1


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


class _Context:
    """State of one merge run shared by the statistics passes and the write pass."""

    def __init__(
        self,
        recipe: MergeRecipe,
        base: _Input | None,
        models: list[_Input],
        plan: dict[str, _Planned],
        num_layers: int,
        seed: int,
        device: torch.device,
        report: ProgressCallback,
        cancelled: Callable[[], bool],
    ) -> None:
        self.recipe = recipe
        self.spec = recipe.method
        self.fn = METHOD_FUNCTIONS[recipe.merge_method]
        self.base = base
        self.models = models
        self.plan = plan
        self.num_layers = num_layers
        self.seed = seed
        self.device = device
        self.report = report
        self.cancelled = cancelled
        self.notes: list[str] = []
        self.current_tensor: str | None = None  # the tensor a pass is on (for errors)
        shared0 = self.shared_params(next(iter(plan)))
        stat_cls = GLOBAL_STATISTICS.get(recipe.merge_method)
        self.statistic = stat_cls(self) if stat_cls and self.spec.global_passes(shared0) else None
        passes = self.statistic.passes if self.statistic else 0
        per_pass = sum(self._input_bytes(n) for n in plan if plan[n].is_float)
        self.tensors_total = len(plan) * (1 + passes)
        self.bytes_total = sum(self._input_bytes(n) for n in plan) + per_pass * passes
        self.tensors_done = 0
        self.bytes_done = 0
        self.readahead: ReadAhead | None = None

    def reading(self, names: list[str]) -> ReadAhead:
        """Start reading ahead for a pass over ``names`` (use as a context manager)."""
        self.readahead = ReadAhead(self.read_order(names), self._read_input)
        return self.readahead

    # -- parameters --------------------------------------------------------------------------

    def _t(self, name: str) -> float:
        return layer_position(layer_of(name), self.num_layers)

    def shared_params(self, name: str) -> dict[str, Any]:
        t = self._t(name)
        return {
            p.name: resolve_parameter(p, [self.recipe.parameters], name, t)
            for p in self.spec.parameters
            if p.scope is ParamScope.SHARED
        }

    def model_params(self, m: _Input, name: str) -> dict[str, Any]:
        t = self._t(name)
        return {
            p.name: resolve_parameter(p, [m.entry_params, self.recipe.parameters], name, t)
            for p in self.spec.parameters
            if p.scope is ParamScope.MODEL
        }

    # -- reading -----------------------------------------------------------------------------

    def _input_bytes(self, name: str) -> int:
        total = self.base.reader.info(name).nbytes if self.base and name in self.base.reader else 0
        return total + sum(m.reader.info(name).nbytes for m in self.models if name in m.reader)

    def check_cancel(self) -> None:
        if self.cancelled():
            raise CancelledError("the merge was cancelled")

    def read_order(self, names: Iterator[str] | list[str]) -> list[tuple[int, str]]:
        """The order a pass reads inputs in: per tensor the base, then each holder."""
        order: list[tuple[int, str]] = []
        for name in names:
            p = self.plan[name]
            if self.base is not None:
                order.append((-1, name))
            if p.is_float:
                order += [(i, name) for i in p.holders]
            elif self.base is None and p.holders:
                order.append((p.holders[0], name))
        return order

    def _read_input(self, key: tuple[int, str]) -> torch.Tensor:
        i, name = key
        inp = self.base if i < 0 else self.models[i]
        assert inp is not None
        return inp.reader.read(name)

    def _read(self, inp: _Input, name: str) -> torch.Tensor:
        key = (-1 if inp.index is None else inp.index, name)
        return self.readahead.get(key) if self.readahead else self._read_input(key)

    def _load_raw(self, inp: _Input, name: str, check: bool = True) -> torch.Tensor:
        """The stored tensor on the compute device, checked for NaN/Inf when asked."""
        t = self._read(inp, name).to(self.device)
        if check and t.is_floating_point() and not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise InputError(
                f"contains {bad} NaN or infinite value(s); refusing to merge a damaged checkpoint",
                model=inp.label,
                tensor=name,
            )
        return t

    def _load(self, inp: _Input, name: str, check: bool = True) -> torch.Tensor:
        t = self._load_raw(inp, name, check)
        return t.to(torch.float32) if t.is_floating_point() else t

    def inputs_for(self, name: str, stats: dict[str, Any]) -> TensorInputs:
        p = self.plan[name]
        base = self.base
        holders = [m for m in self.models if m.index in p.holders]
        checked: set[int] = set()

        def load_raw(j: int) -> torch.Tensor:
            # NaN/Inf are checked on the first read of each input only
            t = self._load_raw(holders[j], name, check=j not in checked)
            checked.add(j)
            return t

        def load_base() -> torch.Tensor | None:
            return self._load(base, name) if base is not None else None

        blocks_checked = [False]

        def blocks(check: bool = True) -> Iterator[Block]:
            # NaN/Inf are checked on the first checked pass only
            check, blocks_checked[0] = check and not blocks_checked[0], blocks_checked[0] or check
            inputs = ([base] if base is not None else []) + holders
            for b in stream_blocks(
                math.prod(p.shape),
                _torch_dtype(p.dtype_code),
                self._block_reader(base, name) if base is not None else None,
                [self._block_reader(m, name) for m in holders],
            ):
                if check:
                    raws = [b.base_raw] if b.base_raw is not None else []
                    for inp, raw in zip(inputs, raws + b.raws, strict=True):
                        if not all_finite(raw):
                            self._raise_not_finite(inp, name)
                yield b

        return TensorInputs(
            name=name,
            has_base=base is not None,
            load_base=load_base,
            count=len(holders),
            load_raw=load_raw,
            model_indices=[m.index for m in holders if m.index is not None],
            params=[self.model_params(m, name) for m in holders],
            shared=self.shared_params(name),
            seed=self.seed,
            stats=stats,
            notes=self.notes,
            numel=math.prod(p.shape),
            blocks=blocks,
        )

    def _block_reader(self, inp: _Input, name: str) -> Callable[[int, torch.Tensor], torch.Tensor]:
        def read(start: int, out: torch.Tensor) -> torch.Tensor:
            return inp.reader.read_into(name, start, out).to(self.device)

        return read

    def _raise_not_finite(self, inp: _Input, name: str) -> None:
        """InputError naming ``inp`` and how many non-finite values its tensor has."""
        bad = 0
        for start, stop in block_ranges(inp.reader.info(name).numel):
            t = inp.reader.read_into(
                name, start, torch.empty(stop - start, dtype=inp.reader.info(name).torch_dtype)
            )
            bad += int((~torch.isfinite(t)).sum())
        raise InputError(
            f"contains {bad} NaN or infinite value(s); refusing to merge a damaged checkpoint",
            model=inp.label,
            tensor=name,
        )

    def streamed(self, name: str, stats: dict[str, Any]) -> bool:
        """Whether the merge pass streams this tensor block by block."""
        blocked = BLOCKED_FUNCTIONS.get(self.recipe.merge_method)
        if blocked is None or not self.plan[name].is_float:
            return False
        stream = blocked(self.inputs_for(name, stats))
        if stream is None:
            return False
        stream.close()
        return True

    def float_tensors(self, phase: str) -> Iterator[TensorInputs]:
        """Every float tensor's inputs, for a statistics pass (read with ``blocks()``)."""
        for name in [n for n, p in self.plan.items() if p.is_float]:
            self.check_cancel()
            self.current_tensor = name
            yield self.inputs_for(name, {})
            self._advance(phase, name)

    def _advance(self, phase: str, name: str) -> None:
        self.tensors_done += 1
        self.bytes_done += self._input_bytes(name)
        self.report(
            Progress(
                phase, self.tensors_done, self.tensors_total, self.bytes_done, self.bytes_total
            )
        )

    def global_statistics(self) -> dict[str, Any]:
        if self.statistic is None:
            return {}
        return self.statistic.compute()

    # -- merging -----------------------------------------------------------------------------

    def merge_tensor(
        self, name: str, stats: dict[str, Any], writer: ShardedWriter, dtype: torch.dtype
    ) -> None:
        p = self.plan[name]
        self.current_tensor = name
        try:
            if not p.is_float:
                src = (
                    self.base
                    if self.base is not None
                    else next(m for m in self.models if name in m.reader)
                )
                writer.write(name, self._read(src, name).to(dtype))
            else:
                x = self.inputs_for(name, stats)
                if not x.has_base and x.count == 0:
                    raise InputError("no input has this tensor", tensor=name)
                blocked = BLOCKED_FUNCTIONS.get(self.recipe.merge_method)
                stream = blocked(x) if blocked is not None else None
                if stream is None:
                    out = self.fn(x)
                    self._check_output(x, out, dtype)
                    writer.write(name, out.cpu().to(dtype))
                else:
                    writer.begin(name)
                    for block in stream:
                        self._check_output(x, block, dtype)
                        # a copy: the method may reuse the block's buffer for the next one
                        writer.append(block.to("cpu", dtype, copy=True))
                    writer.end()
        except WeightsmithError as e:
            if e.tensor is None:
                e.tensor = name
            raise
        except Exception as e:
            if is_overflow(e):  # e.g. torch refusing a weight of 1e300 as a float32 scalar
                raise self.overflow_error(name) from None
            locate(e, tensor=name)  # the job's error names the tensor
            raise
        self._advance("merge", name)

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
        inputs = ([self.base] if x.has_base and self.base is not None else []) + [
            m for m in self.models if m.index in self.plan[x.name].holders
        ]
        for inp in inputs:
            if not _tensor_finite(inp, x.name):
                self._raise_not_finite(inp, x.name)
        raise self.overflow_error(x.name)

    def overflow_error(self, name: str | None) -> InputError:
        """The error for a merge whose arithmetic overflowed float32 (or produced NaN) on
        tensor ``name``: names the parameter and model responsible when one value alone is
        beyond float32's range, else the tensor and the parameters to check."""
        culprit = self._out_of_range_parameter(name) if name is not None else None
        if culprit is not None:
            field, model, value = culprit
            return InputError(
                f"{field.rsplit('.', 1)[-1]} = {value:g} is beyond float32's range "
                f"(±{_F32_MAX:.4g}), so the merge overflows; use a value of sensible size",
                field=field,
                model=model,
                tensor=name,
            )
        return InputError(
            "the merge overflowed float32 or produced NaN or infinite values (check weights, "
            "lambda and normalize)",
            tensor=name,
            field="parameters",
        )

    def _out_of_range_parameter(self, name: str) -> tuple[str, str | None, float] | None:
        """(recipe field, model or None, value) of the first parameter for tensor ``name``
        that no float32 can hold (|v| > 3.4e38, inf, NaN), or None."""

        def beyond(v: Any) -> bool:
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            return number and not abs(v) <= _F32_MAX

        for m in (m for m in self.models if m.index in self.plan[name].holders):
            own = m.entry_params or {}
            for key, value in self.model_params(m, name).items():
                if beyond(value):
                    if key in own:  # set on this model's entry
                        return f"{m.role}.parameters.{key}", m.label, float(value)
                    return f"parameters.{key}", None, float(value)  # set recipe-wide
        for key, value in self.shared_params(name).items():
            if beyond(value):
                return f"parameters.{key}", None, float(value)
        return None


def _tensor_finite(inp: _Input, name: str) -> bool:
    info = inp.reader.info(name)
    if not info.torch_dtype.is_floating_point:
        return True
    for start, stop in block_ranges(info.numel):
        t = inp.reader.read_into(name, start, torch.empty(stop - start, dtype=info.torch_dtype))
        if not all_finite(t):
            return False
    return True
