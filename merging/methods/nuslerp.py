"""NuSLERP: spherical interpolation of two models (or of their task vectors) with weights.

mergekit 0.1.5's ``nuslerp`` (Arcee AI; https://github.com/arcee-ai/mergekit, the slerp of
Shoemake 1985, https://doi.org/10.1145/325165.325242). With weights w1, w2 of the two
models, t = w2 / (w1 + w2) (0.5 when |w1 + w2| < 1e-6). With a base θ0 the vectors are the
task vectors v1 = τ1, v2 = τ2 and out = θ0 + slerp(t, v1, v2); without one, v1 = θ1,
v2 = θ2 and out = slerp(t, v1, v2). Per vector pair (the flattened tensor with
``nuslerp_flatten``, the default; else each row, or each column with ``nuslerp_row_wise``):

    u = v / max(‖v‖, 1e-7),  cos Ω = clamp(u1·u2, −1, 1)
    slerp = (sin((1 − t)Ω)·v1 + sin(tΩ)·v2) / sin Ω,  or (1 − t)·v1 + t·v2 where 1 − cos²Ω ≤ 1e-16

Unlike ``slerp`` the unnormalised vectors are interpolated, so a zero vector has Ω = π/2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from merging.inputs import Block, TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeMethod, register
from merging.parameters import ParameterSpec, ParamScope, weight

COLINEAR_EPS = 1e-8  # 1 − cos²Ω ≤ COLINEAR_EPS² counts as colinear: lerp
NORM_FLOOR = 1e-7


def nuslerp(t: float, v1: torch.Tensor, v2: torch.Tensor, dim: int | None) -> torch.Tensor:
    """slerp of the vectors along ``dim`` (None: the flattened tensors), the module's formula."""
    shape = v1.shape
    if dim is None or v1.dim() <= 1:
        dim = None
        v1, v2 = v1.reshape(-1), v2.reshape(-1)
    elif dim != v1.dim() - 1:
        v1, v2 = v1.transpose(dim, -1), v2.transpose(dim, -1)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    u2 = v2 / v2.norm(dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = (u1 * u2).sum(dim=-1, keepdim=True).clamp(-1, 1)
    del u1, u2
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    omega = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * omega) * v1 + torch.sin(t * omega) * v2) / torch.sin(omega)
    out = torch.where(colinear, (1 - t) * v1 + t * v2, out)
    if dim is not None and dim != out.dim() - 1:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@register
class NuSlerp(MergeMethod):
    """θ0 + slerp(t, τ1, τ2) with a base, slerp(t, θ1, θ2) without; t = w2 / (w1 + w2)."""

    name = "nuslerp"
    title = "NuSLERP"
    reference = "https://github.com/arcee-ai/mergekit (nuslerp; slerp: Shoemake 1985)"
    needs_base = False
    optional_base = True
    min_models = 2
    max_models = 2
    parameters = (
        weight("relative weight: t = w2 / (w1 + w2) is the position between the two models"),
        ParameterSpec(
            "nuslerp_flatten",
            bool,
            True,
            ParamScope.SHARED,
            "interpolate the flattened tensors (false: each row, or column with "
            "nuslerp_row_wise, separately)",
        ),
        ParameterSpec(
            "nuslerp_row_wise",
            bool,
            False,
            ParamScope.SHARED,
            "without nuslerp_flatten: interpolate along the first dimension (columns) "
            "instead of the last (rows)",
        ),
    )

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        return True  # norms of the whole tensor, its rows or its columns

    def merge_block(self, x: TensorInputs, b: Block) -> torch.Tensor:
        if x.count < 2:  # mergekit passes a tensor only one input has through
            if x.count == 1:
                return b.theta(0)
            return b.base32().clone()
        w1, w2 = x.params[0]["weight"], x.params[1]["weight"]
        total = w1 + w2
        t = 0.5 if abs(total) < 1e-6 else w2 / total
        if x.shared["nuslerp_flatten"]:
            dim = None
        else:
            dim = 0 if x.shared["nuslerp_row_wise"] else len(x.shape) - 1
        if b.has_base:
            base = b.base32()
            return nuslerp(t, b.tau(0), b.tau(1), dim).add_(base)
        return nuslerp(t, b.theta(0), b.theta(1), dim)
