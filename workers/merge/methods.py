"""Merge methods: each a pure function of one tensor's inputs (float32) and its parameters.

Notation as in shared/specs/merge-methods.md: θ0 the base, θi the fine-tuned models,
τi = θi − θ0 their task vectors, wi their weights. Inputs arrive already cast to float32 on
the compute device; the engine casts the result to the output dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.errors import InputError
from workers.merge.randomness import uniform
from workers.merge.selection import rank_range_mask


@dataclass
class TensorInputs:
    """Everything a method sees for one tensor."""

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]  # fine-tuned models that have this tensor
    model_indices: list[int]  # their 0-based positions among the recipe's fine-tuned models
    params: list[dict[str, Any]]  # per-model parameters, resolved for this tensor
    shared: dict[str, Any]  # shared parameters, resolved for this tensor
    seed: int
    # whole-model statistics from the extra streaming passes (global scopes), per model index
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings for the manifest

    @property
    def task_vectors(self) -> list[torch.Tensor]:
        assert self.base is not None
        return [m - self.base for m in self.models]


MergeFunction = Callable[[TensorInputs], torch.Tensor]


# --- linear ---------------------------------------------------------------------------------


def linear(x: TensorInputs) -> torch.Tensor:
    """Model soup: Σ wi·θi / Σ wi (normalize) or Σ wi·θi (Wortsman et al. 2022)."""
    out = torch.zeros_like(x.models[0])
    total = 0.0
    for theta, p in zip(x.models, x.params, strict=True):
        out.add_(theta, alpha=p["weight"])
        total += p["weight"]
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


# --- sparsifiers of the task-vector family --------------------------------------------------


def magnitude_topk(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the k = max(1, int(density·N)) largest |τ| (ties: lower index first)."""
    n = tau.numel()
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    k = max(1, int(density * n))
    # ranks of −|τ| in a stable ascending sort = ranks of |τ| descending, lower index first
    return rank_range_mask(-tau.abs(), 0, k)


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
    return rank_range_mask(tau.abs(), bottom, bottom + keep)


def della_keep_probability(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune: p = (density − ε) + 2ε·rn, rn the normalised rank of |τ| in its row."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(-1, tau.shape[-1])
    cols = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=rows.device).expand_as(order))
    rn = ranks.to(torch.float32) / (cols - 1) if cols > 1 else torch.zeros_like(rows)
    return ((density - epsilon) + 2 * epsilon * rn).reshape(tau.shape)


