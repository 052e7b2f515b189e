"""NearSwap (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).

The base keeps its values except where the other model is already close to it: there the
weight moves to the other model's value. With θ0 the base, θ1 the other model and
d = |θ1 − θ0|, per element

    w = clamp(t / max(d, 1e-6), 0, 1),    out = w·θ1 + (1 − w)·θ0

(mergekit 0.1.5's ``nearswap``: the 1e-6 floor makes w = min(1, t·10⁶) where the two are
equal; t ≤ 0 gives the base).
"""

from __future__ import annotations

from merging.inputs import Block, TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeMethod, RecipeRuleError, RecipeSettings, register
from merging.parameters import ParameterSpec, ParamScope


@register
class NearSwap(MergeMethod):
    """w = clamp(t / max(|θ1 − θ0|, 1e-6), 0, 1), out = w·θ1 + (1 − w)·θ0, element-wise."""

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
            "distance |θ1 − θ0| up to which an element takes the other model's value "
            "(farther ones move by t/distance of the way)",
        ),
    )

    def check_recipe(self, recipe: RecipeSettings) -> None:
        if not recipe.is_set("t"):
            raise RecipeRuleError(
                ("parameters", "t"),
                "nearswap needs the distance t (e.g. 0.0001): elements of the base within t "
                "of the other model take its value",
            )

    def merge_block(self, x: TensorInputs, b: Block) -> torch.Tensor:
        base = b.base32()
        if x.count == 0:  # mergekit passes the base through when only it has the tensor
            return base.clone()
        other = b.theta(0)
        w = (other - base).abs_().clamp_(min=1e-6).reciprocal_().mul_(x.shared["t"])
        w.clamp_(0, 1)
        # w·θ1 + (1 − w)·θ0, in mergekit's order of operations
        return other.mul_(w).add_(w.neg_().add_(1).mul_(base))
