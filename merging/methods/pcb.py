"""PCB, Parameter Competition Balancing (Du et al. 2024, https://arxiv.org/abs/2410.02396).

After ``PCB_merge`` in duguodong7/pcb-merging. With ``scope: global`` (the reference's
choice, the default) the clip bounds and the quantile and maximum of the balance matrix are
statistics over every parameter of a model, gathered in extra streaming passes (PcbGlobal);
once they are known everything is element-wise, so the tensors stream. With ``scope: tensor``
they are computed per tensor, which needs the tensor whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from merging.inputs import WORK_CHUNK, Block, TensorInputs, scale_
from merging.lazy_torch import numpy, torch
from merging.method import MergeMethod, register
from merging.parameters import ParameterSpec, ParamScope, weight
from merging.selection import kth_smallest
from merging.statistics import (
    WholeModel,
    WholeModelStatistic,
    select_per_model,
    task_vector_magnitudes,
)


def _normalize_(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """(v − lo) / (hi − lo), in place (0 where hi ≤ lo)."""
    return v.sub_(lo).div_(hi - lo) if hi > lo else v.zero_()


def pcb_balance(
    tau: torch.Tensor,
    total: torch.Tensor,
    n: int,
    lo: float,
    hi: float,
    clamped: torch.Tensor | None = None,
) -> torch.Tensor:
    """B_i = intra_i ⊙ inter_i for one model (steps 1–4).

    intra_i = exp(n·norm(A_i)²), computed as exp(n·(norm(A_i)² − 1)) (the constant factor
    cancels in the final ratio), A_i = clamp(|τ_i|, lo_i, hi_i); inter_i = tanh(τ_i ⊙ Σj τj).
    ``clamped``: A_i already made, consumed (B is computed in its buffer).
    """
    a = tau.abs().clamp_(lo, hi) if clamped is None else clamped
    intra = _normalize_(a, lo, hi).square_().sub_(1).mul_(n).exp_()
    return intra.mul_(tanh_(torch.mul(tau, total)))


def tanh_(x: torch.Tensor) -> torch.Tensor:
    """tanh in place. On the CPU by numpy's vectorised tanh: torch's CPU tanh is about 13×
    slower here (2.2 ns per float32 against 0.16) and was most of PCB's time. numpy's is
    within 1.5 units in the last place of the exact value, torch's within 0.52; they differ
    by at most one (tests/test_pcb_tanh.py)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
        values = x.numpy()
        numpy.tanh(values, out=values)
        return x
    return x.tanh_()


def pcb_score(balance: torch.Tensor, threshold: float, top: float) -> torch.Tensor:
    """S_i (step 5): normalize(clamp(B, t, max)); entries at or below the (1 − r) quantile t
    get 0 (the reference code clamps and normalizes; nothing is zeroed before)."""
    return _normalize_(balance.clamp_(threshold, top), threshold, top)


def pcb_clip_ranks(d: int, clip: float) -> tuple[int, int]:
    """1-based ranks of lo = sorted(|T|)[int(d·c)] and hi = sorted(|T|)[int(d·(1−c)) − 1]."""
    return int(d * clip) + 1, max(1, int(d * (1 - clip)))


def pcb_quantile_rank(d: int, density: float) -> int:
    """1-based rank of the threshold: index int(d·(1 − r)) of the ascending sort."""
    return min(d, int(d * (1 - density)) + 1)


# lo, hi (clip bounds of |τ|), the (1 − r) quantile and the maximum of B, for one model
Bounds = tuple[float, float, float, float]


def tensor_bounds(
    tau: torch.Tensor, total: torch.Tensor, n: int, density: float, clip: float
) -> Bounds:
    """The statistics of one model over one (whole, flattened) tensor: ``scope: tensor``."""
    d = tau.numel()
    lo, hi = kth_smallest(tau.abs(), list(pcb_clip_ranks(d, clip)), nonnegative=True)
    balance = pcb_balance(tau, total, n, lo, hi)
    (threshold,) = kth_smallest(balance, [pcb_quantile_rank(d, density)])
    return lo, hi, threshold, float(balance.max())


