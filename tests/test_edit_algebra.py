"""The update algebra of ROME and MEMIT against small examples computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from workers.edit.algebra import (
    clamp_norm,
    delta_from_factors,
    memit_update,
    relative_norm,
    rome_direction,
    rome_update,
)
from workers.edit.architectures import architecture_for
from workers.edit.methods import edit_method
from workers.errors import InputError


def test_rome_update_matches_the_hand_computed_3x2_example():
    # W [d_out=3, d_in=2], k = (1, 2): W k = (1, 2, 3); v* = (2, 2, 5); C = diag(2, 1)
    # u ∝ C⁻¹k = (0.5, 2), uᵀk = 4.5 (unnormalised), v* − Wk = (1, 0, 2)
    # ΔW = (1, 0, 2)ᵀ (0.5, 2) / 4.5 = [[1/9, 4/9], [0, 0], [2/9, 8/9]]
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    k = torch.tensor([1.0, 2.0])
    v_star = torch.tensor([2.0, 2.0, 5.0])
    C = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    u = rome_direction(k, C)
    assert torch.allclose(u, torch.tensor([0.5, 2.0]) / math.sqrt(4.25))
    left, right = rome_update(v_star, W @ k, u, k)
    expected = torch.tensor([[1 / 9, 4 / 9], [0.0, 0.0], [2 / 9, 8 / 9]])
    assert torch.allclose(delta_from_factors(left, right), expected, atol=1e-6)
    assert torch.allclose((W + expected) @ k, v_star)


def test_rome_without_mom2_adjustment_uses_the_key_itself():
    k = torch.tensor([3.0, 4.0])
    assert torch.allclose(rome_direction(k, None), torch.tensor([0.6, 0.8]))


def test_rome_update_leaves_directions_orthogonal_to_u_unchanged():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 4, generator=g)
    A = torch.randn(4, 4, generator=g)
    C = A @ A.T + torch.eye(4)
    k = torch.randn(4, generator=g)
    v = torch.randn(5, generator=g)
    u = rome_direction(k, C)
    dW = delta_from_factors(*rome_update(v, W @ k, u, k))
    x = torch.randn(4, generator=g)
    x_perp = x - (x @ u) * u  # uᵀx_perp = 0
    assert torch.allclose((W + dW) @ k, v, atol=1e-5)
    assert torch.allclose(dW @ x_perp, torch.zeros(5), atol=1e-5)


def test_memit_update_matches_the_hand_computed_example():
    # d_in = 2, d_out = 1, one key k = (1, 0), C = I, λ = 1: λC + kkᵀ = diag(2, 1)
    # A = (λC + kkᵀ)⁻¹k = (0.5, 0); R = 3 → ΔW = R Aᵀ = [[1.5, 0]]
    R = torch.tensor([[3.0]])
    K = torch.tensor([[1.0], [0.0]])
    left, right = memit_update(R, K, torch.eye(2), 1.0)
    assert torch.allclose(delta_from_factors(left, right), torch.tensor([[1.5, 0.0]]))


def test_memit_update_equals_the_closed_form_for_a_batch():
    g = torch.Generator().manual_seed(1)
    R = torch.randn(6, 3, generator=g, dtype=torch.float64)
    K = torch.randn(4, 3, generator=g, dtype=torch.float64)
    B = torch.randn(4, 4, generator=g, dtype=torch.float64)
    C = B @ B.T + torch.eye(4, dtype=torch.float64)
    lam = 2.5
    expected = R @ K.T @ torch.linalg.inv(lam * C + K @ K.T)
    left, right = memit_update(R.float(), K.float(), C.float(), lam)
    assert torch.allclose(delta_from_factors(left, right).double(), expected, atol=1e-5)
    # one rank-one pair per request: columns of left and right
    per_request = sum(torch.outer(left[:, j], right[:, j]) for j in range(3))
    assert torch.allclose(per_request, delta_from_factors(left, right), atol=1e-6)


def test_relative_norm_and_clamp():
    assert relative_norm(torch.ones(2, 2), 2 * torch.ones(2, 2)) == pytest.approx(0.5)
    d = torch.tensor([3.0, 4.0])
    assert torch.allclose(clamp_norm(d, 1.0), torch.tensor([0.6, 0.8]))
    assert torch.equal(clamp_norm(d, 10.0), d)


def test_default_layers_rome_layer_1_memit_the_published_band_scaled_by_depth():
    rome, memit = edit_method("rome"), edit_method("memit")
    assert rome.default_layers(32) == [1]
    assert memit.default_layers(32) == [4, 5, 6, 7, 8]
    assert rome.default_layers(30) == [1]
    assert memit.default_layers(30) == [4, 5, 6, 7, 8]
    assert rome.default_layers(12) == [1]
    assert rome.default_layers(2) == [1]
    assert rome.default_layers(1) == [0]  # a one-layer model has only layer 0
    # the band 4–8 of 32 at depth 12: 4·12/32 = 1.5 rounds to 2 (half to even), 8·12/32 = 3
    assert memit.default_layers(12) == [2, 3]


def test_unknown_architecture_is_an_error_listing_the_supported_ones():
    class Config:
        model_type = "mamba"

    with pytest.raises(InputError) as e:
        architecture_for(Config(), model="./m")
    msg = str(e.value)
    assert "'mamba'" in msg and "llama" in msg and "gpt2" in msg and "qwen2" in msg


def test_gpt2_weights_are_stored_transposed():
    class Config:
        model_type = "gpt2"

    arch = architecture_for(Config())
    assert arch.transposed
    assert arch.weight_name(3) == "transformer.h.3.mlp.c_proj.weight"


def test_memit_default_lambda_keeps_the_published_ratio_to_the_key_width():
    from workers.edit.architectures import default_mom2_update_weight

    assert default_mom2_update_weight(11008) == pytest.approx(15000)  # Llama-2-7B, as published
    # SmolLM2-135M: 15000 · 1536 / 11008 = 23,040,000 / 11008
    assert default_mom2_update_weight(1536) == pytest.approx(2093.0233, abs=1e-3)
