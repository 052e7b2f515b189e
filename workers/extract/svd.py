"""The truncated SVD of one weight difference ΔW and its split into LoRA factors.

ΔW ≈ B·A with B = U_k·√Σ_k (out × k) and A = √Σ_k·V_kᵀ (k × in): the best rank-k
approximation in the Frobenius norm (Eckart–Young), which is PEFT's ``lora_B @ lora_A`` at
scale 1 (``lora_alpha = r``).

√σ goes to each factor (as mergekit-extract-lora does by default, and PiSSA, Meng et al.
2024, initialises its adapters) rather than σ to B: the two factors then have the same
spectral norm √σ₁, so neither is orders of magnitude smaller than the other when stored in
16-bit floats, and an adapter trained further from this start gets gradients of the same
scale in A and B.

Two ways to the leading singular triples:

- exact: ``torch.linalg.svd`` of ΔW (all min(m, n) of them);
- randomized: Halko, Martinsson & Tropp 2011 ("Finding structure with randomness"),
  Algorithm 4.4 (randomized subspace iteration) then Algorithm 5.1 (direct SVD): a Gaussian
  sketch Ω of k + p columns drawn from a generator seeded per tensor, Y = ΔW·Ω,
  ``power_iterations`` rounds of QR-orthonormalised (ΔW·ΔWᵀ) products, then the SVD of
  the small QᵀΔW. Exact for a ΔW of rank ≤ k + p; for a slowly decaying spectrum the power
  iterations close most of the gap to the exact truncation.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

OVERSAMPLE = 10  # Halko et al. §4.2: p = 5 or 10 extra columns
EXACT_UP_TO = 1024  # auto: matrices with min(m, n) at most this get the exact SVD
RANDOMIZED_FRACTION = 4  # auto: randomized only when k + p ≤ min(m, n) / this


@dataclass(frozen=True)
class Factors:
    """ΔW ≈ b @ a, float32 on ΔW's device, and what the truncation kept."""

    a: torch.Tensor  # (rank, in)
    b: torch.Tensor  # (out, rank)
    singular_values: torch.Tensor  # every one computed, descending (float64, CPU)
    rank: int
    kept_energy: float  # Σ_{i≤rank} σᵢ² / ‖ΔW‖²_F
    method: str  # "exact" or "randomized"


def tensor_seed(seed: int, name: str) -> int:
    """The randomized SVD's seed for tensor ``name``: the same for the same recipe seed and
    tensor whatever order or process computes it."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def randomized_svd(
    x: torch.Tensor, k: int, *, power_iterations: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``k`` singular triples (U, σ, Vᵀ) of ``x`` by randomized subspace
    iteration (Halko et al. 2011, Alg. 4.4 and 5.1), with k + OVERSAMPLE sketch columns."""
    m, n = x.shape
    width = min(k + OVERSAMPLE, m, n)
    omega = torch.randn(n, width, generator=generator, device=x.device, dtype=x.dtype)
    q, _ = torch.linalg.qr(x @ omega)
    for _ in range(power_iterations):
        z, _ = torch.linalg.qr(x.T @ q)
        q, _ = torch.linalg.qr(x @ z)
    u_small, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
    return (q @ u_small)[:, :k], s[:k], vh[:k]


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above σ₁·max(m, n)·ε(float32) (numpy.linalg.matrix_rank's tolerance):
    those below are float32 rounding of the difference, not part of it."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((s > tol).sum())


def energy_rank(s: torch.Tensor, total: float, fraction: float) -> int:
    """The fewest leading singular values whose squares hold ``fraction`` of ``total``
    (= ‖ΔW‖²_F); len(s) when even all of them do not."""
    cumulative = torch.cumsum(s.double() ** 2, 0)
    reached = torch.nonzero(cumulative >= fraction * total)
    return int(reached[0]) + 1 if reached.numel() else int(s.numel())


def choose_method(method: str, shape: tuple[int, int], needed: int | None) -> str:
    """``auto``: exact for small matrices, for a rank near min(m, n), and when every
    singular value is needed (``needed`` None: energy without max_rank); else randomized."""
    if method != "auto":
        return method
    smallest = min(shape)
    if needed is None or smallest <= EXACT_UP_TO:
        return "exact"
    return "randomized" if (needed + OVERSAMPLE) * RANDOMIZED_FRACTION <= smallest else "exact"


def low_rank_factors(
    delta: torch.Tensor,
    *,
    rank: int | None,
    energy: float | None,
    max_rank: int | None,
    method: str,
    power_iterations: int,
    seed: int,
) -> Factors:
    """The LoRA factors of ``delta`` (2-D float32, not all zero): at ``rank`` (clamped to
    min(m, n)), or at the fewest singular values holding ``energy`` of ‖ΔW‖²_F (at most
    ``max_rank`` and the numerical rank)."""
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    full = min(shape)
    needed = min(rank, full) if rank is not None else (min(max_rank, full) if max_rank else None)
    how = choose_method(method, shape, needed)
    if how == "exact":
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        assert needed is not None  # the recipe refuses randomized without a rank bound
        gen = torch.Generator(device=delta.device).manual_seed(seed)
        u, s, vh = randomized_svd(delta, needed, power_iterations=power_iterations, generator=gen)
    s64 = s.detach().to("cpu", torch.float64)
    total = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
    if rank is not None:
        k = min(rank, int(s.numel()))
    else:
        assert energy is not None
        k = min(energy_rank(s64, total, energy), max(1, numerical_rank(s64, shape)))
        if max_rank is not None:
            k = min(k, max_rank)
    k = max(1, k)
    root = torch.sqrt(s[:k]).unsqueeze(0)  # √σ to each factor (module docstring)
    b = u[:, :k] * root
    a = root.T * vh[:k]
    kept = float((s64[:k] ** 2).sum()) / total if total > 0 else 1.0
    return Factors(a, b, s64, k, min(1.0, kept), how)


def relative_error(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """‖ΔW − B·A‖_F / ‖ΔW‖_F of the factors as stored (float32 product)."""
    norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
    if norm == 0.0:
        return 0.0
    residual = delta - b.float() @ a.float()
    err = float(torch.linalg.vector_norm(residual, dtype=torch.float64)) / norm
    return err if math.isfinite(err) else math.inf
