"""LoRA extraction: a fine-tune as a PEFT LoRA adapter of its base, one tensor at a time.

For each tensor of the base, in checkpoint order, the worker reads it and the fine-tune's
tensor of the same name (two tensors in memory, never two models) and:

- a target module's weight (default: every 2-D weight inside the numbered decoder layers):
  ΔW = W_ft − W_base in float32 on the worker's device, a truncated SVD (workers/extract/
  svd.py) and the factors ``lora_A`` = √Σ·Vᵀ, ``lora_B`` = U·√Σ, stored under PEFT's keys
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` with ``lora_alpha = r``
  (scale 1), their relative error ‖ΔW − BA‖/‖ΔW‖ and kept energy recorded. GPT-2's Conv1D
  weights are stored (in, out): ΔWᵀ is decomposed and the config says ``fan_in_fan_out``.
- any other tensor the fine-tune changed (embeddings, lm_head, norms), as
  mergekit-extract-lora does with embeddings: saved whole in ``modules_to_save`` (the module's
  full name, so PEFT replaces exactly that module); with ``save_changed: false``, or when it
  cannot be saved (the bias of a target module), it is listed as not captured.

Rank: ``rank`` is clamped to min(rows, columns) of a smaller matrix (the clamped modules are in
``rank_pattern``); ``energy`` chooses each module's rank (``rank_pattern``/``alpha_pattern``
where it differs from the largest, which is ``r``). A module whose ΔW is exactly zero gets no
factors. The base and the fine-tune must have the same tensors with the same shapes (a
resized vocabulary cannot be an adapter: resize the base first); errors name the field, the
model and the tensor.

Output: ``adapter_config.json``, ``adapter_model.safetensors`` (factors then the saved
tensors, re-read from the fine-tune when written), a model card and the manifest (last),
with per-module rank, relative error and kept energy.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

import weightsmith
from schemas.lora_recipe import ExtractLoraRecipe
from schemas.references import ModelReference, ReferenceKind
from workers.errors import CancelledError, InputError
from workers.extract.svd import low_rank_factors, relative_error, tensor_seed
from workers.merge.inputs import TensorSource, open_reference, read_config
from workers.merge.plan import layer_of
from workers.merge.progress import Progress, ProgressCallback
from workers.publish.output import adapter_parents, manifest_parent, write_output_manifest
from workers.sources import ResolvedModel, SourceSettings
from workers.tensors.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PREFIX
from workers.tensors.safetensors_format import encode_header

__all__ = ["ExtractResult", "run_extract_lora"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Module names of input embeddings: saved whole, never decomposed (LoRA of an embedding has
# its own transposed layout in PEFT, lora_embedding_A/B).
_EMBEDDINGS = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "tok_embeddings")
_CONV1D_MODEL_TYPES = ("gpt2",)  # transformers' Conv1D stores weights as (in, out)
_LISTED = 3


@dataclass
class ExtractResult:
    out_dir: Path
    seed: int
    manifest: dict[str, Any]
    metrics: dict[str, Any]


@dataclass
class _Opened:
    resolved: ResolvedModel
    reader: TensorSource
    adapter: ResolvedModel | None
    label: str


def _open(
    ref: ModelReference,
    settings: SourceSettings,
    base_dir: Path | None,
    resolved: dict[str, ResolvedModel],
) -> _Opened:
    r, reader, adapter = open_reference(ref, settings, base_dir, resolved, label=str(ref))
    return _Opened(r, reader, adapter, str(ref))


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _matches(module: str, target: str) -> bool:
    return module == target or module.endswith(f".{target}")


def _is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in _EMBEDDINGS


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(repr(n) for n in names[:_LISTED]) + more


def _targets(recipe: ExtractLoraRecipe, base: TensorSource) -> set[str]:
    """The base tensors decomposed into LoRA factors (weights of 2-D float matrices)."""

    def linear(name: str) -> bool:
        info = base.info(name)
        shape_ok = len(info.shape) == 2 and info.torch_dtype.is_floating_point
        return name.endswith(".weight") and shape_ok

    if recipe.target_modules is None:
        return {n for n in base.names if linear(n) and layer_of(n) is not None}
    chosen: set[str] = set()
    for i, target in enumerate(recipe.target_modules):
        found = [n for n in base.names if n.endswith(".weight") and _matches(_module(n), target)]
        if not found:
            modules = sorted({_module(n) for n in base.names if linear(n)})
            raise InputError(
                f"{target!r} matches no module of the base (a name matches a module that is "
                f"it or ends with '.{target}'; 2-D weights: {_listed(modules)})",
                field=f"target_modules[{i}]",
                model=str(recipe.base),
            )
        for n in found:
            if _is_embedding(_module(n)):
                raise InputError(
                    f"{target!r} names the embedding {_module(n)!r}: embeddings are not "
                    "decomposed; a changed embedding is saved whole in modules_to_save",
                    field=f"target_modules[{i}]",
                    tensor=n,
                )
            if not linear(n):
                info = base.info(n)
                raise InputError(
                    f"{target!r} matches {n!r} of shape {info.shape} and dtype {info.dtype}; "
                    "only 2-D float weights (linear layers) are decomposed",
                    field=f"target_modules[{i}]",
                    tensor=n,
                )
        chosen.update(found)
    return chosen


def _check_tensors(base: _Opened, model: _Opened) -> None:
    """The two checkpoints have the same tensors with the same shapes."""
    have, want = set(model.reader.names), set(base.reader.names)
    missing = sorted(want - have)
    if missing:
        raise InputError(
            f"the fine-tune lacks {len(missing)} tensor(s) of the base: {_listed(missing)}; "
            "model and base must be the same architecture",
            field="model",
            model=model.label,
            tensor=missing[0],
        )
    extra = sorted(have - want)
    if extra:
        raise InputError(
            f"the fine-tune has {len(extra)} tensor(s) the base lacks: {_listed(extra)}; an "
            "adapter can only change tensors the base has",
            field="model",
            model=model.label,
            tensor=extra[0],
        )
    for name in base.reader.names:
        a, b = base.reader.info(name).shape, model.reader.info(name).shape
        if a != b:
            hint = (
                " (the fine-tune resized the vocabulary; an adapter cannot change the base's "
                "shapes: resize the base's embeddings first)"
                if _is_embedding(_module(name)) or "lm_head" in name
                else ""
            )
            raise InputError(
                f"shape {b} differs from the base's {a}{hint}",
                field="model",
                model=model.label,
                tensor=name,
            )


def _is_conv1d(base: _Opened) -> bool:
    return read_config(base.resolved.path).get("model_type") in _CONV1D_MODEL_TYPES


def run_extract_lora(
    recipe: ExtractLoraRecipe,
    out_dir: Path,
    *,
    device: str = "cpu",
    sources: SourceSettings | None = None,
    base_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
    resolved: dict[str, ResolvedModel] | None = None,
    started: float | None = None,
) -> ExtractResult:
    """Extract the adapter per ``recipe`` into ``out_dir`` (which must not exist or be
    empty); on any failure nothing is left there. ``resolved``: references already fetched
    (the service's worker); ``started``: ``time.perf_counter()`` when the work began."""
    from workers.devices import resolve_device
    from workers.publish.output import StagedOutput

    t0 = time.perf_counter() if started is None else started
    out_dir = Path(out_dir)
    output = StagedOutput(out_dir)
    staging = output.path
    dev = resolve_device(device)
    settings = sources or SourceSettings()
    report = progress or (lambda _p: None)
    is_cancelled = cancelled or (lambda: False)
    opened: list[_Opened] = []
    try:
        report(Progress("resolve", 0, 0, 0, 0))
        base = _open(recipe.base, settings, base_dir, resolved or {})
        opened.append(base)
        model = _open(recipe.model, settings, base_dir, resolved or {})
        opened.append(model)
        timings = {"resolve_s": time.perf_counter() - t0}
        _check_tensors(base, model)
        targets = _targets(recipe, base.reader)
        t1 = time.perf_counter()
        extraction = _Extraction(recipe, base, model, targets, _is_conv1d(base), dev)
        extraction.run(report, is_cancelled)
        timings["extract_s"] = time.perf_counter() - t1
        report(Progress("publish", *extraction.counts()))
        t2 = time.perf_counter()
        staging.mkdir(parents=True)
        extraction.write(staging)
        timings["publish_s"] = time.perf_counter() - t2
        timings["total_s"] = time.perf_counter() - t0
        manifest = _write_manifest(staging, recipe, base, model, extraction.metrics(), timings)
        output.publish()
        return ExtractResult(out_dir, recipe.seed, manifest, manifest["metrics"])
    except BaseException:
        output.discard()
        raise
    finally:
        for o in opened:
            o.reader.close()


@dataclass
class _Module:
    """One decomposed module: its factors (CPU, output dtype) and what they kept."""

    tensor: str
    a: torch.Tensor
    b: torch.Tensor
    shape: tuple[int, int]
    rank: int
    relative_error: float
    kept_energy: float
    delta_norm: float
    svd: str


class _Extraction:
    """The streaming pass over the base's tensors, and the adapter it yields."""

    def __init__(
        self,
        recipe: ExtractLoraRecipe,
        base: _Opened,
        model: _Opened,
        targets: set[str],
        conv1d: bool,
        device: torch.device,
    ) -> None:
        self.recipe = recipe
        self.base = base
        self.model = model
        self.targets = targets
        self.conv1d = conv1d
        self.device = device
        self.modules: dict[str, _Module] = {}
        self.unchanged: list[str] = []
        self.saved: list[str] = []  # tensors saved whole (their modules: modules_to_save)
        self.not_captured: list[dict[str, Any]] = []
        self.done = 0
        self.bytes_done = 0
        self.total = len(base.reader.names)
        self.bytes_total = sum(
            base.reader.info(n).nbytes + model.reader.info(n).nbytes for n in base.reader.names
        )
        self.residual_sq = 0.0  # Σ ‖ΔW − BA‖² and Σ ‖ΔW‖² over the decomposed modules
        self.delta_sq = 0.0

    def counts(self) -> tuple[int, int, int, int]:
        return self.done, self.total, self.bytes_done, self.bytes_total

    def run(self, report: ProgressCallback, is_cancelled: Callable[[], bool]) -> None:
        target_modules = {_module(n) for n in self.targets}
        for name in self.base.reader.names:
            if is_cancelled():
                raise CancelledError("the job was cancelled")
            if name in self.targets:
                self._decompose(name)
            else:
                self._compare(name, target_modules)
            self.done += 1
            self.bytes_done += (
                self.base.reader.info(name).nbytes + self.model.reader.info(name).nbytes
            )
            report(Progress("extract", *self.counts()))

    def _read(self, src: _Opened, name: str) -> torch.Tensor:
        return src.reader.read(name).to(self.device, torch.float32)

    def _decompose(self, name: str) -> None:
        delta = self._read(self.model, name) - self._read(self.base, name)
        if not torch.isfinite(delta).all():
            raise InputError(
                "ΔW = model − base has non-finite values (inf or NaN in a checkpoint)",
                field="model",
                model=self.model.label,
                tensor=name,
            )
        module = _module(name)
        if not bool(delta.any()):
            self.unchanged.append(module)
            return
        if self.conv1d:
            delta = delta.T  # stored (in, out): PEFT's factors are of the (out, in) matrix
        r = self.recipe
        f = low_rank_factors(
            delta,
            rank=r.rank,
            energy=r.energy,
            max_rank=r.max_rank,
            method=r.svd,
            power_iterations=r.power_iterations,
            seed=tensor_seed(r.seed, name),
        )
        dtype = _DTYPES[r.dtype] if r.dtype else self.model.reader.info(name).torch_dtype
        a, b = f.a.to(dtype).contiguous(), f.b.to(dtype).contiguous()
        err = relative_error(delta, a, b)
        norm_sq = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
        self.delta_sq += norm_sq
        self.residual_sq += (err**2) * norm_sq
        self.modules[module] = _Module(
            tensor=name,
            a=a.cpu(),
            b=b.cpu(),
            shape=(int(delta.shape[0]), int(delta.shape[1])),
            rank=f.rank,
            relative_error=err,
            kept_energy=f.kept_energy,
            delta_norm=math.sqrt(norm_sq),
            svd=f.method,
        )

    def _compare(self, name: str, target_modules: set[str]) -> None:
        base_t = self.base.reader.read(name)
        model_t = self.model.reader.read(name)
        if base_t.dtype == model_t.dtype and torch.equal(base_t, model_t):
            return
        if base_t.is_floating_point() and model_t.is_floating_point():
            b64, m64 = base_t.double(), model_t.double()
            norm = float(torch.linalg.vector_norm(b64))
            change = float(torch.linalg.vector_norm(m64 - b64)) / norm if norm else math.inf
            if change == 0.0:
                return  # the same values in another dtype
        else:
            change = math.inf
        module = _module(name)
        reason = None
        if module in target_modules:
            reason = "belongs to a decomposed module (PEFT LoRA has no bias term)"
        elif not self.recipe.save_changed:
            reason = "save_changed is false"
        elif not model_t.is_floating_point():
            reason = "not a float tensor"
        if reason is None:
            self.saved.append(name)
        else:
            self.not_captured.append(
                {"tensor": name, "relative_change": _finite(change), "reason": reason}
            )

    # -- the adapter -----------------------------------------------------------------------

    def ranks(self) -> tuple[int, dict[str, int]]:
        """(r, rank_pattern): r the largest rank, the pattern the modules below it. Keys
        are full module names, anchored as PEFT matches them (``(.*\\.)?key$``)."""
        if not self.modules:
            return (self.recipe.rank or 1), {}
        r = max(m.rank for m in self.modules.values())
        return r, {k: m.rank for k, m in sorted(self.modules.items()) if m.rank != r}

    def modules_to_save(self) -> list[str]:
        return sorted({_module(n) for n in self.saved})

    def config(self) -> dict[str, Any]:
        r, pattern = self.ranks()
        base = self.base.resolved.pinned
        if base.kind is ReferenceKind.HUB or base.kind is ReferenceKind.LOCAL:
            base_name = base.location
        else:
            base_name = str(base)
        names = sorted({m.rsplit(".", 1)[-1] for m in self.modules})
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_name,
            "revision": self.base.resolved.revision if base.kind is ReferenceKind.HUB else None,
            "r": r,
            "lora_alpha": r,  # scale lora_alpha / r = 1: B·A is ΔW itself
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": names,
            "modules_to_save": self.modules_to_save() or None,
            "fan_in_fan_out": self.conv1d,
            "use_rslora": False,
            "lora_dropout": 0.0,
            "bias": "none",
            "inference_mode": True,
            "init_lora_weights": True,
        }

    def write(self, staging: Path) -> None:
        """adapter_config.json and adapter_model.safetensors: the factors, then each saved
        tensor re-read from the fine-tune (one at a time)."""
        if not self.modules and not self.saved:
            raise InputError(
                "the fine-tune does not differ from the base in any tensor this extraction "
                "keeps: there is no adapter to write",
                field="model",
                model=self.model.label,
            )
        (staging / ADAPTER_CONFIG).write_text(json.dumps(self.config(), indent=2) + "\n")
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for module, m in sorted(self.modules.items()):
            entries.append((f"{KEY_PREFIX}{module}.lora_A.weight", m.a.dtype, tuple(m.a.shape)))
            entries.append((f"{KEY_PREFIX}{module}.lora_B.weight", m.b.dtype, tuple(m.b.shape)))
        infos = {n: self.model.reader.info(n) for n in self.saved}
        for n in self.saved:
            entries.append((f"{KEY_PREFIX}{n}", infos[n].torch_dtype, tuple(infos[n].shape)))
        with open(staging / ADAPTER_WEIGHTS, "wb") as fh:
            fh.write(encode_header(entries, {"format": "pt"}))
            for _, m in sorted(self.modules.items()):
                _write_tensor(fh, m.a)
                _write_tensor(fh, m.b)
            for n in self.saved:
                _write_tensor(fh, self.model.reader.read(n).to(infos[n].torch_dtype))
        (staging / "README.md").write_text(self._model_card())

    def metrics(self) -> dict[str, Any]:
        mods = self.modules.values()
        errors = [m.relative_error for m in mods]
        r, pattern = self.ranks()
        return {
            "modules": {
                module: {
                    "rank": m.rank,
                    "shape": list(m.shape),
                    "relative_error": _finite(m.relative_error),
                    "kept_energy": m.kept_energy,
                    "svd": m.svd,
                }
                for module, m in sorted(self.modules.items())
            },
            "summary": {
                "decomposed_modules": len(self.modules),
                "r": r,
                "ranks_differ": bool(pattern),
                "max_relative_error": _finite(max(errors)) if errors else 0.0,
                "mean_relative_error": _finite(sum(errors) / len(errors)) if errors else 0.0,
                "total_relative_error": _finite(math.sqrt(self.residual_sq / self.delta_sq))
                if self.delta_sq
                else 0.0,
                "min_kept_energy": min((m.kept_energy for m in mods), default=1.0),
                "parameters": sum(m.a.numel() + m.b.numel() for m in mods),
            },
            "unchanged_modules": sorted(self.unchanged),
            "modules_to_save": self.modules_to_save(),
            "saved_tensors": list(self.saved),
            "not_captured": self.not_captured,
        }

    def _model_card(self) -> str:
        base = self.base.resolved.pinned
        front = {
            "base_model": base.location if base.kind is ReferenceKind.HUB else str(base),
            "library_name": "peft",
            "tags": ["lora", "weightsmith", "extract_lora"],
        }
        s = self.metrics()["summary"]
        return "\n".join(
            [
                "---",
                yaml.safe_dump(front, sort_keys=False).rstrip(),
                "---",
                "",
                f"# {self.recipe.output.name or 'LoRA extracted from ' + self.model.label}",
                "",
                f"A PEFT LoRA adapter of `{self.base.label}` extracted from `{self.model.label}` "
                f"by weightsmith {weightsmith.__version__} (truncated SVD of each ΔW). "
                f"{s['decomposed_modules']} modules, r = {s['r']}, relative error "
                f"‖ΔW − BA‖/‖ΔW‖ at most {s['max_relative_error']:.3g}; per module in "
                "manifest.json.",
                "",
            ]
        )


def _write_tensor(fh: Any, t: torch.Tensor) -> None:
    if t.numel():
        fh.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _write_manifest(
    staging: Path,
    recipe: ExtractLoraRecipe,
    base: _Opened,
    model: _Opened,
    metrics: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    parents = [manifest_parent("base", base.resolved), manifest_parent("model", model.resolved)]
    parents += adapter_parents((o.resolved, o.adapter) for o in (base, model))
    return write_output_manifest(
        staging,
        kind="extract_lora",
        name=recipe.output.name or f"LoRA of {recipe.model} over {recipe.base}",
        recipe=recipe,
        seed=recipe.seed,
        parents=parents,
        metrics=metrics,
        timings=timings,
    )
