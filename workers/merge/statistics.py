"""Whole-model statistics gathered in extra streaming passes (``scope: global``).

Each pass reads every float tensor once, one tensor at a time; exact order statistics come
from radix select (two passes: high then low 16 bits), so memory is O(65,536) counters per
model whatever the model size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch

from workers.merge.blocks import Block
from workers.merge.methods import pcb_balance, pcb_clip_ranks, pcb_quantile_rank
from workers.merge.selection import RadixSelect

if TYPE_CHECKING:
    from workers.merge.engine import _Context


class GlobalStatistic(Protocol):
    passes: int

    def compute(self) -> dict[str, Any]: ...


def _model_sizes(ctx: _Context) -> dict[int, int]:
    """Number of float parameters each fine-tuned model contributes (from the headers)."""
    sizes: dict[int, int] = {m.index: 0 for m in ctx.models if m.index is not None}
    for p in ctx.plan.values():
        if p.is_float:
            for i in p.holders:
                sizes[i] += math.prod(p.shape)
    return sizes


def _select(
    ctx: _Context, ranks: dict[int, list[int]], values: Any, phase: str
) -> dict[int, list[float]]:
    """Exact ranked values per model of ``values(inputs, block) -> {model index: tensor}``,
    streamed block by block (the inputs are never held whole)."""
    sel = {i: RadixSelect(ranks=r) for i, r in ranks.items()}
    for x in ctx.float_tensors(f"{phase} (1/2)"):
        for b in x.blocks():
            for i, v in values(x, b):
                if i in sel:
                    sel[i].observe_high(v)
    for s in sel.values():
        s.end_high()
    for x in ctx.float_tensors(f"{phase} (2/2)"):
        for b in x.blocks(check=False):
            for i, v in values(x, b):
                if i in sel:
                    sel[i].observe_low(v)
    for s in sel.values():
        s.end_low()
    return {i: s.values for i, s in sel.items()}


def _magnitudes(x: Any, b: Block) -> Iterator[tuple[int, torch.Tensor]]:
    for j in range(x.count):
        yield x.model_indices[j], b.tau(j).abs_()


class TiesGlobal:
    """TIES paper trim: per model, the magnitude of its k-th largest |τ| over all parameters,
    k = max(1, int(density·N))."""

    passes = 2

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx

    def compute(self) -> dict[str, Any]:
        ctx = self.ctx
        sizes = _model_sizes(ctx)
        first = next(iter(ctx.plan))
        ranks: dict[int, list[int]] = {}
        thresholds: dict[int, float | None] = {}
        for m in ctx.models:
            assert m.index is not None
            density = ctx.model_params(m, first)["density"]
            n = sizes[m.index]
            if density >= 1 or n == 0:
                thresholds[m.index] = None
            elif density <= 0:
                thresholds[m.index] = math.inf
            else:
                k = max(1, int(density * n))
                ranks[m.index] = [n - k + 1]
        if ranks:
            for i, (v,) in _select(ctx, ranks, _magnitudes, "statistics").items():
                thresholds[i] = v
        return {"ties_threshold": thresholds}


class PcbGlobal:
    """PCB's per-model statistics over all parameters: the clip bounds lo/hi of |τ|, then
    the (1 − r) quantile and the maximum of the balance matrix B."""

    passes = 4

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx

    def compute(self) -> dict[str, Any]:
        ctx = self.ctx
        sizes = _model_sizes(ctx)
        first = next(iter(ctx.plan))
        shared = ctx.shared_params(first)
        density, clip = shared["density"], shared["clip_ratio"]
        clip_ranks = {i: list(pcb_clip_ranks(n, clip)) for i, n in sizes.items() if n > 0}
        bounds = _select(ctx, clip_ranks, _magnitudes, "statistics: clip bounds")
        lo = {i: v[0] for i, v in bounds.items()}
        hi = {i: v[1] for i, v in bounds.items()}
        top: dict[int, float] = {i: -math.inf for i in bounds}

        def balance(x: Any, blk: Block) -> Iterator[tuple[int, torch.Tensor]]:
            if x.count == 0:
                return
            taus = [blk.tau(j) for j in range(x.count)]
            total = taus[0].clone()  # Σj τj, summed in the order of pcb_total
            for t in taus[1:]:
                total += t
            for j, tau in enumerate(taus):
                i = x.model_indices[j]
                b = pcb_balance(tau, total, x.count, lo[i], hi[i])
                if b.numel():
                    top[i] = max(top[i], float(b.max()))
                yield i, b

        q_ranks = {i: [pcb_quantile_rank(n, density)] for i, n in sizes.items() if n > 0}
        quant = _select(ctx, q_ranks, balance, "statistics: balance quantile")
        return {
            "pcb_lo": lo,
            "pcb_hi": hi,
            "pcb_threshold": {i: v[0] for i, v in quant.items()},
            "pcb_max": top,
        }


GLOBAL_STATISTICS: dict[str, type[TiesGlobal] | type[PcbGlobal]] = {
    "ties": TiesGlobal,
    "pcb": PcbGlobal,
}