def _l1_rescale(tau: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale the kept entries so their L1 norm matches the full task vector's (mergekit)."""
    before = tau.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def _random_keep(x: TensorInputs, j: int, p: torch.Tensor | float) -> torch.Tensor:
    u = uniform(x.seed, x.model_indices[j], x.name, x.models[j].shape).to(x.models[j].device)
    return u < p


def _sparsify(method: str, x: TensorInputs, j: int, tau: torch.Tensor) -> torch.Tensor:
    p = x.params[j]
    density = p["density"]
    if method in ("ties",):
        if x.shared.get("scope") == "global":
            # TIES paper: one magnitude threshold over the whole model; entries at the
            # threshold are all kept (as the official code's |τ| >= k-th value)
            threshold = x.stats["ties_threshold"][x.model_indices[j]]
            mask = (
                tau.abs() >= threshold
                if threshold is not None
                else torch.ones_like(tau, dtype=torch.bool)
            )
        else:
            mask = magnitude_topk(tau, density)
        kept = tau * mask
        return _l1_rescale(tau, kept) if x.shared["rescale"] else kept
    if method in ("dare_linear", "dare_ties"):
        if density >= 1:
            return tau
        kept = tau * _random_keep(x, j, density)
        if not x.shared["rescale"]:
            return kept
        if x.shared["rescale_mode"] == "inverse_p":
            return kept / density if density > 0 else kept
        return _l1_rescale(tau, kept)
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        per_row = x.shared.get("scope") == "row"
        return tau * breadcrumbs_mask(tau, density, p["gamma"], per_row=per_row)
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
        kept = tau * _random_keep(x, j, della_keep_probability(tau, density, eps))
        return _l1_rescale(tau, kept) if x.shared["rescale"] else kept
    return tau


def task_vector_family(method: str, *, consensus: bool) -> MergeFunction:
    def merge(x: TensorInputs) -> torch.Tensor:
        """θ0 + λ·mixed, mixed = Σ mi·wi·τi' (÷ Σ mi·wi when normalize), τi' = sparsify(τi).

        Sign consensus (TIES): s = sign(Σ wi·τi') with 0 counted as +, mi = [sign(wi·τi') = s].
        """
        assert x.base is not None
        if not x.models:
            return x.base.clone()
        mixed = torch.zeros_like(x.base)
        divisor: torch.Tensor | float
        if consensus:
            deltas = [
                _sparsify(method, x, j, tau).mul_(x.params[j]["weight"])
                for j, tau in enumerate(x.task_vectors)
            ]
            elected = torch.where(sum(deltas, torch.zeros_like(x.base)) >= 0, 1.0, -1.0)
            divisor = torch.zeros_like(x.base)
            for d, p in zip(deltas, x.params, strict=True):
                agree = torch.sign(d) == elected
                mixed += d * agree
                divisor += agree * p["weight"]
            divisor[divisor == 0] = 1.0
        else:
            total = 0.0
            for j, tau in enumerate(x.task_vectors):
                mixed.add_(_sparsify(method, x, j, tau), alpha=x.params[j]["weight"])
                total += x.params[j]["weight"]
            divisor = total if abs(total) >= 1e-8 else 1.0
        if x.shared["normalize"]:
            mixed /= divisor
        return x.base + x.shared["lambda"] * mixed

    merge.__name__ = method
    return merge


# --- model stock ----------------------------------------------------------------------------


def model_stock(x: TensorInputs) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): t = k·cos / ((k − 1)·cos + 1), out = t·mean(θi) + (1 − t)·θ0.

    cos is the mean pairwise cosine of the task vectors (over the flattened tensor, or per
    row with filter_wise); t is clamped to [0, 1] (a clamp is reported in the manifest).
    """
    assert x.base is not None
    k = len(x.models)
    if k < 2:  # fewer than two models have this tensor: nothing to estimate from
        return x.base.clone() if k == 0 else x.models[0].clone()
    filter_wise = x.shared["filter_wise"] and x.base.dim() >= 2
    shape = x.base.shape
    base = x.base.reshape(-1, shape[-1]) if filter_wise else x.base.reshape(1, -1)
    taus = [(m.reshape(base.shape) - base) for m in x.models]
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
    mean = sum(m.reshape(base.shape) for m in x.models) / k
    return (t * mean + (1 - t) * base).reshape(shape)


# --- slerp ----------------------------------------------------------------------------------


def slerp(x: TensorInputs) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors; lerp when |cos Ω| > 0.9995."""
    assert x.base is not None
    if not x.models:
        return x.base.clone()
    t = float(x.shared["t"])
    v0, v1 = x.base.reshape(-1), x.models[0].reshape(-1)
    n0, n1 = v0.norm(), v1.norm()
    a = v0 / n0 if n0 > 1e-8 else v0
    b = v1 / n1 if n1 > 1e-8 else v1
    dot = float((a * b).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        return torch.lerp(x.base, x.models[0], t)
    omega = math.acos(dot)
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * x.base + (math.sin(t * omega) / s) * x.models[0]


# --- PCB ------------------------------------------------------------------------------------


def _row_normalize(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)


def pcb_balance(taus: list[torch.Tensor], lo: list[float], hi: list[float]) -> list[torch.Tensor]:
    """PCB steps 1–4 for one tensor: B_i = intra_i ⊙ inter_i, and the clipped Tc_i.

    intra_i = exp(n·norm(A_i)²) computed as exp(n·(norm(A_i)² − 1)) (the constant factor
    cancels in the final ratio), A_i = clamp(|τ_i|, lo_i, hi_i); inter_i = tanh(τ_i ⊙ Σj τ_j).
    """
    n = len(taus)
    total = sum(taus, torch.zeros_like(taus[0]))
    out = []
    for tau, lo_i, hi_i in zip(taus, lo, hi, strict=True):
        a = tau.abs().clamp(lo_i, hi_i)
        intra = torch.exp(n * (_row_normalize(a, lo_i, hi_i) ** 2 - 1))
        out.append(intra * torch.tanh(tau * total))
    return out


def pcb_combine(
    x: TensorInputs,
    taus: list[torch.Tensor],
    balance: list[torch.Tensor],
    lo: list[float],
    hi: list[float],
    threshold: list[float],
    top: list[float],
) -> torch.Tensor:
    """PCB steps 5–6: drop B below the (1 − r) quantile, S = normalize(clamp(B, t, max)),
    merged = Σ λi·Tc_i·S_i / max(Σ S_i, 1e-12) (duguodong7/pcb-merging, ``PCB_merge``)."""
    assert x.base is not None
    num = torch.zeros_like(x.base)
    den = torch.zeros_like(x.base)
    for j, (tau, b) in enumerate(zip(taus, balance, strict=True)):
        b = torch.where(b < threshold[j], torch.zeros_like(b), b)
        s = _row_normalize(b.clamp(threshold[j], top[j]), threshold[j], top[j])
        tc = torch.sign(tau) * tau.abs().clamp(lo[j], hi[j])
        num += x.params[j]["weight"] * tc * s
        den += s
    return x.base + num / den.clamp(min=1e-12)


def pcb_tensor_stats(
    taus: list[torch.Tensor], density: float, clip: float
) -> tuple[list[float], list[float]]:
    """lo_i, hi_i of |τ_i| for ``scope: tensor`` (the same ranks as the global statistics)."""
    from workers.merge.selection import kth_smallest

    lo, hi = [], []
    for tau in taus:
        d = tau.numel()
        r_lo, r_hi = pcb_clip_ranks(d, clip)
        a, b = kth_smallest(tau.abs(), [r_lo, r_hi])
        lo.append(a)
        hi.append(b)
    return lo, hi


def pcb_clip_ranks(d: int, clip: float) -> tuple[int, int]:
    """1-based ranks of lo = sorted(|T|)[int(d·c)] and hi = sorted(|T|)[int(d·(1−c)) − 1]."""
    return int(d * clip) + 1, max(1, int(d * (1 - clip)))


def pcb_quantile_rank(d: int, density: float) -> int:
    """1-based rank of the threshold: index int(d·(1 − r)) of the ascending sort."""
    return min(d, int(d * (1 - density)) + 1)


def pcb(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    if not x.models:
        return x.base.clone()
    taus = x.task_vectors
    if x.shared["scope"] == "global":
        idx = x.model_indices
        lo = [x.stats["pcb_lo"][i] for i in idx]
        hi = [x.stats["pcb_hi"][i] for i in idx]
        balance = pcb_balance(taus, lo, hi)
        thr = [x.stats["pcb_threshold"][i] for i in idx]
        top = [x.stats["pcb_max"][i] for i in idx]
        return pcb_combine(x, taus, balance, lo, hi, thr, top)
    from workers.merge.selection import kth_smallest

    lo, hi = pcb_tensor_stats(taus, x.shared["density"], x.shared["clip_ratio"])
    balance = pcb_balance(taus, lo, hi)
    d = x.base.numel()
    thr = [kth_smallest(b, [pcb_quantile_rank(d, x.shared["density"])])[0] for b in balance]
    top = [float(b.max()) for b in balance]
    return pcb_combine(x, taus, balance, lo, hi, thr, top)


METHOD_FUNCTIONS: dict[str, MergeFunction] = {
    "linear": linear,
    "task_arithmetic": task_vector_family("task_arithmetic", consensus=False),
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
