"""A plain float64 re-implementation of AlphaEdit's update (Fang et al. 2025, eq. 14 with the
reference code's l2 weight), in numpy, to test ``workers.edit.algebra`` and
``workers.edit.alphaedit`` against: the projector from an SVD of C (as the paper's code
does, not an eigendecomposition), an explicit inverse, the formula as printed.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def reference_projector(C: np.ndarray, threshold: float) -> np.ndarray:
    """P = Û Ûᵀ, Û the left singular vectors of C with singular value below ``threshold``."""
    U, S, _ = np.linalg.svd(np.asarray(C, dtype=np.float64))
    small = U[:, threshold > S]
    return small @ small.T


def reference_delta(
    R: np.ndarray,
    K1: np.ndarray,
    C: np.ndarray,
    threshold: float,
    l2: float,
    Kp: np.ndarray | None = None,
) -> np.ndarray:
    """Δ = R K₁ᵀ P (Kₚ Kₚᵀ P + K₁ K₁ᵀ P + l2·I)⁻¹ ([d_out, d_in])."""
    R, K1 = np.asarray(R, np.float64), np.asarray(K1, np.float64)
    P = reference_projector(C, threshold)
    M = K1 @ K1.T @ P + l2 * np.eye(P.shape[0])
    if Kp is not None:
        Kp = np.asarray(Kp, np.float64)
        M = M + Kp @ Kp.T @ P
    return R @ K1.T @ P @ np.linalg.inv(M)


def module_inputs(model: Any, tokenizer: Any, module: str, text: str) -> np.ndarray:
    """``module``'s input at every token of ``text`` ([tokens, d_in], float64), one
    unpadded sequence through a forward hook."""
    import torch

    seen: list[np.ndarray] = []
    handle = model.get_submodule(module).register_forward_hook(
        lambda _m, args, _out: seen.append(args[0][0].double().numpy())
    )
    try:
        with torch.no_grad():
            model(torch.tensor([tokenizer(text).input_ids]))
    finally:
        handle.remove()
    return seen[0]


def second_moment(model: Any, tokenizer: Any, module: str, texts: list[str]) -> np.ndarray:
    """C = (1/N) Σ a aᵀ over ``module``'s input at every token of ``texts``."""
    A = np.concatenate([module_inputs(model, tokenizer, module, t) for t in texts])
    return A.T @ A / A.shape[0]


def last_word_key(
    model: Any, tokenizer: Any, module: str, templates: list[str], prompt: str
) -> np.ndarray:
    """The mean over ``templates`` of ``module``'s input at the last token of
    ``template.format(prompt)`` (the subject's last token when the subject ends the
    prompt)."""
    return np.mean(
        [module_inputs(model, tokenizer, module, t.format(prompt))[-1] for t in templates], 0
    )
