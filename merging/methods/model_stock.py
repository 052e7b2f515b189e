"""Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from merging.inputs import Block, TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeMethod, register
from merging.parameters import ParameterSpec, ParamScope


@register
class ModelStock(MergeMethod):
    """t = k·cos / ((k − 1)·cos + 1), out = t·mean(θi) + (1 − t)·θ0.

    cos is the mean pairwise cosine of the task vectors (over the flattened tensor, or per
    row with ``filter_wise``); t is clamped to [0, 1] (a clamp is reported in the manifest).
    """

    name = "model_stock"
    title = "Model Stock"
    reference = "https://arxiv.org/abs/2403.19522"
    min_models = 2
    parameters = (
        ParameterSpec(
            "filter_wise",
            bool,
            False,
            ParamScope.SHARED,
            "compute the interpolation ratio per row",
        ),
    )

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        return True  # cosines over the whole tensor or its rows

    def merge_block(self, x: TensorInputs, b: Block) -> torch.Tensor:
        k = x.count
        if k < 2:  # fewer than two models have this tensor: nothing to estimate from
            return b.base32().clone() if k == 0 else b.theta(0)
        base = b.base32()
        filter_wise = x.shared["filter_wise"] and base.dim() >= 2
        shape = base.shape
        base = base.reshape(-1, shape[-1]) if filter_wise else base.reshape(1, -1)
        taus = [b.tau(j).reshape(base.shape) for j in range(k)]
        norms = [t.norm(dim=1) for t in taus]
        cos_sum = torch.zeros(base.shape[0], device=base.device)
        pairs = 0
        for i in range(k):
            for j in range(i + 1, k):
                denom = norms[i] * norms[j]
                c = (taus[i] * taus[j]).sum(dim=1) / denom.clamp(min=1e-12)
                cos_sum += torch.where(denom > 0, c.clamp(-1, 1), torch.zeros_like(c))
                pairs += 1
        cos = cos_sum / pairs
        denominator = (k - 1) * cos + 1
        singular = denominator.abs() < 1e-6
        t = torch.where(
            singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1.0, denominator)
        )
        if bool(((t < 0) | (t > 1)).any()):
            x.notes.append(
                f"model_stock: t clamped to [0, 1] in {x.name} "
                f"(min {float(t.min()):.4g}, max {float(t.max()):.4g})"
            )
        t = t.clamp(0, 1).unsqueeze(1)
        # t·mean(θi) + (1 − t)·θ0 = θ0 + t·mean(τi)
        mean_tau = taus[0]
        for tau in taus[1:]:
            mean_tau += tau
        mean_tau /= k
        return (base + t * mean_tau).reshape(shape)
