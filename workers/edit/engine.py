"""Run an edit recipe end to end: resolve the model, compute the update, measure it, gate
it, write the edited checkpoint; and revert an edited checkpoint bit for bit.

Output directory of an edit:

- the parent's files (weights, index, config, tokenizer) with only the edited tensors'
  bytes changed in place (same header, same offsets, so unchanged shards are identical);
- ``edit/factors.safetensors``: ΔW = left · rightᵀ per request and layer (nn.Linear
  orientation) — enough to re-apply the edit to another revision of the model;
- ``edit/original.safetensors``: the edited tensors as they were, for an exact revert
  (W + ΔW − ΔW is not W in floating point);
- ``manifest.json`` (last): recipe, parent, metrics, gate, covariance provenance and the
  sha256 of every file, the parent's files included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import weightsmith
from schemas.edit_recipe import EditRecipe
from workers.edit.algebra import delta_from_factors, relative_norm
from workers.edit.architectures import (
    EditArchitecture,
    apply_delta,
    architecture_for,
    default_layers,
    default_mom2_update_weight,
    num_layers,
)
from workers.edit.covariance import (
    CovarianceCache,
    LocalCovarianceCache,
    covariances,
    default_cache_dir,
    sampled_corpus,
    text_corpus,
)
from workers.edit.memit import memit_edit
from workers.edit.metrics import evaluate, probe
from workers.edit.rome import RankOneUpdate, rome_edit
from workers.edit.templates import context_templates
from workers.edit.values import ValueSettings
from workers.errors import CancelledError, InputError, WeightsmithError
from workers.publish.output import sha256_file
from workers.sources import ResolvedModel, SourceSettings, resolve_reference
from workers.tensors import CheckpointReader

MANIFEST = "manifest.json"
EDIT_DIR = "edit"
FACTORS = "factors.safetensors"
ORIGINAL = "original.safetensors"
PARENT_MANIFEST = "parent_manifest.json"


class EditGateError(WeightsmithError):
    """The edit broke a safety-gate threshold; nothing was written. ``metrics`` says how."""

    def __init__(self, message: str, metrics: dict[str, Any]) -> None:
        super().__init__(message)
        self.metrics = metrics


@dataclass
class EditResult:
    out_dir: Path | None
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    gate_passed: bool
    updates: list[RankOneUpdate] = field(default_factory=list)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output directory {str(out)!r} exists and is not empty")


def _staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _publish(staging: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty, checked before
    staging.rename(out)


def _file_entries(root: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            rel = f.relative_to(root).as_posix()
            out.append({"path": rel, "size": f.stat().st_size, "sha256": sha256_file(f)})
    return out


def _value_settings(recipe: EditRecipe, depth: int) -> ValueSettings:
    h = recipe.hyperparameters
    loss_layer = h.v_loss_layer
    if loss_layer is not None and loss_layer >= depth:
        raise InputError(
            f"layer {loss_layer} does not exist: the model has {depth} layers (0–{depth - 1})",
            field="hyperparameters.v_loss_layer",
        )
    return ValueSettings(
        steps=h.v_num_grad_steps,
        lr=h.v_lr,
        weight_decay=h.v_weight_decay,
        kl_factor=h.kl_factor,
        clamp_factor=recipe.clamp_norm_factor,
        early_stop_loss=h.v_early_stop_loss,
        loss_layer=None if loss_layer in (None, depth - 1) else loss_layer,
    )


def _edit_layers(recipe: EditRecipe, depth: int) -> list[int]:
    layers = recipe.hyperparameters.layers or default_layers(recipe.edit_method, depth)
    bad = [x for x in layers if x >= depth]
    if bad:
        raise InputError(
            f"layer(s) {bad} do not exist: the model has {depth} layers (0–{depth - 1})",
            field="hyperparameters.layers",
        )
    return layers


def _corpus(
    recipe: EditRecipe,
    model: Any,
    tokenizer: Any,
    base_dir: Path | None,
    corpus_files: Sequence[Path] | None,
) -> Any:
    cov = recipe.covariance
    if cov.source == "model_samples":
        return sampled_corpus(model, tokenizer, seed=cov.seed, max_length=cov.max_length)
    if corpus_files is not None:  # fetched by the service (s3://, artifact://, local)
        return text_corpus(tokenizer, corpus_files, max_length=cov.max_length, labels=cov.paths)
    files = []
    for i, p in enumerate(cov.paths):
        if "://" in p:
            raise InputError(
                f"{p!r} resolves only inside the weightsmith service (submit the recipe as a "
                "job) or use a local path",
                field=f"covariance.paths[{i}]",
            )
        path = Path(p).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise InputError(f"no such text file: {path}", field=f"covariance.paths[{i}]")
        files.append(path)
    return text_corpus(tokenizer, files, max_length=cov.max_length)


def model_revision(resolved: ResolvedModel) -> str:
    """The hub commit, or a digest of the local weight files' content."""
    if resolved.revision:
        return f"{resolved.pinned.location}@{resolved.revision}"
    h = hashlib.sha256()
    for name in sorted(resolved.files):
        if name.endswith((".safetensors", ".bin", ".json")) and "token" not in name:
            h.update(name.encode() + b"\0" + sha256_file(resolved.path / name).encode())
    return "sha256:" + h.hexdigest()


