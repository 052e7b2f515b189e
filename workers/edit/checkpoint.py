"""The edited checkpoint on disk: written once the edit passed its gate (or is published
flagged), and reverted bit for bit.

Output directory of an edit:

- the parent's files (weights, index, config, tokenizer) with only the edited tensors'
  bytes changed in place (same header, same offsets, so unchanged shards are identical);
- ``edit/factors.safetensors``: ΔW = left · rightᵀ per request and layer (nn.Linear
  orientation) — enough to re-apply the edit to another revision of the model;
- ``edit/original.safetensors``: the edited tensors as they were, for an exact revert
  (W + ΔW − ΔW is not W in floating point);
- ``edit/history.safetensors``: the edit history, the parent's plus this edit (requests and
  keys per layer: ``workers.edit.history``), read by the next edit of this checkpoint;
- ``manifest.json`` (last, :func:`write_manifest`): recipe, parent, metrics, gate,
  covariance provenance and the sha256 of every file, the parent's files included.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import weightsmith
from infra.artifacts import folder_files
from infra.artifacts import write_manifest as write_manifest_file
from infra.storage.base import sha256_file
from schemas.edit_recipe import EditRecipe
from schemas.manifests import MANIFEST, MANIFEST_FORMAT, Manifest
from workers.edit.architectures import EditArchitecture
from workers.edit.history import EditHistory
from workers.edit.update import RankOneUpdate, layer_deltas
from workers.errors import InputError, WeightsmithError
from workers.sources import ResolvedModel
from workers.tensors import CheckpointReader

EDIT_DIR = "edit"
FACTORS = "factors.safetensors"
ORIGINAL = "original.safetensors"
PARENT_MANIFEST = "parent_manifest.json"


def check_out_dir(out: Path) -> None:
    """InputError unless ``out`` is absent or an empty directory (checked before any work)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output directory {str(out)!r} exists and is not empty")


def write_edited_checkpoint(
    out: Path,
    recipe: EditRecipe,
    resolved: ResolvedModel,
    arch: EditArchitecture,
    updates: list[RankOneUpdate],
    record: dict[str, Any],
    timings: Callable[[], dict[str, float]],
    *,
    history: EditHistory | None = None,
) -> dict[str, Any]:
    """Write the edited checkpoint to ``out`` through a staging directory renamed into place
    last (nothing is left behind on failure). ``record``: what the edit did (the manifest's
    first fields); ``timings()``: the run's timings as of the manifest; ``history``: the
    edit history to write beside the weights. Returns the manifest."""
    staging = _staging(out)
    try:
        parent_files = _copy_parent(resolved, staging)
        edited = _write_edited_tensors(staging, arch, updates, label=str(recipe.model))
        _write_factors(staging, arch, updates)
        if history is not None:
            history.write(staging)
        manifest = write_manifest(
            staging,
            record,
            recipe=recipe,
            resolved=resolved,
            edited_tensors=edited,
            parent_files=parent_files,
            timings=timings(),
        )
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def write_manifest(
    folder: Path,
    record: dict[str, Any],
    *,
    recipe: EditRecipe,
    resolved: ResolvedModel,
    edited_tensors: list[dict[str, str]],
    parent_files: list[dict[str, Any]],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The edit's ``manifest.json`` in ``folder``, written last and atomically: ``record``
    then the provenance (name, seed, code version, parent, recipe), the edited tensors, the
    parent's files, ``timings`` and the sha256 of every file in ``folder``. Strict JSON
    (non-finite metrics as null: the API serves it as is). Returns it."""
    manifest = Manifest.model_validate(
        json_safe(
            {
                **record,
                "format": MANIFEST_FORMAT,
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
                "edited_tensors": edited_tensors,
                "parent_files": parent_files,
                "timings": timings,
                "files": [f.model_dump() for f in folder_files(folder)],
            }
        )
    )
    return write_manifest_file(folder, manifest)


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
    check_out_dir(out)
    staging = _staging(out)
    try:
        for entry in manifest["parent_files"]:
            name = entry["path"]
            shutil.copyfile(edited / _stored_name(name), staging / name)
        with (
            CheckpointReader(staging, label=str(edited)) as reader,
            safe_open(str(edited / EDIT_DIR / ORIGINAL), framework="pt") as originals,
        ):
            restore = [(reader.info(n), originals.get_tensor(n)) for n in originals.keys()]  # noqa: SIM118
        for info, tensor in restore:
            _overwrite(info, tensor)
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


# ---------------------------------------------------------------------------------------------


def _stored_name(name: str) -> str:
    """Where a parent's file lives in the edited checkpoint (a parent's own manifest moves
    under ``edit/``: the edit's manifest takes its place)."""
    return f"{EDIT_DIR}/{PARENT_MANIFEST}" if name == MANIFEST else name


def _copy_parent(resolved: ResolvedModel, staging: Path) -> list[dict[str, Any]]:
    """The parent's files copied into ``staging``; their entries (path, size, sha256)."""
    entries = []
    for name in sorted(resolved.files):
        src = resolved.path / name
        dst = staging / _stored_name(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        entries.append({"path": name, "size": src.stat().st_size, "sha256": sha256_file(dst)})
    return entries


def _write_edited_tensors(
    staging: Path, arch: EditArchitecture, updates: list[RankOneUpdate], *, label: str
) -> list[dict[str, str]]:
    """W + ΔW written over each edited tensor's bytes in the copied parent (in its stored
    dtype), the tensors as they were saved to ``edit/original.safetensors``. Returns the
    edited tensors' (name, file) entries."""
    from safetensors.torch import save_file

    originals: dict[str, torch.Tensor] = {}
    touched = []
    with CheckpointReader(staging, label=label) as reader:
        for layer, delta in sorted(layer_deltas(updates).items()):
            name = arch.weight_name(layer)
            info = reader.info(name)
            w = reader.read(name)
            originals[name] = w
            # ΔW comes from the model's device; the parent's bytes are read on the CPU
            new = w.float() + arch.oriented(delta).to(w.device, torch.float32)
            touched.append((info, new.to(w.dtype)))
    for info, new in touched:
        _overwrite(info, new)
    (staging / EDIT_DIR).mkdir(exist_ok=True)
    save_file(originals, str(staging / EDIT_DIR / ORIGINAL), metadata={"format": "pt"})
    return [{"name": info.name, "file": info.file.name} for info, _ in touched]


def _write_factors(staging: Path, arch: EditArchitecture, updates: list[RankOneUpdate]) -> None:
    from safetensors.torch import save_file

    factors = {}
    for u in updates:
        factors[f"request{u.request}.layer{u.layer}.left"] = u.left.cpu().contiguous()
        factors[f"request{u.request}.layer{u.layer}.right"] = u.right.cpu().contiguous()
    layers = list(dict.fromkeys(u.layer for u in updates))
    save_file(
        factors,
        str(staging / EDIT_DIR / FACTORS),
        metadata={
            "format": "pt",
            "convention": "ΔW = left · rightᵀ in nn.Linear orientation [d_out, d_in]",
            "tensors": json.dumps({str(layer): arch.weight_name(layer) for layer in layers}),
            "transposed_on_disk": str(arch.transposed).lower(),
        },
    )


def _overwrite(info: Any, tensor: torch.Tensor) -> None:
    """A tensor's bytes written in place over ``info``'s (same dtype and shape)."""
    with info.file.open("r+b") as f:
        f.seek(info.start)
        f.write(bytes(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()))


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
