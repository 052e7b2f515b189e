"""Run an edit recipe end to end, in named phases:

1. **load**: resolve and load the model, check its layer indices; with ``layers: auto`` a
   **trace** step follows (``workers.edit.causal_trace``: the layers where the causal
   effect of the MLP at the subject's last token peaks), then the settings
   (:class:`EditSettings`) are resolved;
2. **compute**: context templates, the keys' covariances (when the method needs them), the
   pre-edit probe, the method's update, applied to the loaded model;
3. **measure**: the metrics of the edited model against the probe;
4. **gate**: the safety thresholds (a failure raises, or flags the output);
5. **write**: the edited checkpoint and its manifest (``workers.edit.checkpoint``).

The method-specific steps go through the method's entry in ``workers.edit.methods``; this
module has no branch on the method's name.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from infra.artifacts import input_manifest
from infra.storage.base import sha256_file
from schemas.edit_recipe import EditRecipe
from schemas.manifests import MANIFEST
from workers.devices import resolve_device
from workers.edit.algebra import relative_norm
from workers.edit.architectures import EditModel, architecture_for
from workers.edit.causal_trace import (
    LocalTraceCache,
    TraceCache,
    TraceSettings,
    choose_layers,
    default_trace_cache_dir,
)
from workers.edit.checkpoint import check_out_dir, write_edited_checkpoint
from workers.edit.covariance import (
    CovarianceCache,
    CovarianceProgress,
    LocalCovarianceCache,
    covariances,
    default_cache_dir,
    feeding_hashes,
    recipe_corpus,
)
from workers.edit.history import EditHistory, read_history
from workers.edit.methods import edit_method
from workers.edit.metrics import Probe, evaluate, probe
from workers.edit.settings import EditSettings, check_layers
from workers.edit.templates import context_templates
from workers.edit.update import EditContext, EditMethod, RankOneUpdate, layer_deltas
from workers.errors import CancelledError, InputError, WeightsmithError
from workers.sources import ResolvedModel, SourceSettings, resolve_reference

__all__ = [
    "EditGateError",
    "EditResult",
    "gate_failures",
    "load_dtype",
    "load_model",
    "model_revision",
    "run_edit",
]


class EditGateError(WeightsmithError):
    """The edit broke a safety-gate threshold; nothing was written. ``metrics`` says how."""

    def __init__(self, message: str, metrics: dict[str, Any]) -> None:
        super().__init__(message)
        self.metrics = metrics


@dataclass
class EditResult:
    """What run_edit did: the manifest (written to ``out_dir``, or only returned when there
    is none), its metrics, whether the gate passed, and the rank-one updates."""

    out_dir: Path | None
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    gate_passed: bool
    updates: list[RankOneUpdate] = field(default_factory=list)


def run_edit(
    recipe: EditRecipe,
    out: Path | None,
    *,
    base_dir: Path | None = None,
    sources: SourceSettings | None = None,
    cache: CovarianceCache | None = None,
    trace_cache: TraceCache | None = None,
    resolved: ResolvedModel | None = None,
    revision: str | None = None,
    corpus_files: Sequence[Path] | None = None,
    progress: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    covariance_progress: Callable[[CovarianceProgress], None] | None = None,
    loaded: EditModel | None = None,
    started: float | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> EditResult:
    """Edit, measure, gate and (when ``out`` is given) write the edited checkpoint.

    ``started``: the ``time.perf_counter()`` at which the work began (a job's attempt, its
    downloads included), from which the manifest's ``timings.total_s`` counts; default now.

    The service passes what it already fetched: ``resolved`` (the model), ``revision`` (its
    identity for the covariance cache; default :func:`model_revision`) and ``corpus_files``
    (the covariance text files of ``covariance.paths``, in order). ``loaded``: the model of
    ``resolved`` already loaded (:func:`load_model`), for callers that edit one model many
    times; its weights are restored bit for bit before this returns. ``progress(phase)`` is
    called as each phase starts; ``covariance_progress`` as the covariance phase samples
    and counts tokens (:class:`CovarianceProgress`). ``cancelled()`` is checked between
    phases, before every decoder layer's forward pass (sampling, statistics, v*
    optimisation, probes, metrics), between slices of the covariance statistic, corpus
    batches and MEMIT requests (raises CancelledError; the weights are restored).

    With ``layers: auto`` a "trace" phase after "load" chooses the layers
    (``workers.edit.causal_trace``), its prompts' traces kept in ``trace_cache`` (default:
    a local directory, :func:`~workers.edit.causal_trace.default_trace_cache_dir`).

    ``device``: where the edit computes (``auto``, ``cpu``, ``cuda``, ``cuda:N``;
    ``workers.devices.resolve_device``), checked before any work; the model is loaded there in
    ``dtype``, default :func:`load_dtype` (float32 on the CPU, the stored dtype on a GPU).
    Every tensor the edit makes follows the model's device. Both are ignored for ``loaded``,
    which computes where and as it was loaded.

    Raises EditGateError when the gate fails and the recipe says ``on_gate_failure: fail``.
    """
    phases = _Phases(progress, cancelled, started)
    compute_device = resolve_device(device)
    if out is not None:
        check_out_dir(out)
    method = edit_method(recipe.edit_method)
    with phases.step("load"):
        if resolved is None:
            resolved = resolve_reference(
                recipe.model, sources or SourceSettings(), base_dir=base_dir
            )
        target = loaded or load_model(
            resolved, str(recipe.model), device=compute_device, dtype=dtype
        )
        method.check_model(target)
        check_layers(recipe, target.depth)  # before any work, the trace's included
        history = read_history(resolved.path, model=str(recipe.model))
        history.check(target, model=str(recipe.model))
        revision = revision or model_revision(resolved)
    choice = None
    h = recipe.hyperparameters
    if h.layers == "auto":
        with phases.step("trace"):
            choice = choose_layers(
                target,
                recipe.requests,
                TraceSettings(h.trace_samples, h.trace_noise, recipe.seed),
                method.layers_at,
                model_revision=revision,
                cache=trace_cache if trace_cache is not None else _default_trace_cache(),
                cancelled=phases.cancelled,
            )
    settings = EditSettings.from_recipe(
        recipe, target, method, choice.layers if choice is not None else None
    )
    with target.restored(settings.layers) as originals, target.cancel_points(cancelled):
        computed = _compute(
            recipe,
            method,
            target,
            settings,
            phases,
            resolved=resolved,
            revision=revision,
            cache=cache,
            base_dir=base_dir,
            corpus_files=corpus_files,
            covariance_progress=covariance_progress,
            history=history,
        )
        metrics = _measure(recipe, method, target, settings, computed, originals, phases)
    metrics["layers"] = list(settings.layers)
    metrics["layer_choice"] = _layer_choice(recipe)
    metrics["causal_trace"] = choice.record() if choice is not None else None
    failures = _gate(recipe, metrics)
    history = history.extended(recipe.edit_method, recipe.requests, computed.updates)
    record = _edit_record(recipe, target, settings, computed, metrics, failures)
    record["edit_history"] = history.summary()
    if out is None:
        manifest = {**record, "timings": phases.rounded()}
        return EditResult(None, manifest, metrics, not failures, computed.updates)
    with phases.step("write"):
        manifest = write_edited_checkpoint(
            out,
            recipe,
            resolved,
            target.arch,
            computed.updates,
            record,
            phases.so_far,
            history=history,
        )
    manifest["timings"] = phases.rounded()
    return EditResult(out, manifest, metrics, not failures, computed.updates)


# ---- load ------------------------------------------------------------------------------------


def load_model(
    resolved: ResolvedModel,
    label: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> EditModel:
    """The model on ``device`` in ``dtype`` (default :func:`load_dtype`) with its tokenizer
    and architecture row; InputError naming the model when transformers cannot load it or
    its architecture is not editable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = torch.device(device)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(resolved.path), dtype=dtype if dtype is not None else load_dtype(device)
        )
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot load the model with transformers (an edit needs config.json and the "
            f"tokenizer next to the weights): {str(e).splitlines()[0]}",
            model=label,
        ) from e
    if dtype is None and model.dtype not in COMPUTE_DTYPES:
        model = model.float()  # stored in float64 or an integer format: compute in float32
    model = model.to(device)  # type: ignore[arg-type]  # (transformers' stubs want a model)
    return EditModel(model.eval(), tokenizer, architecture_for(model.config, model=label))


