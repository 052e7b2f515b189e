"""The update algebra of ROME, MEMIT and AlphaEdit as pure functions of tensors.

Weights are in nn.Linear orientation, W: [d_out, d_in], keys k ∈ R^{d_in}, values
v ∈ R^{d_out}; a GPT-2 Conv1D weight is the transpose (the caller transposes ΔW).
"""

from __future__ import annotations

import math

import torch

from workers.errors import InputError


def restricted(M: torch.Tensor, X: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """N B in float64 from X = M⁻¹B: X itself without ``keep``, otherwise N B with
    N = M⁻¹ − M⁻¹P (PᵀM⁻¹P)⁻¹ PᵀM⁻¹ (P a basis of the kept keys, [d_in, p]): the inverse
    restricted to the M-orthogonal complement of P, so that Pᵀ(N B) = 0 (up to rounding).

    For a symmetric positive definite M, ΔW = Y (N B)ᵀ is the update of least
    tr(ΔW M ΔWᵀ)-type cost among those with ΔW P = 0: the keys in P keep their outputs."""
    if keep is None or keep.shape[1] == 0:
        return X
    P = key_basis(keep)
    MiP = torch.linalg.solve(M.to(P.device, torch.float64), P)
    return X - MiP @ torch.linalg.solve(P.T @ MiP, P.T @ X)


def key_basis(keys: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """An orthonormal basis ([d_in, r], float64) of the span of the columns of ``keys``.

    Columns are scaled to unit norm first (a first-token key can be a hundred times longer
    than the others), then directions with singular value ≤ tol · the largest are dropped:
    keys read twice (the same prefix in two prompts) or equal up to float32 rounding count
    once, and the constraint stays well conditioned."""
    K = keys.double()
    K = K / K.norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    U, S, _ = torch.linalg.svd(K, full_matrices=False)
    return U[:, tol * S[0] < S]


def rome_direction(
    k_bar: torch.Tensor, C: torch.Tensor | None, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """u = C⁻¹k̄ (ROME eq. 2, solved in float64), or k̄ when C is None (no mom2 adjustment).

    With ``keep`` ([d_in, p], keys whose outputs must not change) u = N k̄ with N the
    inverse restricted to the C-orthogonal complement of the kept keys (:func:`restricted`):
    uᵀk_j = 0 for every kept key, so ΔW k_j = 0.

    Returned in float32 with unit norm: the scale of u cancels in ΔW = (v* − Wk) uᵀ / (uᵀk)."""
    k = k_bar.double()
    free = k if C is None else torch.linalg.solve(C.to(k.device, torch.float64), k)
    if keep is None:
        u = free
    else:
        M = torch.eye(k.shape[0], dtype=torch.float64, device=k.device) if C is None else C
        u = restricted(M, free[:, None], keep)[:, 0]
    norm = float(u.norm())
    if not math.isfinite(norm) or norm <= 1e-12 * float(free.norm()):
        raise InputError(
            "the kept keys span the subject's key: no update can change it while keeping "
            "them (drop keep_prompts that repeat the edited fact's context)"
        )
    return (u / norm).float()


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
    R: torch.Tensor,
    K: torch.Tensor,
    C: torch.Tensor,
    lam: float,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT eq. 14: ΔW = R Kᵀ (λC + K Kᵀ)⁻¹, solved in float64.

    R: [d_out, m] residuals, K: [d_in, m] keys, C: [d_in, d_in] second moment of keys.
    Returns (R, A) with A = (λC + K Kᵀ)⁻¹ K: [d_in, m], so ΔW = R Aᵀ = Σᵢ rᵢ aᵢᵀ — one
    rank-one factor pair per request (C and λC + KKᵀ are symmetric). With ``keep``
    ([d_in, p]) the inverse is restricted to the complement of the kept keys
    (:func:`restricted`): the least-squares update under the constraint ΔW P = 0.
    """
    Kd = K.double()
    M = lam * C.to(Kd.device, torch.float64) + Kd @ Kd.T
    A = restricted(M, torch.linalg.solve(M, Kd), keep)
    return R.double().float(), A.float()


def nullspace_projector(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's P = Û Ûᵀ (Fang et al. 2025, §3.2), float64 [d_in, d_in]: Û the
    eigenvectors of C = K₀K₀ᵀ (the preserved keys' second moment) whose eigenvalue is below
    ``threshold``. P k ≈ 0 for the keys that C was accumulated from (to the threshold), so an
    update ΔW = ΔW P leaves their outputs where they were. (The reference code takes the
    SVD of C; C is symmetric positive semi-definite, so its eigenvectors are the same.)"""
    eigenvalues, U = torch.linalg.eigh(C.double())
    small = U[:, eigenvalues < threshold]
    return small @ small.T


def without_keys(P: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The projector P with the directions P k of the kept keys (``keep``, [d_in, p]) taken
    out: P' = P − Q Qᵀ, Q an orthonormal basis of P·keep. Q lies in P's range, so P' is
    again an orthogonal projector, and P' k = 0 for each kept key."""
    if keep is None or keep.shape[1] == 0:
        return P
    Pk = P @ keep.to(P)
    if float(Pk.norm()) == 0.0:
        return P
    Q = key_basis(Pk)
    return P - Q @ Q.T


def alphaedit_update(
    R: torch.Tensor,
    K1: torch.Tensor,
    P: torch.Tensor,
    Kp: torch.Tensor | None,
    l2: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit (Fang et al. 2025, eq. 14 with the reference code's l2 weight):
    Δ = R K₁ᵀ P (Kₚ Kₚᵀ P + K₁ K₁ᵀ P + l2·I)⁻¹, solved in float64.

    R: [d_out, m] residuals, K1: [d_in, m] the new keys, P: [d_in, d_in] the null-space
    projector, Kp: [d_in, p] the keys of earlier edits (None: none). Δ = Δ P holds exactly
    (Δ(S P + l2 I) = R K₁ᵀ P gives Δ = (R K₁ᵀ − Δ S) P / l2), so the keys P maps to 0 keep
    their outputs. Returns (R, A) with ΔW = R Aᵀ, A = (P S + l2 I)⁻¹ P K₁ (S = K₁K₁ᵀ + KₚKₚᵀ,
    symmetric): one rank-one factor pair per request, as :func:`memit_update`."""
    Pd = P.double()
    K = K1.to(Pd)
    S = K @ K.T
    if Kp is not None and Kp.shape[1]:
        Kpd = Kp.to(Pd)
        S = S + Kpd @ Kpd.T
    eye = torch.eye(Pd.shape[0], dtype=Pd.dtype, device=Pd.device)
    A = torch.linalg.solve(Pd @ S + l2 * eye, Pd @ K)
    A = Pd @ A  # A lies in P's range already; this keeps ΔW = ΔW P to the last bit of float64
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
