"""Merge methods: each a pure function of one tensor's inputs (float32) and its parameters.

Notation as in shared/specs/merge-methods.md: θ0 the base, θi the fine-tuned models,
τi = θi − θ0 their task vectors, wi their weights. Inputs arrive already cast to float32 on
the compute device; the engine casts the result to the output dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from workers.errors import InputError
from workers.merge.blocks import Block
from workers.merge.randomness import uniform
from workers.merge.selection import RankRangeStream, kth_smallest, rank_range_mask


@dataclass
class TensorInputs:
    """Everything a method sees for one tensor.

    The inputs are loaded on demand so that a method holds only what it is working on. A
    dense method takes whole tensors: ``base`` (float32, loaded on first use), ``theta(j)``,
    ``tau(j)`` (a fresh float32 copy each call, read from the page cache). A streaming method
    (``BLOCKED_FUNCTIONS``) takes ``blocks()`` instead, once per pass: every input's elements
    block by block, so that its memory is a few blocks whatever the tensor size.
    """

    name: str
    has_base: bool
    load_base: Callable[[], torch.Tensor | None]  # θ0 in float32, on the device
    count: int  # number of fine-tuned models that have this tensor
    load_raw: Callable[[int], torch.Tensor]  # j -> θj as stored (e.g. bf16), on the device
    model_indices: list[int]  # their 0-based positions among the recipe's fine-tuned models
    params: list[dict[str, Any]]  # per-model parameters, resolved for this tensor
    shared: dict[str, Any]  # shared parameters, resolved for this tensor
    seed: int
    # whole-model statistics from the extra streaming passes (global scopes)
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings for the manifest
    numel: int = 0
    # one pass over the inputs in blocks; check=False skips the NaN/Inf check of the inputs
    # (for methods whose output is non-finite wherever an input is: the engine checks it)
    blocks: Callable[..., Iterator[Block]] = field(default=lambda check=True: iter(()))

    @cached_property
    def base(self) -> torch.Tensor | None:
        return self.load_base()

    def raw(self, j: int) -> torch.Tensor:
        """θj in its stored dtype: element-wise methods accumulate it into float32 directly."""
        return self.load_raw(j)

    def theta(self, j: int) -> torch.Tensor:
        return self.load_raw(j).to(torch.float32)

    def tau(self, j: int) -> torch.Tensor:
        """τj = θj − θ0 in float32, on a fresh copy of θj."""
        assert self.base is not None
        return self.theta(j).sub_(self.base)

    def taus(self) -> Iterator[tuple[int, torch.Tensor]]:
        for j in range(self.count):
            yield j, self.tau(j)


MergeFunction = Callable[[TensorInputs], torch.Tensor]


# --- linear ---------------------------------------------------------------------------------


def linear(x: TensorInputs) -> torch.Tensor:
    """Model soup: Σ wi·θi / Σ wi (normalize) or Σ wi·θi (Wortsman et al. 2022)."""
    out = x.theta(0).mul_(x.params[0]["weight"])
    total = x.params[0]["weight"]
    for j in range(1, x.count):
        out.add_(x.raw(j), alpha=x.params[j]["weight"])  # promoted to float32 on the fly
        total += x.params[j]["weight"]
    if x.shared["normalize"]:
        if abs(total) < 1e-8:
            raise InputError(
                "the model weights sum to 0, so normalize cannot divide by them; set "
                "normalize: false or change the weights",
                tensor=x.name,
                field="parameters.weight",
            )
        out.div_(total)
    return out


# --- task arithmetic ------------------------------------------------------------------------


def task_arithmetic(x: TensorInputs) -> torch.Tensor:
    """θ0 + λ·Σ wi·τi, with wi/Σw when normalize (Ilharco et al. 2023).

    Evaluated as (1 − λ·Σ wi)·θ0 + λ·Σ wi·θi: the same float32 arithmetic up to rounding,
    but each θi is accumulated straight from its stored dtype, with no τi materialised.
    """
    assert x.base is not None
    weights = [p["weight"] for p in x.params]
    total = sum(weights)
    if x.shared["normalize"] and abs(total) >= 1e-8:
        weights = [w / total for w in weights]
    lam = x.shared["lambda"]
    out = x.base * (1 - lam * sum(weights))
    for j, w in enumerate(weights):
        out.add_(x.raw(j), alpha=lam * w)
    return out


# --- sparsifiers of the task-vector family --------------------------------------------------


def magnitude_topk(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the k = max(1, int(density·N)) largest |τ| (ties: lower index first)."""
    n = tau.numel()
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    k = max(1, int(density * n))
    return rank_range_mask(tau.abs(), 0, k, descending=True, nonnegative=True)