# The dtypes the model under edit computes in (the precision policy: docs/editing.md, "On a
# GPU"). Statistics and solves do not follow the model: C is accumulated in float32, the
# update's solves run in float64, keys, values and log-probabilities are read out in float32.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_dtype(device: torch.device) -> torch.dtype | str:
    """The dtype the model under edit is loaded in on ``device``: float32 on the CPU (CPU
    kernels in bf16/fp16 are slow, and float32 keeps results as they always were), the
    stored dtype ("auto": bf16 or fp16 as the checkpoint has it) on a GPU, so that a 7B
    model takes 14 GB rather than 28."""
    return torch.float32 if device.type == "cpu" else "auto"


def _default_trace_cache() -> TraceCache:
    return LocalTraceCache(default_trace_cache_dir())


def _layer_choice(recipe: EditRecipe) -> str:
    """How the edited layers were set: "auto" (causal trace), "fixed" (a list), or
    "default" (null: the method's default layers, ROME layer 1, MEMIT and AlphaEdit the
    published band scaled to the depth)."""
    layers = recipe.hyperparameters.layers
    return "auto" if layers == "auto" else "default" if layers is None else "fixed"


def model_revision(resolved: ResolvedModel) -> str:
    """The hub commit, or a digest of the local weight files' content."""
    if resolved.revision:
        return f"{resolved.pinned.location}@{resolved.revision}"
    h = hashlib.sha256()
    for name in sorted(resolved.files):
        if name.endswith((".safetensors", ".bin", ".json")) and "token" not in name:
            h.update(name.encode() + b"\0" + sha256_file(resolved.path / name).encode())
    return "sha256:" + h.hexdigest()


