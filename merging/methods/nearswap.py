"""NearSwap (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).

Keeps the base, but moves each weight to the other model's value where the two are already
close: w = clamp(t / |θ1 − θ0|, 0, 1) (1 where they are equal), out = θ0 + w·(θ1 − θ0).
"""

from __future__ import annotations

from merging.inputs import Block, TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeMethod, RecipeRuleError, RecipeSettings, register
from merging.parameters import ParameterSpec, ParamScope


@register
class NearSwap(MergeMethod):
    """θ0 + w·τ, w = clamp(t / |τ|, 0, 1), τ = θ1 − θ0 (w = 1 where τ = 0)."""

    name = "nearswap"
    title = "NearSwap"
    reference = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    min_models = 1
    max_models = 1
    parameters = (
        ParameterSpec(
            "t",
            float,
            None,
            ParamScope.SHARED,
            "distance below which a weight takes the other model's value",
            minimum=0.0,
        ),
    )

    def check_recipe(self, recipe: RecipeSettings) -> None:
        if not recipe.is_set("t"):
            raise RecipeRuleError(("parameters", "t"), "nearswap needs the distance t ≥ 0")

    def merge_block(self, x: TensorInputs, b: Block) -> torch.Tensor:
        if x.count == 0:
            return b.base32().clone()
        tau = b.tau(0)
        w = torch.where(tau == 0, 1.0, x.shared["t"] / tau.abs()).clamp_(0, 1)
        return tau.mul_(w).add_(b.base32())
