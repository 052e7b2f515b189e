"""Linear merge (model soup, Wortsman et al. 2022, https://arxiv.org/abs/2203.05482)."""

from __future__ import annotations

from collections.abc import Iterator

from merging.inputs import Float32Scratch, TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeInputError, MergeMethod, register
from merging.parameters import normalize, weight


@register
class Linear(MergeMethod):
    """Σ wi·θi / Σ wi (``normalize``), else Σ wi·θi."""

    name = "linear"
    title = "Linear (model soup)"
    reference = "https://arxiv.org/abs/2203.05482"
    needs_base = False
    parameters = (weight(), normalize(True))

    def merge(self, x: TensorInputs) -> Iterator[torch.Tensor]:
        weights = [p["weight"] for p in x.params]
        total = sum(weights)
        if x.shared["normalize"] and abs(total) < 1e-8:
            raise MergeInputError(
                "the model weights sum to 0, so normalize cannot divide by them; set "
                "normalize: false or change the weights",
                field="parameters.weight",
            )
        as_float32 = Float32Scratch()
        # NaN/Inf in an input always make the output non-finite here: the engine checks that
        for b in x.blocks(check=False):
            out = b.theta(0).mul_(weights[0])
            for j in range(1, x.count):
                out.add_(as_float32(b.raw(j)), alpha=weights[j])
            yield out.div_(total) if x.shared["normalize"] else out
