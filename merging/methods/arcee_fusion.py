"""Arcee Fusion: take the other model's value only where it matters.

Arcee AI (https://arcee.ai), as mergekit 0.1.5's ``arcee_fusion`` computes it (there is no
paper; the source is mergekit's ``merge_methods/arcee_fusion.py``).

With θ0 the base and θ1 the other model, per row (the last dimension; a 1-D tensor is one
row) p = softmax(θ1) + 1e-8, q = softmax(θ0) + 1e-8 and the importance of each element is

    I = |θ1 − θ0| · KL_row,    KL_row = Σ p·log(p/q)

The elements kept are those with I ≥ Q2 + 1.5·(Q3 − Q1), the quartiles Qk of I over the
tensor taken as sorted(I)[int(q·(N − 1))] for q = 0.25, 0.5, 0.75; out = θ0 + (θ1 − θ0)·[kept].

mergekit estimates the quartiles of a tensor of more than 10⁶ elements from 10⁶ elements
drawn at random (with replacement, from the unseeded global generator); here they are
always the exact quartiles of the whole tensor, so on such tensors the threshold differs by
that sampling error (and is reproducible).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from merging.inputs import Block, TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeMethod, register
from merging.selection import kth_smallest

QUARTILES = (0.25, 0.5, 0.75)


def importance(theta1: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
    """I = |θ1 − θ0| · Σ_row p·log(p/q), p and q the rows' softmax (+1e-8) of θ1 and θ0."""
    rows1 = theta1.reshape(1, -1) if theta1.dim() == 0 else theta1
    rows0 = theta0.reshape(1, -1) if theta0.dim() == 0 else theta0
    p = torch.softmax(rows1, dim=-1).add_(1e-8)
    q = torch.softmax(rows0, dim=-1).add_(1e-8)
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return ((rows1 - rows0).abs_() * kl).reshape(theta1.shape)


def fusion_threshold(scores: torch.Tensor) -> float:
    """Q2 + 1.5·(Q3 − Q1), the quartiles sorted(I)[int(q·(N − 1))] of the whole tensor."""
    n = scores.numel()
    # q·(N − 1) as mergekit forms it: a float32 product, truncated
    positions = (torch.tensor(QUARTILES, dtype=torch.float32) * (n - 1)).long().tolist()
    q1, q2, q3 = kth_smallest(scores, [i + 1 for i in positions])
    # in float32, as torch adds the three float32 quartiles
    q1_, q2_, q3_ = (torch.tensor(v, dtype=torch.float32) for v in (q1, q2, q3))
    return float(q2_ + 1.5 * (q3_ - q1_))


@register
class ArceeFusion(MergeMethod):
    """θ0 + (θ1 − θ0)·[I ≥ Q2 + 1.5·(Q3 − Q1)], I = |θ1 − θ0|·KL(softmax θ1 ‖ softmax θ0)
    per row."""

    name = "arcee_fusion"
    title = "Arcee Fusion"
    reference = "https://arcee.ai (mergekit 0.1.5, merge_methods/arcee_fusion.py)"
    min_models = 1
    max_models = 1
    parameters = ()

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        return True  # softmax over rows, quartiles over the tensor

    def merge_block(self, x: TensorInputs, b: Block) -> torch.Tensor:
        base = b.base32()
        if x.count == 0:
            return base.clone()
        other = b.theta(0)
        scores = importance(other, base)
        kept = scores >= fusion_threshold(scores)
        return other.sub_(base).mul_(kept).add_(base)
