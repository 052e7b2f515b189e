"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit sphere.

H. Karcher, "Riemannian center of mass and mollifier smoothing" (1977,
https://doi.org/10.1002/cpa.3160300502), as mergekit 0.1.5's ``karcher`` merges models
(https://arxiv.org/abs/2603.04972). The N inputs θi are the listed models and, when the
recipe names one, the base (mergekit adds ``base_model`` to the inputs); each has weight
α = 1/N. Over the flattened tensors, with ``tol`` and ``max_iter``:

    ui = θi / ‖θi‖ (0 where ‖θi‖ = 0); the valid inputs V are those with ‖θi‖ > tol,
    their weights ai = α / Σ_V α
    m = Σ ai·ui / ‖Σ ai·ui‖ (the first valid ui when that norm is below tol)
    repeat at most max_iter times:
        Ωi = arccos(clamp(m·ui, −1, 1));  g = Σ_{Ωi ≥ tol} ai·(Ωi / sin Ωi)·(ui − cos Ωi·m)
        stop when ‖g‖ < tol;  m ← cos‖g‖·m + sin‖g‖·g/‖g‖, renormalised
    out = (Σ_i α·‖θi‖)·m

Zero when no input is valid; one input gives itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from merging.inputs import Block, TensorInputs
from merging.lazy_torch import torch
from merging.method import MergeMethod, register
from merging.parameters import ParameterSpec, ParamScope


def karcher_mean(
    thetas: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float
) -> torch.Tensor:
    """The module's iteration over flattened float32 vectors; the scaled mean direction."""
    norms = [float(v.norm()) for v in thetas]
    units = [v / n if n != 0 else torch.zeros_like(v) for v, n in zip(thetas, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(thetas[0])
    alpha_sum = sum(alphas[i] for i in valid)
    a = [alphas[i] / alpha_sum for i in valid]
    u = [units[i] for i in valid]
    m = torch.zeros_like(u[0])
    for ai, ui in zip(a, u, strict=True):
        m.add_(ui, alpha=ai)
    m_norm = float(m.norm())
    m = u[0].clone() if m_norm < tol else m / m_norm
    for _ in range(max_iter):
        g = torch.zeros_like(m)
        for ai, ui in zip(a, u, strict=True):
            cos = torch.dot(m, ui).clamp(-1, 1)
            omega = torch.arccos(cos)
            if float(omega) < tol:
                continue
            g.add_((ui - cos * m).mul_(ai * (omega / torch.sin(omega))))
        g_norm = float(g.norm())
        if g_norm < tol:
            break
        g_norm_t = torch.tensor(g_norm, dtype=m.dtype, device=m.device)
        m = torch.cos(g_norm_t) * m + torch.sin(g_norm_t) * (g / g_norm)
        m_norm = float(m.norm())
        if m_norm > tol:
            m = m / m_norm
    scale = sum(al * n for al, n in zip(alphas, norms, strict=True))
    return m.mul_(scale)


@register
class Karcher(MergeMethod):
    """(Σ α·‖θi‖)·m, m the Karcher mean of the θi/‖θi‖ on the sphere, α = 1/N."""

    name = "karcher"
    title = "Karcher mean"
    reference = "https://arxiv.org/abs/2603.04972"
    needs_base = False
    optional_base = True  # mergekit adds base_model to the inputs, as one more model
    min_models = 1
    parameters = (
        ParameterSpec(
            "max_iter",
            float,
            10,
            ParamScope.SHARED,
            "most iterations of the mean (a whole number)",
            minimum=0,
            maximum=1_000_000,
            per_tensor=False,
            integer=True,
        ),
        ParameterSpec(
            "tol",
            float,
            1e-5,
            ParamScope.SHARED,
            "convergence tolerance (norms and angles below it count as 0)",
            minimum=0.0,
        ),
    )

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        return True  # norms and dot products of the whole tensors

    def merge_block(self, x: TensorInputs, b: Block) -> torch.Tensor:
        thetas = [b.theta(j).reshape(-1) for j in range(x.count)]
        if b.has_base:
            thetas.append(b.base32().reshape(-1))  # mergekit appends an unlisted base last
        if len(thetas) == 1:
            return thetas[0].clone().reshape(x.shape)
        alphas = [1.0 / len(thetas)] * len(thetas)
        out = karcher_mean(thetas, alphas, int(x.shared["max_iter"]), float(x.shared["tol"]))
        return out.reshape(x.shape)