# ---- compute ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Computed:
    """What the compute phase produced: the update and what it was computed from."""

    context: EditContext
    revision: str
    covariance_records: list[dict[str, Any]]
    before: Probe
    updates: list[RankOneUpdate]


def _compute(
    recipe: EditRecipe,
    method: EditMethod,
    target: EditModel,
    settings: EditSettings,
    phases: _Phases,
    *,
    resolved: ResolvedModel,
    revision: str,
    cache: CovarianceCache | None,
    base_dir: Path | None,
    corpus_files: Sequence[Path] | None,
    covariance_progress: Callable[[CovarianceProgress], None] | None = None,
    history: EditHistory | None = None,
) -> _Computed:
    """Templates, covariances, the pre-edit probe, then the method's update, applied to
    ``target`` in place. ``history``: the input model's edit history (AlphaEdit's Kₚ).

    Each C is keyed by the tensors feeding its layer's key (hashed from the stored files);
    a ``model_samples`` corpus is the one the parent edit used when ``resolved`` is an
    edited checkpoint whose samples are kept, else the model's own."""
    model, tokenizer = target.model, target.tokenizer
    h = recipe.hyperparameters
    with phases.step("templates"):
        templates = context_templates(model, tokenizer, h.context_template_counts, recipe.seed)
    C: dict[int, torch.Tensor] = {}
    records: list[dict[str, Any]] = []
    needed = method.needs_covariance(settings)
    with phases.step("covariance", report=needed):
        if needed:
            cov = recipe.covariance
            corpus = recipe_corpus(
                cov,
                model,
                tokenizer,
                base_dir=base_dir,
                corpus_files=corpus_files,
                sampler=revision,
                parents=parent_samples(resolved),
            )
            C, records = covariances(
                model,
                target.arch,
                settings.layers,
                corpus,
                cov.tokens or 10 * target.key_width(settings.layers[0]),
                model_revision=revision,
                feeds=feeding_hashes(
                    resolved.path, target.arch, model.config, settings.layers, phases.cancelled
                ),
                cache=cache if cache is not None else LocalCovarianceCache(default_cache_dir()),
                model_label=str(recipe.model),
                cancelled=phases.cancelled,
                progress=covariance_progress,
            )
    # a cached C comes from the CPU: the update's solves run where the model is
    context = EditContext(
        templates,
        {layer: c.to(target.device) for layer, c in C.items()},
        history or EditHistory.empty(),
    )
    with phases.step("probe"):
        before = probe(model, tokenizer, recipe.requests)
    with phases.step("edit"):
        updates = method.update(
            target,
            recipe.requests,
            settings,
            context,
            targets_true=before.targets_true,
            cancelled=phases.cancelled,
        )
    return _Computed(context, revision, records, before, updates)


