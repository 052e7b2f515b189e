"""SLERP: spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from merging.inputs import WORK_CHUNK, Block, TensorInputs
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
        other = b.theta(0)  # a tensor of its own: the result is made in it
        v0, v1 = base.reshape(-1), other.reshape(-1)
        n0, n1 = v0.norm(), v1.norm()
        n0 = n0 if n0 > 1e-8 else torch.ones_like(n0)
        n1 = n1 if n1 > 1e-8 else torch.ones_like(n1)
        # cos Ω of the normalised vectors, a chunk at a time: the whole-tensor temporaries of
        # (v0/n0)·(v1/n1) would hold three more copies of the largest tensor (the embeddings)
        dot_t = torch.zeros((), dtype=torch.float32, device=v0.device)
        for start in range(0, v0.numel(), WORK_CHUNK):
            stop = start + WORK_CHUNK
            dot_t += ((v0[start:stop] / n0) * (v1[start:stop] / n1)).sum()
        dot = float(dot_t.clamp(-1, 1))
        if abs(dot) > 0.9995:
            coef0, coef1 = 1 - t, t
        else:
            omega = math.acos(dot)
            s = math.sin(omega)
            coef0, coef1 = math.sin((1 - t) * omega) / s, math.sin(t * omega) / s
        # coef0·θ0 + coef1·θ1, in place: the result overwrites θ1's float32 copy
        for start in range(0, v1.numel(), WORK_CHUNK):
            stop = start + WORK_CHUNK
            v1[start:stop] = coef0 * v0[start:stop] + coef1 * v1[start:stop]
        return v1.reshape(other.shape)
