"""SCE: Select, Calculate, Erase (FuseChat-2.0, Wan et al. 2024, https://arxiv.org/abs/2408.07990).

As mergekit 0.1.5's ``sce`` computes it, per tensor, with the n task vectors τi = θi − θ0:

1. Select (``select_topk`` = r < 1): the k = int(r·#{σ² ≠ 0}) elements of largest variance
   σ² = (1/n)·Σi (τi − mean τ)² across the models are kept in every τi, the others set to 0
   (r = 0 keeps none).
2. Calculate: wi = mean(τi²) / Σj mean(τj²) over the tensor (1/n when Σj mean(τj²) < 1e-6).
3. Erase: s = sign(Σi τi) (0 counts as +), mi = [sign(τi) = s] (a 0 never matches).

out = θ0 + Σi mi·wi·τi / max(Σi mi·wi, 1e-6).

Equal variances at the cut are kept by position (lower flat index first), as TIES' top-k
here; mergekit's ``topk`` keeps an arbitrary subset of equal values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from merging.inputs import Block, TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeMethod, register
from merging.parameters import INT8_MASK, ParameterSpec, ParamScope
from merging.selection import rank_range_mask


def sce_select_mask(taus: torch.Tensor, r: float) -> torch.Tensor | None:
    """Step 1 over the stacked task vectors (n × ...): the elements kept, None for all."""
    if r >= 1:
        return None
    shape = taus.shape[1:]
    if r <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=taus.device)
    var = taus.var(dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * r)  # a float32 product, truncated, as mergekit's
    return rank_range_mask(var, 0, k, descending=True, nonnegative=True)


@register
class Sce(MergeMethod):
    """θ0 + Σ mi·wi·τi / max(Σ mi·wi, 1e-6): variance top-k, mean-square weights, sign
    consensus."""

    name = "sce"
    title = "SCE (Select, Calculate, Erase)"
    reference = "https://arxiv.org/abs/2408.07990"
    min_models = 1
    parameters = (
        ParameterSpec(
            "select_topk",
            float,
            1.0,
            ParamScope.SHARED,
            "fraction of the elements (those of largest variance across the models) kept",
            minimum=0.0,
            maximum=1.0,
        ),
        INT8_MASK,
    )

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        return True  # variances ranked over the tensor, mean squares of whole task vectors

    def merge_block(self, x: TensorInputs, b: Block) -> torch.Tensor:
        base = b.base32()
        if x.count == 0:
            return base.clone()
        taus = torch.stack([b.tau(j) for j in range(x.count)])
        keep = sce_select_mask(taus, float(x.shared["select_topk"]))
        if keep is not None:
            taus.mul_(keep)
        # Calculate: each model's share of the mean squares
        ms = taus.square().reshape(x.count, -1).mean(dim=1)
        total = float(ms.sum())
        w = torch.full_like(ms, 1 / x.count) if abs(total) < 1e-6 else ms / total
        w = w.reshape(-1, *([1] * (taus.dim() - 1)))
        # Erase: drop the entries against the elected sign
        positive = taus.sum(dim=0) >= 0
        agree = torch.where(positive, taus > 0, taus < 0)
        mw = agree * w
        merged = (taus * mw).sum(dim=0) / mw.sum(dim=0).clamp(min=1e-6)
        return merged.add_(base)