def parent_samples(resolved: ResolvedModel) -> tuple[tuple[str, str], ...]:
    """(sampler revision, content hash) of the kept ``model_samples`` corpus whose C made
    ``resolved``, when it is an edited checkpoint (its ``manifest.json`` of kind "edit"
    records them): its edits keep counting the same tokens, so the C of layers the edit did
    not feed stay cache hits. The manifest is in the folder (a local edited checkpoint) or
    beside it (an ``artifact://`` input the worker downloaded)."""
    for path in (resolved.path / MANIFEST, input_manifest(resolved.path)):
        try:
            manifest = json.loads(path.read_text())
            break
        except (OSError, ValueError):
            continue
    else:
        return ()
    if not isinstance(manifest, dict) or manifest.get("kind") != "edit":
        return ()
    samples = manifest.get("covariance_samples")
    if not isinstance(samples, dict):
        return ()
    sampler, digest = samples.get("sampler"), samples.get("corpus_hash")
    return ((sampler, digest),) if isinstance(sampler, str) and isinstance(digest, str) else ()


# ---- measure ---------------------------------------------------------------------------------


def _measure(
    recipe: EditRecipe,
    method: EditMethod,
    target: EditModel,
    settings: EditSettings,
    computed: _Computed,
    originals: dict[int, torch.Tensor],
    phases: _Phases,
) -> dict[str, Any]:
    """The metrics of the edited model (``workers.edit.metrics``), ‖ΔW‖/‖W‖ per layer
    against the ``originals`` weights, and the method's own metrics."""
    with phases.step("metrics"):
        metrics = evaluate(target.model, target.tokenizer, recipe.requests, computed.before)
        deltas = layer_deltas(computed.updates)
        metrics["relative_update_norm"] = {
            str(layer): relative_norm(deltas[layer], target.arch.oriented(originals[layer]))
            for layer in sorted(deltas)
        }
        metrics.update(method.metrics(computed.updates, settings))
        metrics.update(computed.context.notes)
        metrics["earlier_edits"] = len(computed.context.history.edits)
    return metrics


# ---- gate ------------------------------------------------------------------------------------