def breadcrumbs_mask(
    tau: torch.Tensor, density: float, gamma: float, *, per_row: bool
) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` and the bottom (1 − density − gamma) by |τ|.

    Ranks of |τ| ascending over N entries: keep = int(density·N), top = int(gamma·N),
    bottom = max(0, N − keep − top); ranks [bottom, bottom + keep) survive. With
    ``per_row`` the rule is applied to each row along the last dimension (official code).
    """
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    if per_row and tau.dim() >= 2:
        rows = tau.reshape(-1, tau.shape[-1])
        mask = torch.stack([breadcrumbs_mask(r, density, gamma, per_row=False) for r in rows])
        return mask.reshape(tau.shape)
    n = tau.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    return rank_range_mask(tau.abs(), bottom, bottom + keep, nonnegative=True)


def della_keep_probability(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune: p = (density − ε) + 2ε·rn, rn the normalised rank of |τ| in its row."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(-1, tau.shape[-1])
    cols = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=rows.device).expand_as(order))
    rn = ranks.to(torch.float32) / (cols - 1) if cols > 1 else torch.zeros_like(rows)
    return ((density - epsilon) + 2 * epsilon * rn).reshape(tau.shape)


def _l1_rescale(before: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale the kept entries (in place) so their L1 norm matches ``before``, the full task
    vector's (mergekit's rescale)."""
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept.mul_(before / after)


def _random_keep(
    x: TensorInputs, j: int, tau: torch.Tensor, p: torch.Tensor | float
) -> torch.Tensor:
    """Bernoulli(p) keep mask from the seeded per-(model, tensor) draws."""
    return uniform(x.seed, x.model_indices[j], x.name, tau.shape).to(tau.device) < p


def _sparsify(method: str, x: TensorInputs, j: int, tau: torch.Tensor) -> torch.Tensor:
    """τj' = sparsify(τj), computed in place on τj (a fresh copy the caller owns)."""
    p = x.params[j]
    density = p["density"]
    if method == "ties":
        l1 = tau.abs().sum() if x.shared["rescale"] else None
        if x.shared.get("scope") == "global":
            # TIES paper: one magnitude threshold over the whole model; entries at the
            # threshold are all kept (as the official code's |τ| >= k-th value)
            threshold = x.stats["ties_threshold"][x.model_indices[j]]
            if threshold is not None:
                tau.mul_(tau.abs() >= threshold)
        elif density < 1:
            tau.mul_(magnitude_topk(tau, density))
        return tau if l1 is None else _l1_rescale(l1, tau)
    if method in ("dare_linear", "dare_ties"):
        if density >= 1:
            return tau
        l1 = tau.abs().sum()
        tau.mul_(_random_keep(x, j, tau, density))
        if not x.shared["rescale"]:
            return tau
        if x.shared["rescale_mode"] == "inverse_p":
            return tau.div_(density) if density > 0 else tau
        return _l1_rescale(l1, tau)
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        per_row = x.shared.get("scope") == "row"
        return tau.mul_(breadcrumbs_mask(tau, density, p["gamma"], per_row=per_row))
    if method in ("della", "della_linear"):
        if density >= 1:
            return tau
        eps = p["epsilon"]
        if not (density - eps > 0 and density + eps <= 1):
            raise InputError(
                f"della needs 0 < density − epsilon and density + epsilon ≤ 1; got density "
                f"{density:g}, epsilon {eps:g}",
                tensor=x.name,
                field="parameters.epsilon",
            )
        l1 = tau.abs().sum()
        tau.mul_(_random_keep(x, j, tau, della_keep_probability(tau, density, eps)))
        return _l1_rescale(l1, tau) if x.shared["rescale"] else tau
    return tau


_BLOCK = 1 << 20  # elements per block of the consensus step: the block's working set stays in cache


def sign_consensus(
    deltas: list[torch.Tensor], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES elect + disjoint merge: s = sign(Σ Di) (0 counts as +), mi = [sign(Di) = s];
    returns (Σ mi·Di, Σ mi·wi). Works block by block; the Di are consumed (zeroed)."""
    shape = deltas[0].shape
    flat = [d.reshape(-1) for d in deltas]
    n = flat[0].numel()
    mixed = torch.empty(n, dtype=flat[0].dtype, device=flat[0].device)
    divisor = torch.empty_like(mixed)
    for start in range(0, n, _BLOCK):
        blk = [d[start : start + _BLOCK] for d in flat]
        total = blk[0].clone()
        for d in blk[1:]:
            total += d
        positive = total >= 0
        m = mixed[start : start + _BLOCK].zero_()
        div = divisor[start : start + _BLOCK].zero_()
        for d, w in zip(blk, weights, strict=True):
            agree = torch.where(positive, d > 0, d < 0)  # a zero never agrees
            m += d.mul_(agree)
            div += agree * w
    return mixed.reshape(shape), divisor.reshape(shape)


def task_vector_family(method: str, *, consensus: bool) -> MergeFunction:
    def merge(x: TensorInputs) -> torch.Tensor:
        """θ0 + λ·mixed, mixed = Σ mi·wi·τi' (÷ Σ mi·wi when normalize), τi' = sparsify(τi).

        Sign consensus (TIES): s = sign(Σ wi·τi') with 0 counted as +, mi = [sign(wi·τi') = s].
        """
        assert x.base is not None
        if x.count == 0:
            return x.base.clone()
        divisor: torch.Tensor | float
        weights = [p["weight"] for p in x.params]
        if consensus:
            deltas = [_sparsify(method, x, j, tau).mul_(weights[j]) for j, tau in x.taus()]
            mixed, divisor = sign_consensus(deltas, weights)
            del deltas
            divisor[divisor == 0] = 1.0
        else:
            mixed = torch.zeros_like(x.base)
            for j, tau in x.taus():
                mixed.add_(_sparsify(method, x, j, tau), alpha=weights[j])
            divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        if x.shared["normalize"]:
            mixed /= divisor
        return mixed.mul_(x.shared["lambda"]).add_(x.base)

    merge.__name__ = method
    return merge


# --- model stock ----------------------------------------------------------------------------


def model_stock(x: TensorInputs) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): t = k·cos / ((k − 1)·cos + 1), out = t·mean(θi) + (1 − t)·θ0.

    cos is the mean pairwise cosine of the task vectors (over the flattened tensor, or per
    row with filter_wise); t is clamped to [0, 1] (a clamp is reported in the manifest).
    """
    assert x.base is not None
    k = x.count
    if k < 2:  # fewer than two models have this tensor: nothing to estimate from
        return x.base.clone() if k == 0 else x.theta(0)
    filter_wise = x.shared["filter_wise"] and x.base.dim() >= 2
    shape = x.base.shape
    base = x.base.reshape(-1, shape[-1]) if filter_wise else x.base.reshape(1, -1)
    taus = [tau.reshape(base.shape) for _, tau in x.taus()]
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


# --- slerp ----------------------------------------------------------------------------------


def slerp(x: TensorInputs) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors; lerp when |cos Ω| > 0.9995."""
    assert x.base is not None
    if x.count == 0:
        return x.base.clone()
    t = float(x.shared["t"])
    other = x.theta(0)
    v0, v1 = x.base.reshape(-1), other.reshape(-1)
    n0, n1 = v0.norm(), v1.norm()
    a = v0 / n0 if n0 > 1e-8 else v0
    b = v1 / n1 if n1 > 1e-8 else v1
    dot = float((a * b).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        return torch.lerp(x.base, other, t)
    omega = math.acos(dot)
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * x.base + (math.sin(t * omega) / s) * other


# --- PCB ---------------------------------------------------------------------------------
# Parameter Competition Balancing (Du et al. 2024), after ``PCB_merge`` in
# duguodong7/pcb-merging. Per tensor the models are visited one at a time: first to sum the
# task vectors (the inter-model term needs Σj τj), then each again to balance and combine.


def _normalize(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)


def pcb_balance(
    tau: torch.Tensor, total: torch.Tensor, n: int, lo: float, hi: float
) -> torch.Tensor:
    """B_i = intra_i ⊙ inter_i for one model (steps 1–4).

    intra_i = exp(n·norm(A_i)²), computed as exp(n·(norm(A_i)² − 1)) (the constant factor
    cancels in the final ratio), A_i = clamp(|τ_i|, lo_i, hi_i); inter_i = tanh(τ_i ⊙ Σj τj).
    """
    a = tau.abs().clamp_(lo, hi)
    intra = _normalize(a, lo, hi).square_().sub_(1).mul_(n).exp_()
    return intra.mul_(torch.tanh(tau * total))


def pcb_score(balance: torch.Tensor, threshold: float, top: float) -> torch.Tensor:
    """S_i (step 5): normalize(clamp(B, t, max)); entries at or below the (1 − r) quantile t
    get 0 (the reference code clamps and normalizes; nothing is zeroed before)."""
    return _normalize(balance.clamp_(threshold, top), threshold, top)


def pcb_clip_ranks(d: int, clip: float) -> tuple[int, int]:
    """1-based ranks of lo = sorted(|T|)[int(d·c)] and hi = sorted(|T|)[int(d·(1−c)) − 1]."""
    return int(d * clip) + 1, max(1, int(d * (1 - clip)))


def pcb_quantile_rank(d: int, density: float) -> int:
    """1-based rank of the threshold: index int(d·(1 − r)) of the ascending sort."""
    return min(d, int(d * (1 - density)) + 1)


def pcb_total(x: TensorInputs) -> torch.Tensor:
    total = x.tau(0)
    for j in range(1, x.count):
        total += x.tau(j)
    return total


def _pcb_statistics(
    x: TensorInputs, j: int, tau: torch.Tensor, total: torch.Tensor
) -> tuple[float, float, float, float]:
    """lo, hi (clip bounds of |τ|), the (1 − r) quantile and the maximum of B for model j."""
    if x.shared["scope"] == "global":
        i = x.model_indices[j]
        st = x.stats
        return st["pcb_lo"][i], st["pcb_hi"][i], st["pcb_threshold"][i], st["pcb_max"][i]
    d = tau.numel()
    lo, hi = kth_smallest(
        tau.abs(), list(pcb_clip_ranks(d, x.shared["clip_ratio"])), nonnegative=True
    )
    balance = pcb_balance(tau, total, x.count, lo, hi)
    (threshold,) = kth_smallest(balance, [pcb_quantile_rank(d, x.shared["density"])])
    return lo, hi, threshold, float(balance.max())


def pcb(x: TensorInputs) -> torch.Tensor:
    """out = θ0 + Σi λi·Tc_i·S_i / max(Σi S_i, 1e-12), Tc_i = sign(τi)·clamp(|τi|, lo_i, hi_i).

    Once a model's statistics are known, B, S and Tc are element-wise: they are computed block
    by block so that their temporaries stay small.
    """
    assert x.base is not None
    if x.count == 0:
        return x.base.clone()
    total = pcb_total(x).reshape(-1)
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for j, tau in x.taus():
        lo, hi, threshold, top = _pcb_statistics(x, j, tau.reshape(-1), total)
        weight = x.params[j]["weight"]
        flat = tau.reshape(-1)
        for start in range(0, flat.numel(), _BLOCK):
            t = flat[start : start + _BLOCK]
            score = pcb_score(
                pcb_balance(t, total[start : start + _BLOCK], x.count, lo, hi), threshold, top
            )
            clipped = torch.sign(t).mul_(t.abs().clamp_(lo, hi))
            num[start : start + _BLOCK] += clipped.mul_(score).mul_(weight)
            den[start : start + _BLOCK] += score
        del tau, flat
    return num.div_(den.clamp_(min=1e-12)).reshape(x.base.shape).add_(x.base)


METHOD_FUNCTIONS: dict[str, MergeFunction] = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "ties": task_vector_family("ties", consensus=True),
    "dare_linear": task_vector_family("dare_linear", consensus=False),
    "dare_ties": task_vector_family("dare_ties", consensus=True),
    "breadcrumbs": task_vector_family("breadcrumbs", consensus=False),
    "breadcrumbs_ties": task_vector_family("breadcrumbs_ties", consensus=True),
    "della": task_vector_family("della", consensus=True),
    "della_linear": task_vector_family("della_linear", consensus=False),
    "pcb": pcb,
    "model_stock": model_stock,
    "slerp": slerp,
}


# --- streaming (block by block) versions ----------------------------------------------------
# The same arithmetic as the dense functions above, element by element, on blocks of the
# flattened tensors (workers/merge/blocks.py). Per-tensor order statistics (TIES top-k,
# Breadcrumbs' rank window) are found exactly by radix select over the blocks first
# (RankRangeStream): two extra read passes instead of holding the tensor. A function returns
# None for a configuration it does not stream (the engine then uses the dense function).

# yields the merged float32 blocks in order; a yielded block may be a buffer the function
# reuses for the next one (the engine copies it out before asking for the next)
BlockedFunction = Callable[[TensorInputs], Generator[torch.Tensor, None, None] | None]


class _Float32Scratch:
    """Casts blocks to float32 into one reused buffer: a half-precision operand makes add_
    take a slow mixed-dtype path (several times slower than a cast and a float32 add on a
    cache-sized block)."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def __call__(self, raw: torch.Tensor, *, copy: bool = False) -> torch.Tensor:
        if raw.dtype == torch.float32 and not copy:
            return raw
        if self._buf is None or self._buf.numel() < raw.numel():
            self._buf = torch.empty(raw.numel(), dtype=torch.float32, device=raw.device)
        return self._buf[: raw.numel()].view(raw.shape).copy_(raw)


def linear_blocks(x: TensorInputs) -> Generator[torch.Tensor, None, None] | None:
    weights = [p["weight"] for p in x.params]
    total = sum(weights)
    if x.shared["normalize"] and abs(total) < 1e-8:
        return None  # the dense function raises the error

    def merge() -> Generator[torch.Tensor, None, None]:
        # NaN/Inf in an input always make the output non-finite here: the engine checks that
        as_float32 = _Float32Scratch()
        for b in x.blocks(check=False):
            out = b.theta(0).mul_(weights[0])
            for j in range(1, x.count):
                out.add_(as_float32(b.raws[j]), alpha=weights[j])
            yield out.div_(total) if x.shared["normalize"] else out

    return merge()


def task_arithmetic_blocks(x: TensorInputs) -> Generator[torch.Tensor, None, None] | None:
    weights = [p["weight"] for p in x.params]
    total = sum(weights)
    if x.shared["normalize"] and abs(total) >= 1e-8:
        weights = [w / total for w in weights]
    lam = x.shared["lambda"]
    keep = 1 - lam * sum(weights)

    def merge() -> Generator[torch.Tensor, None, None]:
        # (1 − λ·Σ wi)·θ0 + Σ λ·wi·θi as in task_arithmetic. A NaN/Inf input always makes
        # the output non-finite (0·NaN = NaN, ∞ − ∞ = NaN), which the engine checks.
        as_float32, acc = _Float32Scratch(), _Float32Scratch()
        for b in x.blocks(check=False):
            assert b.base_raw is not None
            out = acc(b.base_raw, copy=True).mul_(keep)
            for j, w in enumerate(weights):
                out.add_(as_float32(b.raws[j]), alpha=lam * w)
            yield out  # reused for the next block: the engine copies it out

    return merge()


def _rank_window(x: TensorInputs, method: str, j: int) -> RankRangeStream | None:
    """The stable-rank window of |τj| that the sparsifier keeps (None: keep everything)."""
    p, n = x.params[j], x.numel
    density = p["density"]
    if density >= 1:
        return None
    if method == "ties":
        if density <= 0 or n == 0:
            return RankRangeStream(n, 0, 0)
        return RankRangeStream(n, 0, max(1, int(density * n)), descending=True)
    keep, top = int(density * n), int(p["gamma"] * n)
    bottom = max(0, n - keep - top)
    return RankRangeStream(n, bottom, bottom + keep)


def task_vector_family_blocks(method: str, *, consensus: bool) -> BlockedFunction:
    def merge(x: TensorInputs) -> Generator[torch.Tensor, None, None] | None:
        if method == "ties":
            if x.shared["rescale"]:
                return None  # L1 rescale needs whole-tensor norms: dense
            global_scope = x.shared.get("scope") == "global"
        elif method in ("breadcrumbs", "breadcrumbs_ties"):
            if x.shared.get("scope") == "row":
                return None
            global_scope = False
        else:
            return None  # DARE, DELLA: random draws and L1 rescale, dense
        weights = [p["weight"] for p in x.params]
        lam, normalize = x.shared["lambda"], x.shared["normalize"]
        thresholds: list[float | None] = []
        windows: list[RankRangeStream | None] = []
        for j in range(x.count):
            if global_scope:
                thresholds.append(x.stats["ties_threshold"][x.model_indices[j]])
                windows.append(None)
            else:
                thresholds.append(None)
                windows.append(_rank_window(x, method, j))
        selecting = [w for w in windows if w is not None and w.needs_selection]

        def sparse_taus(b: Block) -> list[torch.Tensor]:
            out = []
            for j in range(x.count):
                tau, window, threshold = b.tau(j), windows[j], thresholds[j]
                if window is not None:
                    tau.mul_(window.mask(tau.abs()))
                elif threshold is not None:
                    tau.mul_(tau.abs() >= threshold)
                out.append(tau)
            return out

        def run() -> Generator[torch.Tensor, None, None]:
            if selecting:  # exact boundaries of every model's rank window: two radix passes
                for b in x.blocks():
                    for j, w in enumerate(windows):
                        if w is not None and w.needs_selection:
                            w.observe_high(b.tau(j).abs_())
                for w in selecting:
                    w.end_high()
                for b in x.blocks(check=False):
                    for j, w in enumerate(windows):
                        if w is not None and w.needs_selection:
                            w.observe_low(b.tau(j).abs_())
                for w in selecting:
                    w.end_low()
            for b in x.blocks(check=not selecting):
                if x.count == 0:
                    yield b.base32().clone()
                    continue
                taus = sparse_taus(b)
                divisor: torch.Tensor | float
                if consensus:
                    mixed, divisor = sign_consensus(
                        [t.mul_(w) for t, w in zip(taus, weights, strict=True)], weights
                    )
                    divisor[divisor == 0] = 1.0
                else:
                    mixed = torch.zeros_like(taus[0])
                    for t, w in zip(taus, weights, strict=True):
                        mixed.add_(t, alpha=w)
                    divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
                if normalize:
                    mixed /= divisor
                yield mixed.mul_(lam).add_(b.base32())

        return run()

    merge.__name__ = f"{method}_blocks"
    return merge


def pcb_blocks(x: TensorInputs) -> Generator[torch.Tensor, None, None] | None:
    """PCB with whole-model statistics (``scope: global``): element-wise once they are known."""
    if x.shared["scope"] != "global":
        return None  # per-tensor quantiles of B: dense
    weights = [p["weight"] for p in x.params]
    st = x.stats
    stats = [
        (st["pcb_lo"][i], st["pcb_hi"][i], st["pcb_threshold"][i], st["pcb_max"][i])
        for i in x.model_indices
    ]

    def run() -> Generator[torch.Tensor, None, None]:
        for b in x.blocks():
            if x.count == 0:
                yield b.base32().clone()
                continue
            taus = [b.tau(j) for j in range(x.count)]
            total = taus[0].clone()
            for t in taus[1:]:
                total += t
            num = torch.zeros_like(total)
            den = torch.zeros_like(total)
            for t, (lo, hi, threshold, top), w in zip(taus, stats, weights, strict=True):
                score = pcb_score(pcb_balance(t, total, x.count, lo, hi), threshold, top)
                clipped = torch.sign(t).mul_(t.abs().clamp_(lo, hi))
                num += clipped.mul_(score).mul_(w)
                den += score
            yield num.div_(den.clamp_(min=1e-12)).add_(b.base32())

    return run()


BLOCKED_FUNCTIONS: dict[str, BlockedFunction] = {
    "linear": linear_blocks,
    "task_arithmetic": task_arithmetic_blocks,
    "ties": task_vector_family_blocks("ties", consensus=True),
    "breadcrumbs": task_vector_family_blocks("breadcrumbs", consensus=False),
    "breadcrumbs_ties": task_vector_family_blocks("breadcrumbs_ties", consensus=True),
    "pcb": pcb_blocks,
}
