"""RAM and RAM+ (tensor-local): Reinforced Agent Merging (https://arxiv.org/abs/2601.13572).

As mergekit 0.1.5's ``ram`` and ``ramplus_tl`` compute them. With the n task vectors
τi = θi − θ0 and ε = ``epsilon``, per element: mi = [|τi| > ε] (model i changed it) and
c = Σi mi (how many did). An element changed by one model takes that model's change; one
changed by several takes their mean:

    ram:         out = θ0 + Σi mi·τi / max(c, 1)

RAM+ (tensor-local) amplifies the changes only one model made, per model by how much of
what it changed is shared: over the tensor, Si = #{mi ∧ c > 1}, Ui = #{mi ∧ c = 1},
ρi = Si / max(Ui, ε), λi = 1 + r·clamp(ρi, 0, α), and

    ramplus_tl:  out = θ0 + Σi mi·τi·(λi·[c = 1] + [c > 1]/c)

Both are element-wise once the counts are known: ``ram`` streams; ``ramplus_tl`` streams
too, with a first pass over the tensor's blocks that counts Si and Ui.
"""

from __future__ import annotations

from collections.abc import Iterator

from merging.inputs import Block, TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeMethod, register
from merging.parameters import ParameterSpec, ParamScope

EPSILON = ParameterSpec(
    "epsilon",
    float,
    1e-5,
    ParamScope.SHARED,
    "a change |τ| above it counts as the model changing the element",
    minimum=0.0,
)


def changes(x: TensorInputs, b: Block, epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The task vectors with the unchanged elements zeroed (mi·τi), and c = Σi mi."""
    taus = [b.tau(j) for j in range(x.count)]
    count = torch.zeros(b.base32().shape, dtype=torch.int64, device=b.base32().device)
    for tau in taus:
        changed = tau.abs() > epsilon
        count += changed
        tau.mul_(changed)
    return taus, count


@register
class Ram(MergeMethod):
    """θ0 + Σ mi·τi / max(c, 1), mi = [|τi| > ε], c = Σ mi."""

    name = "ram"
    title = "RAM (Reinforced Agent Merging)"
    reference = "https://arxiv.org/abs/2601.13572"
    min_models = 1
    parameters = (EPSILON,)

    def merge_block(self, x: TensorInputs, b: Block) -> torch.Tensor:
        base = b.base32()
        if x.count == 0:
            return base.clone()
        taus, count = changes(x, b, float(x.shared["epsilon"]))
        overlap = count > 1
        divisor = count.clamp(min=1)
        merged = torch.zeros_like(base)
        for tau in taus:  # mergekit's two terms: the unique change, the shared one ÷ c
            merged += torch.where(overlap, tau / divisor, tau)
        return merged.add_(base)


@register
class RamPlusTensorLocal(MergeMethod):
    """θ0 + Σ mi·τi·(λi·[c = 1] + [c > 1]/c), λi = 1 + r·clamp(Si / max(Ui, ε), 0, α)."""

    name = "ramplus_tl"
    title = "RAM+ (tensor-local)"
    reference = "https://arxiv.org/abs/2601.13572"
    min_models = 1
    parameters = (
        ParameterSpec(
            "r",
            float,
            0.1,
            ParamScope.SHARED,
            "strength of the amplification of a model's unique changes",
        ),
        ParameterSpec(
            "alpha",
            float,
            0.2,
            ParamScope.SHARED,
            "cap on the shared-to-unique ratio ρ that sets the amplification",
            minimum=0.0,
        ),
        EPSILON,
    )

    def merge(self, x: TensorInputs) -> Iterator[torch.Tensor]:
        if x.count == 0:
            for b in x.blocks():
                yield b.base32().clone()
            return
        eps = float(x.shared["epsilon"])
        shared = [0] * x.count
        unique = [0] * x.count
        for b in x.blocks():  # pass 1: per model, how many of its changes are shared
            taus, count = changes(x, b, eps)
            for j, tau in enumerate(taus):
                changed = tau != 0  # |τ| > ε ≥ 0, so nonzero exactly where changed
                shared[j] += int((changed & (count > 1)).sum())
                unique[j] += int((changed & (count == 1)).sum())
        r, alpha = float(x.shared["r"]), float(x.shared["alpha"])
        lam = []
        for s, u in zip(shared, unique, strict=True):
            # in float32, as mergekit divides the counts
            rho = torch.tensor(s, dtype=torch.float32) / max(float(u), eps)
            lam.append(float(1 + r * rho.clamp(0, alpha)))
        for b in x.blocks(check=False):  # pass 2: the merge
            taus, count = changes(x, b, eps)
            overlap = count > 1
            divisor = count.clamp(min=1)
            merged = torch.zeros_like(b.base32())
            for tau, lam_j in zip(taus, lam, strict=True):
                merged += torch.where(overlap, tau / divisor, tau * lam_j)
            yield merged.add_(b.base32())
