"""A second, simple implementation of mergekit's ``slices``, on top of the reference merge.

Written from mergekit's description of slices (docs/recipes.md), independently of
workers/merge/slices.py: each slice is cut out of its sources as a checkpoint of its own
(the layers of ``layer_range`` renumbered from 0, every tensor outside the layers kept),
merged as a whole-model recipe by :func:`reference_merge` (the source's ``parameters`` as
the model's, the slice's over the top level's: gradients then run over the slice's layers),
and the results are stacked: the slices' layers one after the other, the tensors before
the layers (embeddings) from the first slice, those after them (final norm, head) from the
last.

Limits: local references; methods whose random draws depend on a model's position or a
tensor's name (DARE, DELLA) draw differently here, so compare deterministic methods only;
filters that name a layer number see the renumbered names.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tests.support.reference_merge import load_checkpoint, load_config, local_path, reference_merge

_LAYER = re.compile(r"^(.*?(?:layers|h)\.)(\d+)(\..+)$")
_BEFORE = ("embed", "wte", "wpe")


def _cut(path: Path, start: int, end: int, dest: Path) -> None:
    """The checkpoint at ``path`` with only layers [start, end), renumbered from 0."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in load_checkpoint(path).items():
        m = _LAYER.match(name)
        if m is None:
            tensors[name] = t
        elif start <= int(m.group(2)) < end:
            tensors[f"{m.group(1)}{int(m.group(2)) - start}{m.group(3)}"] = t
    dest.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"))
    config = load_config(path)
    for key in ("num_hidden_layers", "n_layer"):
        if key in config:
            config[key] = end - start
    (dest / "config.json").write_text(json.dumps(config))


def reference_sliced_merge(
    recipe: dict[str, Any], seed: int | None = None
) -> dict[str, torch.Tensor]:
    """Merge a recipe with ``slices`` in memory; tensor name → output tensor."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    slices = recipe["slices"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, piece in enumerate(slices):
            models = []
            base = piece.get("base_model") or recipe.get("base_model")
            cut_base = None
            for j, src in enumerate(piece["sources"]):
                start, end = src["layer_range"]
                dest = Path(tmp) / f"s{i}" / f"m{j}"
                _cut(local_path(src["model"]), start, end, dest)
                if (
                    base is not None
                    and cut_base is None
                    and local_path(src["model"]) == local_path(base)
                ):
                    cut_base = dest
                entry: dict[str, Any] = {"model": str(dest)}
                if src.get("parameters"):
                    entry["parameters"] = src["parameters"]
                models.append(entry)
            whole: dict[str, Any] = {
                k: v for k, v in recipe.items() if k not in ("slices", "base_model", "parameters")
            }
            whole["models"] = models
            whole["parameters"] = {
                **(recipe.get("parameters") or {}),
                **(piece.get("parameters") or {}),
            }
            if cut_base is not None:
                whole["base_model"] = str(cut_base)
            merged = reference_merge(whole, seed)
            n = piece["sources"][0]["layer_range"][1] - piece["sources"][0]["layer_range"][0]
            for name, t in merged.items():
                m = _LAYER.match(name)
                if m is not None:
                    out[f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"] = t
                elif any(k in name for k in _BEFORE):
                    if i == 0:
                        out[name] = t
                elif i == len(slices) - 1:
                    out[name] = t
            offset += n
    return out
