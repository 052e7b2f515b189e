"""Passthrough: one model's tensors as they are, optionally scaled (mergekit's
``passthrough``, the method of layer-stacking "frankenmerges" and depth up-scaling, Kim et
al. 2023, https://arxiv.org/abs/2312.15166). With ``slices`` each output layer is one
source layer, so a recipe stacks layers of one or more models."""

from __future__ import annotations

from collections.abc import Iterator

from merging.inputs import TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeMethod, register
from merging.parameters import ParameterSpec, ParamScope


@register
class Passthrough(MergeMethod):
    """θ1 · scale (scale 1: θ1 exactly)."""

    name = "passthrough"
    title = "Passthrough"
    reference = "https://arxiv.org/abs/2312.15166"
    needs_base = False
    min_models = 1
    max_models = 1
    parameters = (
        ParameterSpec(
            "scale",
            float,
            1.0,
            ParamScope.MODEL,
            "factor the model's tensor is multiplied by (mergekit's per-slice scale; 0 "
            "silences a layer's output projections when filtered to them)",
        ),
    )

    def merge(self, x: TensorInputs) -> Iterator[torch.Tensor]:
        scale = x.params[0]["scale"]
        for b in x.blocks(check=False):
            out = b.theta(0)
            # multiplying by 1.0 is exact; skip it anyway
            yield out if scale == 1.0 else out.mul_(scale)
