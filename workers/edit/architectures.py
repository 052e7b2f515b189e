"""Where an edit writes, per architecture: one table, no guessing.

The edited weight is the MLP output projection of a layer; its input at the subject's last
token is the key, its output the value (ROME §3, MEMIT §4). Default layers follow EasyEdit's
Llama settings (ROME layer 5 of 32, MEMIT layers 4–8 of 32) scaled to the model's depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workers.errors import InputError


@dataclass(frozen=True)
class EditArchitecture:
    """Module paths of one architecture family (``{}`` is the layer index)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str  # the list of decoder layers (MEMIT's residual stream is their output)
    mlp_out: str  # the edited module
    transposed: bool  # weight stored [in, out] (GPT-2 Conv1D) instead of nn.Linear's [out, in]
    num_layers_key: str  # config attribute with the number of layers

    def module_name(self, layer: int) -> str:
        return self.mlp_out.format(layer)

    def weight_name(self, layer: int) -> str:
        return self.module_name(layer) + ".weight"

    def block_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"


ARCHITECTURES: tuple[EditArchitecture, ...] = (
    EditArchitecture(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        blocks="model.layers",
        mlp_out="model.layers.{}.mlp.down_proj",
        transposed=False,
        num_layers_key="num_hidden_layers",
    ),
    EditArchitecture(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        mlp_out="transformer.h.{}.mlp.c_proj",
        transposed=True,
        num_layers_key="n_layer",
    ),
)

# Reference depth and layers of the published defaults (Llama-2-7B, 32 layers).
_REFERENCE_DEPTH = 32
_ROME_LAYER = 5
_MEMIT_BAND = (4, 8)


# MEMIT's λ for Llama-2-7B, whose down_proj keys are 11,008 wide.
_REFERENCE_LAMBDA = 15000.0
_REFERENCE_KEY_WIDTH = 11008


def supported_model_types() -> list[str]:
    return [t for a in ARCHITECTURES for t in a.model_types]


def architecture_for(config: Any, *, model: str | None = None) -> EditArchitecture:
    """The table row for a transformers config; InputError naming the supported types."""
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise InputError(
        f"cannot edit architecture {model_type!r}: supported model types are "
        f"{', '.join(supported_model_types())}",
        model=model,
    )


def num_layers(arch: EditArchitecture, config: Any) -> int:
    return int(getattr(config, arch.num_layers_key))


def _scaled(layer: int, depth: int) -> int:
    return min(depth - 1, max(0, round(layer * depth / _REFERENCE_DEPTH)))


def default_layers(method: str, depth: int) -> list[int]:
    """ROME: one layer at 5/32 of the depth; MEMIT: the band 4–8 of 32, scaled."""
    if method == "rome":
        return [_scaled(_ROME_LAYER, depth)]
    lo, hi = (_scaled(x, depth) for x in _MEMIT_BAND)
    return list(range(lo, hi + 1))


def default_mom2_update_weight(d_in: int) -> float:
    """MEMIT's λ scaled by the key width d_in.

    C is the mean of kkᵀ over the corpus, so kᵀC⁻¹k averages d_in over corpus keys, and
    the share of a request's residual that ΔW = R Kᵀ(λC + KKᵀ)⁻¹ writes for a key is
    s / (1 + s) with s = kᵀ(λC)⁻¹k ≈ d_in / λ. Holding d_in / λ at the published setting
    holds that share; λ = 15,000 unscaled writes about a tenth of it on a 1,536-wide key."""
    return _REFERENCE_LAMBDA * d_in / _REFERENCE_KEY_WIDTH


def edited_weight(model: Any, arch: EditArchitecture, layer: int) -> torch.nn.Parameter:
    """The weight an edit of ``layer`` writes."""
    w: torch.nn.Parameter = model.get_submodule(arch.module_name(layer)).weight
    return w


@torch.no_grad()
def apply_delta(model: Any, arch: EditArchitecture, layer: int, delta: torch.Tensor) -> None:
    """W += ΔW in place (ΔW in [d_out, d_in]; transposed for Conv1D)."""
    w = edited_weight(model, arch, layer)
    w.add_((delta.T if arch.transposed else delta).to(w.dtype))
