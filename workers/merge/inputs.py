"""The input models of a merge: the base and the fine-tuned models, resolved and opened.

Their tensors are read by workers/merge/reading.py. A ``BASE+ADAPTER`` input is opened as
its base checkpoint with the LoRA adapter applied as each tensor is read
(workers/tensors/lora.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from schemas.recipe import MergeRecipe
from schemas.references import ModelReference
from workers.errors import InputError
from workers.sources import ResolvedModel, SourceSettings, resolve_reference
from workers.tensors.lora import LoraCheckpointReader
from workers.tensors.reader import CheckpointReader

if TYPE_CHECKING:
    import torch

    from workers.merge.slices import SliceLayout
    from workers.tensors.safetensors_format import TensorInfo


class TensorSource(Protocol):
    """What the engine reads an input's tensors through: a checkpoint's reader, or a view
    of one under other names (a slice's source, workers/merge/slices.py)."""

    label: str
    names: list[str]

    def info(self, name: str) -> TensorInfo: ...
    def __contains__(self, name: object) -> bool: ...
    def read(self, name: str) -> torch.Tensor: ...
    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor: ...
    def close(self) -> None: ...


@dataclass
class InputModel:
    """One input model: its recipe role, resolved location and open reader."""

    role: str  # "base", f"models[{i}]" or f"slices[{i}].sources[{j}]"
    entry_params: dict[str, Any] | None
    resolved: ResolvedModel  # the checkpoint (of BASE+ADAPTER: BASE)
    reader: TensorSource
    index: int | None  # position among fine-tuned models (None for the base)
    adapter: ResolvedModel | None = None  # of BASE+ADAPTER: the LoRA adapter

    @property
    def label(self) -> str:
        if self.adapter is not None:
            return f"{self.resolved.reference}+{self.adapter.reference}"
        return str(self.resolved.reference)

    def source_name(self, name: str) -> str:
        """The input's own name of output tensor ``name`` (they differ in a slice's
        source, whose layers are renumbered)."""
        source_name = getattr(self.reader, "source_name", None)
        return name if source_name is None else str(source_name(name))


def resolve(
    ref: ModelReference,
    settings: SourceSettings,
    base_dir: Path | None,
    resolved: dict[str, ResolvedModel],
) -> ResolvedModel:
    if str(ref) in resolved:
        return resolved[str(ref)]
    return resolve_reference(ref, settings, base_dir=base_dir)


def open_reference(
    ref: ModelReference,
    settings: SourceSettings,
    base_dir: Path | None,
    resolved: dict[str, ResolvedModel],
    *,
    label: str | None = None,
    allow_pickle: bool = False,
) -> tuple[ResolvedModel, TensorSource, ResolvedModel | None]:
    """The checkpoint of ``ref`` opened for reading; for BASE+ADAPTER the adapter's ΔW is
    added as each tensor is read. Returns (the base's resolution, the reader, the adapter's
    resolution or None). ``label``: how the reader names the input in errors (default
    ``BASE+ADAPTER`` as resolved)."""
    r = resolve(ref.base, settings, base_dir, resolved)
    reader = CheckpointReader(r.path, label=str(r.reference), allow_pickle=allow_pickle)
    if ref.adapter is None:
        return r, reader, None
    try:
        adapter = resolve(ref.adapter, settings, base_dir, resolved)
        lora = LoraCheckpointReader(
            reader, adapter.path, label=label or f"{r.reference}+{ref.adapter}"
        )
    except BaseException:
        reader.close()
        raise
    return r, lora, adapter


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
        if recipe.base_as_model and recipe.base_model is not None:
            # merged as one more model, with the top-level parameters (schemas/recipe.py)
            out.append(
                _open_input(
                    "base_model",
                    recipe.base_model,
                    None,
                    index,
                    recipe,
                    settings,
                    base_dir,
                    resolved,
                )
            )
    except BaseException:
        for inp in out:
            inp.reader.close()
        raise
    return out


@dataclass
class OpenedInputs:
    inputs: list[InputModel]
    layout: SliceLayout | None  # for a sliced recipe
    config_source: ResolvedModel  # whose config.json the output's is made from
    parents: list[ResolvedModel]  # every model read from, each once, the base first


def open_merge_inputs(
    recipe: MergeRecipe,
    settings: SourceSettings,
    base_dir: Path | None,
    resolved: dict[str, ResolvedModel],
) -> OpenedInputs:
    """The inputs of a merge, whole models or slices, opened for reading."""
    if recipe.slices is None:
        inputs = open_inputs(recipe, settings, base_dir, resolved)
        base = next((i for i in inputs if i.role == "base"), None)
        return OpenedInputs(
            inputs, None, (base or inputs[0]).resolved, [i.resolved for i in inputs]
        )
    from workers.merge.slices import open_sliced

    adapters: dict[str, ResolvedModel] = {}

    def open_model(ref: ModelReference) -> tuple[ResolvedModel, TensorSource]:
        opened = _open_input("", ref, None, None, recipe, settings, base_dir, resolved)
        if opened.adapter is not None:
            adapters[str(ref)] = opened.adapter
        return opened.resolved, opened.reader

    sliced = open_sliced(recipe, open_model, read_config)
    out: list[InputModel] = []
    if sliced.base is not None:
        reader, r, ref = sliced.base
        out.append(InputModel("base", None, r, reader, None, adapters.get(str(ref))))
    for index, (role, params, reader, r, ref) in enumerate(sliced.models):
        out.append(InputModel(role, params, r, reader, index, adapters.get(str(ref))))
    parents: dict[str, ResolvedModel] = {}
    for inp in out:
        parents.setdefault(str(inp.resolved.reference), inp.resolved)
    return OpenedInputs(out, sliced.layout, sliced.config_source, list(parents.values()))


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"config.json is not valid JSON: {e}", file=str(cfg_path)) from None
    return data if isinstance(data, dict) else {}


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
    r, reader, adapter = open_reference(
        ref, settings, base_dir, resolved, allow_pickle=recipe.allow_pickle
    )
    return InputModel(role, params, r, reader, index, adapter)


def tokenizer_source(
    recipe: MergeRecipe,
    inputs: list[InputModel],
    settings: SourceSettings,
    base_dir: Path | None,
    resolved: dict[str, ResolvedModel],
) -> Path | None:
    """The folder the output's tokenizer comes from: a model the tokenizer plan names, else
    the base (the first model without one)."""
    src = recipe.vocabulary.source if recipe.vocabulary is not None else None
    if not isinstance(src, ModelReference):
        first = next((i for i in inputs if i.role == "base"), inputs[0] if inputs else None)
        return first.resolved.path if first else None
    assert isinstance(src, ModelReference)
    for i in inputs:
        if i.resolved.reference == src:
            return i.resolved.path
    return resolve(src, settings, base_dir, resolved).path
