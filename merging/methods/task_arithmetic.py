"""Task Arithmetic (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089).

The task-vector family without sparsification or sign election (merging/methods/
task_vectors.py), with the sum rearranged so that no τi is materialised.
"""

from __future__ import annotations

from collections.abc import Iterator

from merging.inputs import Float32Scratch, TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeMethod, register
from merging.parameters import INT8_MASK, LAMBDA, normalize, weight


@register
class TaskArithmetic(MergeMethod):
    """θ0 + λ·Σ wi·τi, with wi/Σw when ``normalize``.

    Evaluated as (1 − λ·Σ wi)·θ0 + λ·Σ wi·θi: the same float32 arithmetic up to rounding,
    but each θi is accumulated straight from its stored dtype, with no τi materialised.
    """

    name = "task_arithmetic"
    title = "Task Arithmetic"
    reference = "https://arxiv.org/abs/2212.04089"
    parameters = (weight(), LAMBDA, normalize(False), INT8_MASK)

    def merge(self, x: TensorInputs) -> Iterator[torch.Tensor]:
        weights = [p["weight"] for p in x.params]
        total = sum(weights)
        if x.shared["normalize"] and abs(total) >= 1e-8:
            weights = [w / total for w in weights]
        lam = x.shared["lambda"]
        keep = 1 - lam * sum(weights)
        as_float32, acc = Float32Scratch(), Float32Scratch()
        # A NaN/Inf input always makes the output non-finite (0·NaN = NaN, ∞ − ∞ = NaN),
        # which the engine checks.
        for b in x.blocks(check=False):
            out = acc(b.base_raw(), copy=True).mul_(keep)
            for j, w in enumerate(weights):
                out.add_(as_float32(b.raw(j)), alpha=lam * w)
            yield out  # reused for the next block: the engine copies it out