def gate_checks(recipe: EditRecipe, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Every threshold of the gate against its value: ``{metric, value, bound, kind, passed}``
    with ``kind`` "max" (the value may not exceed the bound) or "min" (it may not fall below).
    The perplexity ratio, ‖ΔW‖/‖W‖ of each edited layer, and ROME's |uᵀk|/‖k‖ per request."""
    g = recipe.gate
    checks: list[dict[str, Any]] = []

    def check(metric: str, value: float, bound: float, kind: str) -> None:
        ok = value <= bound if kind == "max" else value >= bound  # NaN fails either way
        checks.append(
            {"metric": metric, "value": value, "bound": bound, "kind": kind, "passed": ok}
        )

    check("perplexity_ratio", metrics["perplexity_ratio"], g.max_perplexity_ratio, "max")
    bound = recipe.max_relative_update
    for layer, r in metrics["relative_update_norm"].items():
        check(f"relative_update_norm.{layer}", r, bound, "max")
    for i, d in enumerate(metrics.get("relative_denominator", [])):
        check(f"relative_denominator.{i}", abs(d), g.min_denominator, "min")
    return checks


def _failure_text(c: dict[str, Any]) -> str:
    metric, value, bound = c["metric"], c["value"], c["bound"]
    if metric == "perplexity_ratio":
        return f"perplexity ratio {value:.4f} > {bound}"
    if metric.startswith("relative_update_norm."):
        return f"layer {metric.split('.', 1)[1]}: ‖ΔW‖/‖W‖ {value:.4f} > {bound}"
    return f"|uᵀk|/‖k‖ {value:.2e} < {bound}"


def gate_failures(recipe: EditRecipe, metrics: dict[str, Any]) -> list[str]:
    """The thresholds the edit breaks, each as 'metric value > bound'."""
    return [_failure_text(c) for c in gate_checks(recipe, metrics) if not c["passed"]]


def _gate(recipe: EditRecipe, metrics: dict[str, Any]) -> list[str]:
    """The gate's result, recorded in ``metrics["gate"]`` (passed, the failures as text, and
    every check with its bound, which the console charts); EditGateError when the failures
    stop the edit (``on_gate_failure: fail``)."""
    checks = gate_checks(recipe, metrics)
    failures = [_failure_text(c) for c in checks if not c["passed"]]
    metrics["gate"] = {"passed": not failures, "failures": failures, "checks": checks}
    if failures and recipe.on_gate_failure == "fail":
        raise EditGateError(
            "the edit failed the safety gate (nothing was written): " + "; ".join(failures),
            metrics,
        )
    return failures


# ---- write -----------------------------------------------------------------------------------


def _edit_record(
    recipe: EditRecipe,
    target: EditModel,
    settings: EditSettings,
    computed: _Computed,
    metrics: dict[str, Any],
    failures: list[str],
) -> dict[str, Any]:
    """What the edit did: the manifest's first fields, returned even when nothing is
    written."""
    return {
        "format": "weightsmith.manifest/1",
        "kind": "edit",
        "method": recipe.edit_method,
        "flagged": bool(failures),
        "metrics": metrics,
        "layers": list(settings.layers),
        "layer_choice": _layer_choice(recipe),
        "causal_trace": metrics["causal_trace"],
        "architecture": target.arch.name,
        "context_templates": computed.context.templates,
        "covariance": computed.covariance_records,
        # where the model_samples tokens counted into C are kept (the next edit reuses them)
        "covariance_samples": next(
            (
                {**r["corpus_samples"], "corpus_hash": r["corpus_hash"]}
                for r in computed.covariance_records
                if r.get("corpus_samples")
            ),
            None,
        ),
        "model_revision": computed.revision,
        "compute": {
            "device": str(target.device),
            "dtype": str(target.dtype).removeprefix("torch."),
        },
    }


# ---- phases ----------------------------------------------------------------------------------


class _Phases:
    """Progress, cancellation and timings of run_edit's steps: ``progress(name)`` as a step
    starts, ``cancelled()`` checked before it, its duration as ``{name}_s``."""

    def __init__(
        self,
        progress: Callable[[str], None] | None,
        cancelled: Callable[[], bool] | None,
        started: float | None = None,
    ) -> None:
        self._progress = progress
        self.cancelled = cancelled
        self._started = time.perf_counter() if started is None else started
        self._running: tuple[str, float] | None = None
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str, *, report: bool = True) -> Iterator[None]:
        """A timed step; with ``report`` a phase of the job's progress (cancel checked)."""
        if report:
            if self.cancelled is not None and self.cancelled():
                raise CancelledError("the job was cancelled")
            if self._progress is not None:
                self._progress(name)
        started = time.perf_counter()
        self._running = (name, started)
        yield
        self._running = None
        self.timings[f"{name}_s"] = time.perf_counter() - started

    def so_far(self) -> dict[str, float]:
        """The timings as of now, the running step's so far and ``total_s`` (since the run
        started) included: what the manifest records."""
        now = time.perf_counter()
        if self._running is not None:
            name, started = self._running
            self.timings[f"{name}_s"] = now - started
        self.timings["total_s"] = now - self._started
        return self.rounded()

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.timings.items()}