class PcbGlobal(WholeModelStatistic):
    """PCB's per-model statistics over all parameters: the clip bounds lo/hi of |τ|, then
    the (1 − r) quantile and the maximum of the balance matrix B."""

    passes = 4

    def compute(self, model: WholeModel) -> dict[str, Any]:
        sizes = model.float_sizes()
        shared = model.shared_parameters()
        density, clip = shared["density"], shared["clip_ratio"]
        clip_ranks = {i: list(pcb_clip_ranks(n, clip)) for i, n in sizes.items() if n > 0}
        bounds = select_per_model(
            model, clip_ranks, task_vector_magnitudes, "statistics: clip bounds", nonnegative=True
        )
        lo = {i: v[0] for i, v in bounds.items()}
        hi = {i: v[1] for i, v in bounds.items()}
        top: dict[int, float] = {i: -math.inf for i in bounds}

        def balance(x: TensorInputs, blk: Block) -> Iterator[tuple[int, torch.Tensor]]:
            if x.count == 0:
                return
            taus = [blk.tau(j) for j in range(x.count)]
            total = taus[0].clone()  # Σj τj, summed in the order of the merge
            for t in taus[1:]:
                total += t
            for j, tau in enumerate(taus):
                i = x.model_indices[j]
                b = pcb_balance(tau, total, x.count, lo[i], hi[i])
                if b.numel():
                    top[i] = max(top[i], float(b.max()))
                yield i, b

        q_ranks = {i: [pcb_quantile_rank(n, density)] for i, n in sizes.items() if n > 0}
        quant = select_per_model(
            model, q_ranks, balance, "statistics: balance quantile", maxima=top
        )
        bounds_of: dict[int, Bounds] = {i: (lo[i], hi[i], quant[i][0], top[i]) for i in quant}
        return {"pcb_bounds": bounds_of}


@register
class Pcb(MergeMethod):
    """out = θ0 + Σi λi·Tc_i·S_i / max(Σi S_i, 1e-12), Tc_i = sign(τi)·clamp(|τi|, lo_i, hi_i).

    Once a model's statistics are known, B, S and Tc are element-wise: they are computed in
    chunks so that their temporaries stay small.
    """

    name = "pcb"
    title = "PCB (Parameter Competition Balancing)"
    reference = "https://arxiv.org/abs/2410.02396"
    parameters = (
        weight("λi: scale of this model's balanced task vector"),
        ParameterSpec(
            "density",
            float,
            0.1,
            ParamScope.SHARED,
            "r: fraction of entries kept per model",
            minimum=0.0,
            maximum=1.0,
            per_tensor=False,
        ),
        ParameterSpec(
            "clip_ratio",
            float,
            0.0001,
            ParamScope.SHARED,
            "c: fraction clipped at each end of |τ|",
            minimum=0.0,
            maximum=0.5,
            per_tensor=False,
        ),
        ParameterSpec(
            "scope",
            str,
            "global",
            ParamScope.SHARED,
            "global: statistics over the whole model (reference); tensor: per tensor",
            choices=("global", "tensor"),
            per_tensor=False,
        ),
    )

    def whole_model_statistic(self, shared: Mapping[str, Any]) -> WholeModelStatistic | None:
        return PcbGlobal() if shared.get("scope") == "global" else None

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        return shared["scope"] != "global"  # per-tensor quantiles of B

    def merge_block(self, x: TensorInputs, b: Block) -> torch.Tensor:
        if x.count == 0:
            return b.base32().clone()
        # Each τj is needed twice, for Σj τj and then on its own: a streamed block keeps
        # them (small buffers), a whole tensor makes them again to hold one at a time.
        kept = None if x.whole else [b.tau(j).reshape(-1) for j in range(x.count)]

        def tau_of(j: int) -> torch.Tensor:
            return kept[j] if kept is not None else b.tau(j).reshape(-1)

        total = kept[0].clone() if kept is not None else tau_of(0)
        for j in range(1, x.count):
            total += tau_of(j)
        num = torch.zeros_like(total)
        den = torch.zeros_like(total)
        for j in range(x.count):
            tau = tau_of(j)
            if x.shared["scope"] == "global":
                lo, hi, threshold, top = x.stats["pcb_bounds"][x.model_indices[j]]
            else:
                lo, hi, threshold, top = tensor_bounds(
                    tau, total, x.count, x.shared["density"], x.shared["clip_ratio"]
                )
            weight = x.params[j]["weight"]
            for start in range(0, tau.numel(), WORK_CHUNK):
                chunk = slice(start, start + WORK_CHUNK)
                t = tau[chunk]
                a = t.abs().clamp_(lo, hi)  # A: Tc's magnitude, then B's intra term
                clipped = torch.sign(t).mul_(a)
                score = pcb_score(pcb_balance(t, total[chunk], x.count, lo, hi, a), threshold, top)
                # add_ on the views: `num[chunk] += …` would copy the sum back once more
                num[chunk].add_(scale_(clipped.mul_(score), weight))
                den[chunk].add_(score)
        return num.div_(den.clamp_(min=1e-12)).reshape(b.shape).add_(b.base32())
