"""Multi-SLERP: barycentric interpolation of any number of models on a hypersphere.

Charles Goddard, "Multi-SLERP" (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea),
as mergekit 0.1.5's ``multislerp`` computes it. The vectors vi are the task vectors τi with
a base, the models θi without; wi their weights, divided by Σ wi with
``normalize_weights``; ε = ``eps``. Over the flattened tensors:

    ui = vi / (‖vi‖ + ε)                       onto the unit sphere
    m = Σ wi·ui / ‖Σ wi·ui‖                    the weighted mean direction
    gi = ui − (ui·m)·m,  g = Σ wi·gi           into the tangent space at m, interpolated there
    r = cos(‖g‖ + ε)·m + sin(‖g‖ + ε)/(‖g‖ + ε)·g    back onto the sphere
    out = θ0 + (Σ wi·‖vi‖)·r                   (without θ0 without a base)

One model gives that model. When ‖Σ wi·ui‖ < ε (antipodal vectors with balancing weights)
two models fall back to w1·v1 + w2·v2 (+ θ0); with more there is no mean direction and the
merge is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from merging.inputs import Block, TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeInputError, MergeMethod, register
from merging.parameters import ParameterSpec, ParamScope, weight


@register
class MultiSlerp(MergeMethod):
    """Weighted spherical mean of the flattened vectors, rescaled by Σ wi·‖vi‖."""

    name = "multislerp"
    title = "Multi-SLERP"
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    needs_base = False
    optional_base = True
    min_models = 1
    parameters = (
        weight(),
        ParameterSpec(
            "normalize_weights",
            bool,
            True,
            ParamScope.SHARED,
            "divide the weights by their sum",
        ),
        ParameterSpec(
            "eps",
            float,
            1e-8,
            ParamScope.SHARED,
            "small constant added to norms for numerical stability",
            minimum=0.0,
        ),
    )

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        return True  # norms of the whole tensors

    def merge_block(self, x: TensorInputs, b: Block) -> torch.Tensor:
        if x.count == 0:
            return b.base32().clone()
        if x.count == 1:
            return b.theta(0)  # mergekit: a single model needs no interpolation
        eps = float(x.shared["eps"])
        w = [float(p["weight"]) for p in x.params]
        if x.shared["normalize_weights"]:
            total = sum(w)
            if total == 0:
                raise MergeInputError(
                    "the model weights sum to 0, so normalize_weights cannot divide by them; "
                    "change the weights or set normalize_weights: false",
                    field="parameters.weight",
                )
            w = [wi / total for wi in w]
        vs = [(b.tau(j) if b.has_base else b.theta(j)).reshape(-1) for j in range(x.count)]
        norms = [v.norm() for v in vs]
        units = [v / (n + eps) for v, n in zip(vs, norms, strict=True)]
        mean = sum_weighted(units, w)
        mean_norm = float(mean.norm())
        if mean_norm < eps:
            if x.count == 2:  # mergekit falls back to linear interpolation
                out = sum_weighted(vs, w)
                return (out.add_(b.base32().reshape(-1)) if b.has_base else out).reshape(x.shape)
            raise MergeInputError(
                "the weighted mean of the models' directions is 0 (antipodal models whose "
                "weights balance out), so multislerp has no direction to interpolate around; "
                "change the weights",
                field="parameters.weight",
            )
        mean /= mean_norm
        tangent = sum_weighted([u - (u * mean).sum() * mean for u in units], w)
        g = float(tangent.norm()) + eps
        out = mean.mul_(math.cos(g)).add_(tangent, alpha=math.sin(g) / g)
        out *= float(sum(wi * n for wi, n in zip(w, norms, strict=True)))
        if b.has_base:
            out += b.base32().reshape(-1)
        return out.reshape(x.shape)


def sum_weighted(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ wi·vi, a new tensor."""
    out = vectors[0] * weights[0]
    for v, wi in zip(vectors[1:], weights[1:], strict=True):
        out.add_(v, alpha=wi)
    return out