def _load(resolved: ResolvedModel, label: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot load the model with transformers (an edit needs config.json and the "
            f"tokenizer next to the weights): {str(e).splitlines()[0]}",
            model=label,
        ) from e
    return model.eval(), tokenizer


def run_edit(
    recipe: EditRecipe,
    out: Path | None,
    *,
    base_dir: Path | None = None,
    sources: SourceSettings | None = None,
    cache: CovarianceCache | None = None,
    resolved: ResolvedModel | None = None,
    revision: str | None = None,
    corpus_files: Sequence[Path] | None = None,
    progress: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> EditResult:
    """Edit, measure, gate and (when ``out`` is given) write the edited checkpoint.

    The service passes what it already fetched: ``resolved`` (the model), ``revision`` (its
    identity for the covariance cache; default :func:`model_revision`) and ``corpus_files``
    (the covariance text files of ``covariance.paths``, in order). ``progress(phase)`` is
    called as each phase starts; ``cancelled()`` is checked between phases, corpus batches
    and MEMIT requests (raises CancelledError).

    Raises EditGateError when the gate fails and the recipe says ``on_gate_failure: fail``.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def phase(name: str) -> None:
        if cancelled is not None and cancelled():
            raise CancelledError("the job was cancelled")
        if progress is not None:
            progress(name)

    if out is not None:
        _check_out_dir(out)
    label = str(recipe.model)
    phase("load")
    if resolved is None:
        resolved = resolve_reference(recipe.model, sources or SourceSettings(), base_dir=base_dir)
    model, tokenizer = _load(resolved, label)
    arch = architecture_for(model.config, model=label)
    depth = num_layers(arch, model.config)
    layers = _edit_layers(recipe, depth)
    values = _value_settings(recipe, depth)
    h = recipe.hyperparameters
    timings["load_s"] = time.perf_counter() - started

    phase("templates")
    t = time.perf_counter()
    templates = context_templates(model, tokenizer, h.context_template_counts, recipe.seed)
    timings["templates_s"] = time.perf_counter() - t

    t = time.perf_counter()
    C: dict[int, torch.Tensor] = {}
    cov_records: list[dict[str, Any]] = []
    revision = revision or model_revision(resolved)
    if recipe.edit_method == "memit" or h.mom2_adjustment:
        phase("covariance")
        d_in = _weight_in_features(model, arch, layers[0])
        tokens = recipe.covariance.tokens or 10 * d_in
        corpus = _corpus(recipe, model, tokenizer, base_dir, corpus_files)
        C, cov_records = covariances(
            model, arch, layers, corpus, tokens,
            model_revision=revision,
            cache=cache if cache is not None else LocalCovarianceCache(default_cache_dir()),
            model_label=label,
            cancelled=cancelled,
        )  # fmt: skip
    timings["covariance_s"] = time.perf_counter() - t

    phase("probe")
    t = time.perf_counter()
    before = probe(model, tokenizer, recipe.requests)
    originals = {
        layer: model.get_submodule(arch.module_name(layer)).weight.detach().clone()
        for layer in layers
    }
    timings["probe_s"] = time.perf_counter() - t

    phase("edit")
    t = time.perf_counter()
    lam: float | None = None  # MEMIT's λ
    if recipe.edit_method == "rome":
        layer = layers[0]
        update = rome_edit(
            model, tokenizer, arch, recipe.requests[0], layer,
            C.get(layer) if h.mom2_adjustment else None,
            templates, values, h.key_mode, sufficient_loss=h.sufficient_loss,
            edit_margin=h.edit_margin, target_true=before.targets_true[0],
        )  # fmt: skip
        updates = [update]
        apply_delta(model, arch, layer, delta_from_factors(update.left, update.right))
    else:
        lam = h.mom2_update_weight or default_mom2_update_weight(
            _weight_in_features(model, arch, layers[0])
        )
        updates = memit_edit(
            model, tokenizer, arch, recipe.requests, layers, C, templates, values,
            lam, cancelled=cancelled,
        )  # fmt: skip
    timings["edit_s"] = time.perf_counter() - t

    phase("metrics")
    t = time.perf_counter()
    metrics = evaluate(model, tokenizer, recipe.requests, before)
    deltas = _layer_deltas(updates)
    metrics["relative_update_norm"] = {
        str(layer): relative_norm(deltas[layer], _linear(originals[layer], arch))
        for layer in sorted(deltas)
    }
    metrics["denominator"] = [u.denominator for u in updates if recipe.edit_method == "rome"]
    metrics["relative_denominator"] = [
        u.relative_denominator for u in updates if recipe.edit_method == "rome"
    ]
    metrics["v_steps"] = sorted({u.request: u.steps for u in updates}.items())
    if recipe.edit_method == "rome":
        metrics["update_scale"] = [u.scale for u in updates]
    if lam is not None:
        metrics["mom2_update_weight"] = lam
    timings["metrics_s"] = time.perf_counter() - t

    failures = gate_failures(recipe, metrics)
    metrics["gate"] = {"passed": not failures, "failures": failures}
    if failures and recipe.on_gate_failure == "fail":
        raise EditGateError(
            "the edit failed the safety gate (nothing was written): " + "; ".join(failures),
            metrics,
        )
    manifest: dict[str, Any] = {
        "format": "weightsmith.manifest/1",
        "kind": "edit",
        "method": recipe.edit_method,
        "flagged": bool(failures),
        "metrics": metrics,
        "layers": layers,
        "architecture": arch.name,
        "context_templates": templates,
        "covariance": cov_records,
        "model_revision": revision,
    }
    if out is not None:
        phase("write")
        t = time.perf_counter()
        timings["write_s"] = 0.0
        manifest = _write_edit(recipe, resolved, arch, updates, out, manifest, timings, started)
        timings["write_s"] = time.perf_counter() - t
    manifest["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return EditResult(out, manifest, metrics, not failures, updates)


def _weight_in_features(model: Any, arch: EditArchitecture, layer: int) -> int:
    w = model.get_submodule(arch.module_name(layer)).weight
    return int(w.shape[0] if arch.transposed else w.shape[1])


def _linear(w: torch.Tensor, arch: EditArchitecture) -> torch.Tensor:
    return w.T if arch.transposed else w


def _layer_deltas(updates: list[RankOneUpdate]) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for u in updates:
        d = delta_from_factors(u.left, u.right)
        out[u.layer] = out[u.layer] + d if u.layer in out else d
    return out


def gate_failures(recipe: EditRecipe, metrics: dict[str, Any]) -> list[str]:
    """The thresholds the edit breaks, each as 'metric value > bound'."""
    g = recipe.gate
    failures = []
    ratio = metrics["perplexity_ratio"]
    if not ratio <= g.max_perplexity_ratio:
        failures.append(f"perplexity ratio {ratio:.4f} > {g.max_perplexity_ratio}")
    bound = recipe.max_relative_update
    for layer, r in metrics["relative_update_norm"].items():
        if not r <= bound:
            failures.append(f"layer {layer}: ‖ΔW‖/‖W‖ {r:.4f} > {bound}")
    for d in metrics.get("relative_denominator", []):
        if not abs(d) >= g.min_denominator:
            failures.append(f"|uᵀk|/‖k‖ {abs(d):.2e} < {g.min_denominator}")
    return failures


def _write_edit(
    recipe: EditRecipe,
    resolved: ResolvedModel,
    arch: EditArchitecture,
    updates: list[RankOneUpdate],
    out: Path,
    manifest: dict[str, Any],
    timings: dict[str, float],
    started: float,
) -> dict[str, Any]:
    from safetensors.torch import save_file

    staging = _staging(out)
    try:
        parent_files = []
        for name in sorted(resolved.files):
            src = resolved.path / name
            dst = staging / (f"{EDIT_DIR}/{PARENT_MANIFEST}" if name == MANIFEST else name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            parent_files.append(
                {"path": name, "size": src.stat().st_size, "sha256": sha256_file(dst)}
            )
        deltas = _layer_deltas(updates)
        originals: dict[str, torch.Tensor] = {}
        touched = []
        with CheckpointReader(staging, label=str(recipe.model)) as reader:
            for layer, delta in sorted(deltas.items()):
                name = arch.weight_name(layer)
                info = reader.info(name)
                w = reader.read(name)
                originals[name] = w
                d = delta.T if arch.transposed else delta
                new = (w.float() + d).to(w.dtype)
                touched.append((info, new))
        for info, new in touched:
            with info.file.open("r+b") as f:
                f.seek(info.start)
                f.write(_tensor_bytes(new))
        (staging / EDIT_DIR).mkdir(exist_ok=True)
        factors = {}
        for u in updates:
            factors[f"request{u.request}.layer{u.layer}.left"] = u.left.contiguous()
            factors[f"request{u.request}.layer{u.layer}.right"] = u.right.contiguous()
        save_file(
            factors,
            str(staging / EDIT_DIR / FACTORS),
            metadata={
                "format": "pt",
                "convention": "ΔW = left · rightᵀ in nn.Linear orientation [d_out, d_in]",
                "tensors": json.dumps({str(layer): arch.weight_name(layer) for layer in deltas}),
                "transposed_on_disk": str(arch.transposed).lower(),
            },
        )
        save_file(originals, str(staging / EDIT_DIR / ORIGINAL), metadata={"format": "pt"})
        timings["total_s"] = time.perf_counter() - started
        manifest = {
            **manifest,
            "name": recipe.output.name or f"{recipe.edit_method} edit of {recipe.model}",
            "seed": recipe.seed,
            "code_version": weightsmith.__version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "parents": [
                {
                    "role": "base",
                    "reference": str(resolved.reference),
                    "pinned": str(resolved.pinned),
                    "revision": resolved.revision,
                }
            ],
            "recipe": recipe.model_dump(mode="json", exclude_none=True),
            "edited_tensors": [{"name": info.name, "file": info.file.name} for info, _ in touched],
            "parent_files": parent_files,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "files": _file_entries(staging),
        }
        manifest = json_safe(manifest)  # strict JSON: the API serves it as is
        tmp = staging / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
        tmp.rename(staging / MANIFEST)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def json_safe(value: Any) -> Any:
    """``value`` with NaN and ±inf (a metric with nothing to measure, e.g. paraphrase
    without paraphrase prompts; MEMIT's undefined denominators) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def revert_edit(edited: Path, out: Path) -> dict[str, Any]:
    """Write the parent of an edited checkpoint to ``out``, bit for bit (verified against
    the sha256 the edit recorded). Returns the edit's manifest."""
    from safetensors import safe_open

    manifest_path = edited / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(
            f"{edited} is not an edited checkpoint: cannot read {MANIFEST}: {e}"
        ) from e
    if manifest.get("kind") != "edit":
        raise InputError(f"{edited} is not an edited checkpoint (manifest kind is not 'edit')")
    _check_out_dir(out)
    staging = _staging(out)
    try:
        for entry in manifest["parent_files"]:
            name = entry["path"]
            src = edited / (f"{EDIT_DIR}/{PARENT_MANIFEST}" if name == MANIFEST else name)
            shutil.copyfile(src, staging / name)
        with (
            CheckpointReader(staging, label=str(edited)) as reader,
            safe_open(str(edited / EDIT_DIR / ORIGINAL), framework="pt") as originals,
        ):
            restore = [(reader.info(n), originals.get_tensor(n)) for n in originals.keys()]  # noqa: SIM118
        for info, tensor in restore:
            with info.file.open("r+b") as f:
                f.seek(info.start)
                f.write(_tensor_bytes(tensor))
        for entry in manifest["parent_files"]:
            got = sha256_file(staging / entry["path"])
            if got != entry["sha256"]:
                raise WeightsmithError(
                    f"reverted file differs from the original (sha256 {got[:12]}… ≠ "
                    f"{entry['sha256'][:12]}…)",
                    file=entry["path"],
                )
        _publish(staging, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        raise
    return dict(manifest)
