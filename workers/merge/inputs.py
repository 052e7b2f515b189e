"""The input models of a merge: the base and the fine-tuned models, resolved and opened.

Their tensors are read by workers/merge/reading.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.recipe import MergeRecipe
from schemas.references import ModelReference
from workers.sources import ResolvedModel, SourceSettings, resolve_reference
from workers.tensors.reader import CheckpointReader


@dataclass
class InputModel:
    """One input model: its recipe role, resolved location and open reader."""

    role: str  # "base" or f"models[{i}]"
    entry_params: dict[str, Any] | None
    resolved: ResolvedModel
    reader: CheckpointReader
    index: int | None  # position among fine-tuned models (None for the base)

    @property
    def label(self) -> str:
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
        if recipe.base_model is not None and recipe.method.uses_base:
            entry = recipe.base_entry
            r = resolve(recipe.base_model, settings, base_dir, resolved)
            out.append(
                InputModel(
                    "base", entry.parameters if entry else None, r, _open_reader(r, recipe), None
                )
            )
        fine = {id(e) for e in recipe.fine_tuned}
        index = 0
        for pos, entry in enumerate(recipe.models):
            if id(entry) not in fine:
                continue
            r = resolve(entry.model, settings, base_dir, resolved)
            reader = _open_reader(r, recipe)
            out.append(InputModel(f"models[{pos}]", entry.parameters, r, reader, index))
            index += 1
    except BaseException:
        for inp in out:
            inp.reader.close()
        raise
    return out


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
