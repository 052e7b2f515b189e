"""The input models of a merge: the base and the fine-tuned models, resolved and opened.

Their tensors are read by workers/merge/reading.py. A ``BASE+ADAPTER`` input is opened as
its base checkpoint with the LoRA adapter applied as each tensor is read
(workers/tensors/lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.recipe import MergeRecipe
from schemas.references import ModelReference
from workers.sources import ResolvedModel, SourceSettings, resolve_reference
from workers.tensors.lora import LoraCheckpointReader
from workers.tensors.reader import CheckpointReader


@dataclass
class InputModel:
    """One input model: its recipe role, resolved location and open reader."""

    role: str  # "base" or f"models[{i}]"
    entry_params: dict[str, Any] | None
    resolved: ResolvedModel  # the checkpoint (of BASE+ADAPTER: BASE)
    reader: CheckpointReader | LoraCheckpointReader
    index: int | None  # position among fine-tuned models (None for the base)
    adapter: ResolvedModel | None = None  # of BASE+ADAPTER: the LoRA adapter

    @property
    def label(self) -> str:
        if self.adapter is not None:
            return f"{self.resolved.reference}+{self.adapter.reference}"
        return str(self.resolved.reference)


def resolve(
    ref: ModelReference,
    settings: SourceSettings,
    base_dir: Path | None,
    resolved: dict[str, ResolvedModel],
) -> ResolvedModel:
    if str(ref) in resolved:
        return resolved[str(ref)]
    return resolve_reference(ref, settings, base_dir=base_dir)


def open_inputs(
    recipe: MergeRecipe,
    settings: SourceSettings,
    base_dir: Path | None,
    resolved: dict[str, ResolvedModel],
) -> list[InputModel]:
    """The base (when the method uses one) and the fine-tuned models, opened for reading."""
    out: list[InputModel] = []
    try:
        if recipe.base_model is not None and recipe.method.needs_base:
            entry = recipe.base_entry
            out.append(
                _open_input(
                    "base",
                    recipe.base_model,
                    entry.parameters if entry else None,
                    None,
                    recipe,
                    settings,
                    base_dir,
                    resolved,
                )
            )
        fine = {id(e) for e in recipe.fine_tuned}
        index = 0
        for pos, entry in enumerate(recipe.models):
            if id(entry) not in fine:
                continue
            out.append(
                _open_input(
                    f"models[{pos}]",
                    entry.model,
                    entry.parameters,
                    index,
                    recipe,
                    settings,
                    base_dir,
                    resolved,
                )
            )
            index += 1
    except BaseException:
        for inp in out:
            inp.reader.close()
        raise
    return out


def _open_input(
    role: str,
    ref: ModelReference,
    params: dict[str, Any] | None,
    index: int | None,
    recipe: MergeRecipe,
    settings: SourceSettings,
    base_dir: Path | None,
    resolved: dict[str, ResolvedModel],
) -> InputModel:
    """One input: its checkpoint opened, with its LoRA adapter applied for BASE+ADAPTER."""
    r = resolve(ref.base, settings, base_dir, resolved)
    reader = _open_reader(r, recipe)
    if ref.adapter is None:
        return InputModel(role, params, r, reader, index)
    try:
        adapter = resolve(ref.adapter, settings, base_dir, resolved)
        lora = LoraCheckpointReader(reader, adapter.path, label=f"{r.reference}+{ref.adapter}")
    except BaseException:
        reader.close()
        raise
    return InputModel(role, params, r, lora, index, adapter)


def _open_reader(r: ResolvedModel, recipe: MergeRecipe) -> CheckpointReader:
    return CheckpointReader(r.path, label=str(r.reference), allow_pickle=recipe.allow_pickle)


def tokenizer_source(
    recipe: MergeRecipe,
    inputs: list[InputModel],
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
    return resolve(src, settings, base_dir, resolved).path
