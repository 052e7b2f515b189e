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
from merging.selection import ExtremeSelect, kth_smallest
from merging.statistics import (
    WINDOW_SAMPLE,
    WholeModel,
    WholeModelStatistic,
    select_in_window,
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
    the (1 − r) quantile and the maximum of the balance matrix B.

    Four passes by radix select (two for the bounds, two for the quantile), bit-identical
    when split across processes. In one process a shortcut makes two: the bounds are ranks
    within ``clip_ratio`` of either end, found in one pass by keeping the extreme values
    (ExtremeSelect), which also samples τ; B of the sample then guesses a narrow window
    around the quantile, and one pass over B counts what lies below it and keeps what lies
    in it (WindowSelect). Both give the exact values; should the window miss (a sample
    unlike the model), the two radix passes over B are made after all."""

    passes = 4

    def compute(self, model: WholeModel) -> dict[str, Any]:
        sizes = model.float_sizes()
        shared = model.shared_parameters()
        density, clip = shared["density"], shared["clip_ratio"]
        clip_ranks = {i: list(pcb_clip_ranks(n, clip)) for i, n in sizes.items() if n > 0}
        q_ranks = {i: [pcb_quantile_rank(n, density)] for i, n in sizes.items() if n > 0}
        extremes = {i: ExtremeSelect(sizes[i], r) for i, r in clip_ranks.items()}
        if not model.in_parts and all(e.feasible for e in extremes.values()):
            return self._in_two_passes(model, sizes, extremes, q_ranks)
        bounds = select_per_model(
            model, clip_ranks, task_vector_magnitudes, "statistics: clip bounds", nonnegative=True
        )
        lo = {i: v[0] for i, v in bounds.items()}
        hi = {i: v[1] for i, v in bounds.items()}
        return self._quantiles(model, lo, hi, q_ranks)

    def _quantiles(
        self,
        model: WholeModel,
        lo: dict[int, float],
        hi: dict[int, float],
        q_ranks: dict[int, list[int]],
    ) -> dict[str, Any]:
        """The quantile and maximum of B by two radix passes, given the clip bounds."""
        top: dict[int, float] = {i: -math.inf for i in lo}

        def balance(x: TensorInputs, blk: Block) -> Iterator[tuple[int, torch.Tensor]]:
            for i, b in _balances(x, blk, lo, hi):
                if b.numel():
                    top[i] = max(top[i], float(b.max()))
                yield i, b

        quant = select_per_model(
            model, q_ranks, balance, "statistics: balance quantile", maxima=top
        )
        bounds_of: dict[int, Bounds] = {i: (lo[i], hi[i], quant[i][0], top[i]) for i in quant}
        return {"pcb_bounds": bounds_of}

    def _in_two_passes(
        self,
        model: WholeModel,
        sizes: dict[int, int],
        extremes: dict[int, ExtremeSelect],
        q_ranks: dict[int, list[int]],
    ) -> dict[str, Any]:
        # pass 1: the clip bounds, and every `stride`-th element of each τ and of Σj τj
        stride = {i: max(1, n // WINDOW_SAMPLE) for i, n in sizes.items()}
        samples = {i: _Sample(sizes[i] // stride[i] + 1024) for i in extremes}
        for x in model.tensors("statistics: clip bounds"):
            for blk in x.blocks():
                if x.count == 0:
                    continue
                taus = [blk.tau(j) for j in range(x.count)]
                total = _sum(taus)
                for j, tau in enumerate(taus):
                    i = x.model_indices[j]
                    if i not in extremes:
                        continue
                    first = (-blk.start) % stride[i]  # the same elements whatever the blocks
                    step = slice(first, None, stride[i])
                    samples[i].add(tau.reshape(-1)[step], total.reshape(-1)[step], x.count)
                    extremes[i].observe(tau.abs_())
        model.skip_pass("statistics: clip bounds")
        lo, hi = {}, {}
        for i, e in extremes.items():
            lo[i], hi[i] = e.values()
        # B of the sample guesses a window around each quantile; one pass over B
        balance = {
            i: torch.cat(
                [pcb_balance(t, s, n, lo[i], hi[i]) for t, s, n in sample.parts()]
                + [torch.empty(0)]
            )
            for i, sample in samples.items()
        }
        del samples
        found = select_in_window(
            model,
            {i: k for i, (k,) in q_ranks.items() if i in balance},
            balance,
            lambda x, blk: _balances(x, blk, lo, hi),
            "statistics: balance quantile",
            check=False,
        )
        if found is None:  # a window missed: the radix passes
            return self._quantiles(model, lo, hi, q_ranks)
        bounds_of: dict[int, Bounds] = {
            i: (lo[i], hi[i], value, top) for i, (value, top) in found.items()
        }
        return {"pcb_bounds": bounds_of}


class _Sample:
    """Sampled τ of one model and Σj τj at the same elements, with the number of models
    n of each stretch, in two buffers (kept small arrays would fragment the heap)."""

    def __init__(self, capacity: int) -> None:
        self.tau = torch.empty(capacity, dtype=torch.float32)
        self.total = torch.empty(capacity, dtype=torch.float32)
        self.size = 0
        self.stretches: list[tuple[int, int]] = []  # (end, n)

    def add(self, tau: torch.Tensor, total: torch.Tensor, n: int) -> None:
        end = self.size + tau.numel()
        if end > self.tau.numel():  # (a stretch per tensor can round up: rarely)
            self.tau = torch.cat([self.tau[: self.size], torch.empty(end)])
            self.total = torch.cat([self.total[: self.size], torch.empty(end)])
        self.tau[self.size : end] = tau
        self.total[self.size : end] = total
        if self.stretches and self.stretches[-1][1] == n:
            self.stretches[-1] = (end, n)
        else:
            self.stretches.append((end, n))
        self.size = end

    def parts(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        start = 0
        for end, n in self.stretches:
            yield self.tau[start:end].clone(), self.total[start:end], n
            start = end


def _sum(taus: list[torch.Tensor]) -> torch.Tensor:
    """Σj τj, summed in the order of the merge."""
    total = taus[0].clone()
    for t in taus[1:]:
        total += t
    return total


def _balances(
    x: TensorInputs, blk: Block, lo: dict[int, float], hi: dict[int, float]
) -> Iterator[tuple[int, torch.Tensor]]:
    """B of every model on this block (with each model's clip bounds)."""
    if x.count == 0:
        return
    taus = [blk.tau(j) for j in range(x.count)]
    total = _sum(taus)
    for j, tau in enumerate(taus):
        i = x.model_indices[j]
        yield i, pcb_balance(tau, total, x.count, lo[i], hi[i])


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
