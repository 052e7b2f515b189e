"""The update algebra of ROME and MEMIT as pure functions of tensors.

Weights are in nn.Linear orientation, W: [d_out, d_in], keys k ∈ R^{d_in}, values
v ∈ R^{d_out}; a GPT-2 Conv1D weight is the transpose (the caller transposes ΔW).
"""

from __future__ import annotations

import torch


def rome_direction(k_bar: torch.Tensor, C: torch.Tensor | None) -> torch.Tensor:
    """u = C⁻¹k̄ (ROME eq. 2, solved in float64), or k̄ when C is None (no mom2 adjustment).

    Returned in float32 with unit norm: the scale of u cancels in ΔW = (v* − Wk) uᵀ / (uᵀk)."""
    k = k_bar.double()
    u = k if C is None else torch.linalg.solve(C.double(), k)
    return (u / u.norm()).float()


def rome_update(
    v_star: torch.Tensor, w_k: torch.Tensor, u: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-one factors (left, right) with ΔW = left · rightᵀ = (v* − W k) uᵀ / (uᵀ k).

    After the update (W + ΔW) k = W k + (v* − W k) = v*: the key k now maps to v*. With
    consistent keys (r-ROME, Gupta et al. 2024) k and W k are the prefix-averaged key k̄
    and output; the original ROME used the unprefixed key here.
    """
    denominator = torch.dot(u.double(), k.double())
    left = ((v_star.double() - w_k.double()) / denominator).float()
    return left, u.float()


def memit_update(
    R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT eq. 14: ΔW = R Kᵀ (λC + K Kᵀ)⁻¹, solved in float64.

    R: [d_out, m] residuals, K: [d_in, m] keys, C: [d_in, d_in] second moment of keys.
    Returns (R, A) with A = (λC + K Kᵀ)⁻¹ K: [d_in, m], so ΔW = R Aᵀ = Σᵢ rᵢ aᵢᵀ — one
    rank-one factor pair per request (C and λC + KKᵀ are symmetric).
    """
    Kd = K.double()
    A = torch.linalg.solve(lam * C.double() + Kd @ Kd.T, Kd)
    return R.double().float(), A.float()


def delta_from_factors(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """ΔW = left · rightᵀ for factors stacked as columns ([d_out, m] and [d_in, m]) or
    single vectors."""
    if left.dim() == 1:
        return torch.outer(left, right)
    return left @ right.T


def relative_norm(delta: torch.Tensor, W: torch.Tensor) -> float:
    """‖ΔW‖_F / ‖W‖_F."""
    return float(delta.double().norm() / W.double().norm())


def clamp_norm(delta: torch.Tensor, max_norm: float) -> torch.Tensor:
    """δ scaled down (never up) so that ‖δ‖ ≤ max_norm."""
    n = delta.norm()
    return delta * (max_norm / n) if n > max_norm else delta
