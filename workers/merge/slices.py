"""Layer slices (mergekit's ``slices``): output layers stacked from ranges of input layers.

Output layer k of slice i is merged from layer ``layer_range[0] + k`` of each of the
slice's sources; the slices' layers follow each other, renumbered from 0. The tensors
outside the layers are taken as mergekit takes them: those before the layers (embeddings)
from the first slice's sources with its parameters, those after (final norm, output head)
from the last slice's.

The engine merges a sliced recipe like any other: each source of each slice is one input
(:class:`SlicedReader`, a view of its model under the output's tensor names) that holds
only the tensors of its slice, so every output tensor has exactly its slice's sources as
inputs and the rest of the engine (plan, reading, streaming, checks) is unchanged. The
parameters of a tensor are resolved with its slice's settings at its position in the
slice (:class:`SliceLayout`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from schemas.recipe import MergeRecipe, OutputSlice, ParameterSetting, format_location
from workers.errors import InputError
from workers.sources import ResolvedModel
from workers.tensors.reader import CheckpointReader
from workers.tensors.safetensors_format import TensorInfo

# ``<prefix><index>.<rest>``: model.layers.3.mlp…, transformer.h.3.attn…, h.3.attn…
_LAYER = re.compile(
    r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block|layer)\.)(?P<index>\d+)\.(?P<rest>.+)$"
)
# Outside the layers: before them (embeddings) or after them (final norm, output head).
_BEFORE = ("embed", "wte.", "wpe.", "word_embeddings", "tok_embeddings", "position_embeddings")
_AFTER = ("norm", "ln_f.", "lm_head", "output.weight", "final_layer", "score.")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def split_layer(name: str) -> tuple[str, int, str] | None:
    """(prefix, layer index, rest) of a tensor inside a numbered layer, else None."""
    m = _LAYER.match(name)
    return (m["prefix"], int(m["index"]), m["rest"]) if m else None


def outside_position(name: str) -> str | None:
    """'before' or 'after' the layers for a tensor outside them, None if unknown."""
    if any(k in name for k in _BEFORE):
        return "before"
    if any(k in name for k in _AFTER):
        return "after"
    return None


class SlicedReader:
    """One source of one slice (or the base of every slice), read under the output's tensor
    names: a read-only view of the source models' readers that holds only the tensors this
    input gives."""

    def __init__(
        self, names: dict[str, tuple[CheckpointReader, str]], label: str, close: Callable[[], None]
    ) -> None:
        self.label = label
        self._source = names  # output name -> (the model's reader, its tensor name)
        self.names: list[str] = list(names)
        self._close = close

    def source_name(self, name: str) -> str:
        return self._source[name][1]

    def model_label(self, name: str) -> str:
        """The reference (as written) of the model tensor ``name`` comes from."""
        return str(self._source[name][0].label)

    def info(self, name: str) -> TensorInfo:
        reader, source = self._source[name]
        return reader.info(source)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._source

    def read(self, name: str) -> torch.Tensor:
        reader, source = self._source[name]
        return reader.read(source)

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        reader, source = self._source[name]
        return reader.read_into(source, start, out)

    def close(self) -> None:
        self._close()


@dataclass
class SliceLayout:
    """Where each output tensor comes from: its slice, and its position there for
    parameter gradients (k/(n−1) for output layer k of a slice of n layers, 1 for a
    one-layer slice, 0 outside the layers, as mergekit evaluates them)."""

    slices: list[OutputSlice]
    slice_of: dict[str, int] = field(default_factory=dict)
    position: dict[str, float] = field(default_factory=dict)
    layers: int = 0  # of the output
    config_updates: dict[str, Any] = field(default_factory=dict)

    def t(self, name: str) -> float:
        return self.position.get(name, 0.0)

    def slice_parameters(self, name: str) -> dict[str, ParameterSetting] | None:
        return self.slices[self.slice_of[name]].parameters


@dataclass
class SlicedInputs:
    """The inputs of a sliced merge: the base (a view over each slice's base source), one
    input per non-base source of each slice, and the layout."""

    base: tuple[SlicedReader, ResolvedModel, Any] | None  # the view, its model, reference
    models: list[tuple[str, dict[str, Any] | None, SlicedReader, ResolvedModel, Any]]
    layout: SliceLayout
    config_source: ResolvedModel


def open_sliced(
    recipe: MergeRecipe,
    open_model: Callable[[Any], tuple[ResolvedModel, Any]],
    read_config: Callable[[Path], dict[str, Any]],
) -> SlicedInputs:
    """Open every model the slices name once (``open_model``: its resolved location and a
    reader, one that applies the LoRA adapter of a BASE+ADAPTER reference) and build the
    views of each slice's sources."""
    assert recipe.slices is not None
    real: dict[str, tuple[ResolvedModel, CheckpointReader]] = {}
    users: dict[str, int] = {}

    def model(ref: Any) -> tuple[ResolvedModel, CheckpointReader]:
        key = str(ref)
        if key not in real:
            real[key] = open_model(ref)
        return real[key]

    def view(names: dict[str, tuple[Any, str]]) -> SlicedReader:
        keys = {str(ref) for ref, _ in names.values()}
        for key in keys:
            users[key] = users.get(key, 0) + 1

        def release() -> None:
            for key in keys:
                users[key] -= 1
                if users[key] == 0:
                    real[key][1].close()

        first = next(iter(names.values()))[0] if names else None
        label = str(first) if first is not None else ""
        return SlicedReader(
            {out: (model(ref)[1], src) for out, (ref, src) in names.items()}, label, release
        )

    try:
        built = _build(recipe, recipe.slices, model, view, read_config)
    except BaseException:
        for _, reader in real.values():
            reader.close()
        raise
    for key, (_, reader) in real.items():
        if users.get(key, 0) == 0:  # opened to survey it, but no tensor comes from it
            reader.close()
    return built


def _build(
    recipe: MergeRecipe,
    slices: list[OutputSlice],
    model: Callable[[Any], tuple[ResolvedModel, CheckpointReader]],
    view: Callable[[dict[str, tuple[Any, str]]], SlicedReader],
    read_config: Callable[[Path], dict[str, Any]],
) -> SlicedInputs:
    uses_base = recipe.method.uses_base
    first = slices[0]
    template_ref = (first.base_model or recipe.base_model) if uses_base else None
    template_ref = template_ref or first.sources[0].model
    template = model(template_ref)[0]
    layout = SliceLayout(list(slices))

    layered: dict[str, dict[int, dict[str, str]]] = {}  # model -> layer -> rest -> name
    outside: dict[str, dict[str, str]] = {}  # model -> name -> 'before' | 'after'
    counts: dict[str, int] = {}
    prefixes: dict[str, str] = {}  # model -> its layers' prefix ("model.layers.")

    def survey(ref: Any, at: tuple[str | int, ...]) -> None:
        key = str(ref)
        if key in layered:
            return
        resolved, reader = model(ref)
        by_layer: dict[int, dict[str, str]] = {}
        placed: dict[str, str] = {}
        for name in reader.names:
            parts = split_layer(name)
            if parts is not None:
                by_layer.setdefault(parts[1], {})[parts[2]] = name
                prefixes.setdefault(key, parts[0])
                continue
            where = outside_position(name)
            if where is None:
                raise InputError(
                    "cannot place this tensor in a sliced output: it is neither in a numbered "
                    "layer (…layers.N…, …h.N…, …blocks.N…) nor an embedding, final norm or "
                    "output head. Slices support decoder-only layouts such as Llama, Mistral, "
                    "Qwen2 and GPT-2; merge whole models (models:) for this architecture",
                    model=key,
                    tensor=name,
                    field=format_location(at),
                )
            placed[name] = where
        if not by_layer:
            raise InputError(
                "has no tensors in numbered layers (…layers.N…, …h.N…), so its layers cannot "
                "be sliced; merge whole models (models:) for this architecture",
                model=key,
                tensor=reader.names[0] if reader.names else None,
                field=format_location(at),
            )
        layered[key], outside[key] = by_layer, placed
        counts[key] = _layer_count(read_config(resolved.path)) or max(by_layer) + 1

    # the output's layers are named as the template's (the config's model) are
    template_at = next(j for j, src in enumerate(first.sources) if src.model == template_ref)
    survey(template_ref, ("slices", 0, "sources", template_at, "layer_range"))
    out_prefix = prefixes[str(template_ref)]

    offset = 0
    base_names: dict[str, tuple[Any, str]] = {}
    base_ref: Any = None
    models: list[tuple[str, dict[str, Any] | None, SlicedReader, ResolvedModel, Any]] = []
    for i, piece in enumerate(slices):
        slice_base = (piece.base_model or recipe.base_model) if uses_base else None
        n = piece.layers
        base_taken = False  # a base listed twice in a slice: the second is an input
        for j, src in enumerate(piece.sources):
            at = ("slices", i, "sources", j, "layer_range")
            survey(src.model, at)
            key = str(src.model)
            start, end = src.layer_range
            if end > counts[key]:
                raise InputError(
                    f"layer_range [{start}, {end}] reaches past the model's {counts[key]} "
                    f"layers (0 to {counts[key] - 1})",
                    model=key,
                    field=format_location(at),
                )
            names: dict[str, str] = {}
            for k in range(n):
                for rest, name in layered[key].get(start + k, {}).items():
                    out = f"{out_prefix}{offset + k}.{rest}"
                    names[out] = name
                    layout.slice_of[out] = i
                    layout.position[out] = k / (n - 1) if n > 1 else 1.0
            for name, where in outside[key].items():
                if (where == "before" and i == 0) or (where == "after" and i == len(slices) - 1):
                    names[name] = name
                    layout.slice_of[name] = i
                    layout.position[name] = 0.0
            if slice_base is not None and src.model == slice_base and not base_taken:
                base_names.update({out: (src.model, name) for out, name in names.items()})
                base_ref = base_ref or src.model
                base_taken = True
                continue
            resolved, _ = model(src.model)
            role = f"slices[{i}].sources[{j}]"
            sourced = {out: (src.model, name) for out, name in names.items()}
            models.append((role, src.parameters, view(sourced), resolved, src.model))
        offset += n
    layout.layers = offset
    layout.config_updates = _config_updates(read_config(template.path), slices, read_config, model)
    base = None
    if base_ref is not None:
        base = (view(base_names), model(base_ref)[0], base_ref)
    return SlicedInputs(base, models, layout, template)


def _layer_count(cfg: dict[str, Any]) -> int | None:
    for key in _LAYER_COUNT_KEYS:
        if isinstance(cfg.get(key), int) and not isinstance(cfg[key], bool) and cfg[key] > 0:
            return int(cfg[key])
    return None


def _config_updates(
    template: dict[str, Any],
    slices: list[OutputSlice],
    read_config: Callable[[Path], dict[str, Any]],
    model: Callable[[Any], tuple[ResolvedModel, CheckpointReader]],
) -> dict[str, Any]:
    """The output config's layer count, and its per-layer lists (``layer_types``, …) taken
    from each slice's first source at the layers the slice takes."""
    total = sum(s.layers for s in slices)
    key = next((k for k in _LAYER_COUNT_KEYS if k in template), "num_hidden_layers")
    updates: dict[str, Any] = {key: total}
    count = _layer_count(template)
    if count is None or count < 2:
        return updates
    for name, value in template.items():
        if not isinstance(value, list) or len(value) != count:
            continue
        merged: list[Any] = []
        for piece in slices:
            src = piece.sources[0]
            cfg = read_config(model(src.model)[0].path)
            values = cfg.get(name)
            src_count = _layer_count(cfg)
            if not isinstance(values, list) or len(values) != src_count:
                break  # not a per-layer list in this source: leave the key as it is
            start, end = src.layer_range
            merged += values[start:end]
        else:
            updates[name] = merged
    return updates
