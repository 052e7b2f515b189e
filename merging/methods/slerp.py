"""SLERP: spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from merging.inputs import Block, TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeMethod, RecipeRuleError, RecipeSettings, register
from merging.parameters import ParameterSpec, ParamScope


@register
class Slerp(MergeMethod):
    """Spherical interpolation of the flattened tensors at ``t``; lerp when |cos Ω| > 0.9995."""

    name = "slerp"
    title = "SLERP"
    reference = "https://en.wikipedia.org/wiki/Slerp"
    min_models = 1
    max_models = 1
    parameters = (
        ParameterSpec(
            "t",
            float,
            None,
            ParamScope.SHARED,
            "interpolation factor: 0 gives the base, 1 the other model",
            minimum=0.0,
            maximum=1.0,
        ),
    )

    def check_recipe(self, recipe: RecipeSettings) -> None:
        if not recipe.is_set("t"):
            raise RecipeRuleError(
                ("parameters", "t"), "slerp needs the interpolation factor t in [0, 1]"
            )

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        return True  # the angle between the whole tensors

    def merge_block(self, x: TensorInputs, b: Block) -> torch.Tensor:
        base = b.base32()
        if x.count == 0:
            return base.clone()
        t = float(x.shared["t"])
        other = b.theta(0)
        v0, v1 = base.reshape(-1), other.reshape(-1)
        n0, n1 = v0.norm(), v1.norm()
        a = v0 / n0 if n0 > 1e-8 else v0
        c = v1 / n1 if n1 > 1e-8 else v1
        dot = float((a * c).sum().clamp(-1, 1))
        if abs(dot) > 0.9995:
            return torch.lerp(base, other, t)
        omega = math.acos(dot)
        s = math.sin(omega)
        return (math.sin((1 - t) * omega) / s) * base + (math.sin(t * omega) / s) * other
