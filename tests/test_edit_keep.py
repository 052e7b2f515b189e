"""keep_prompts: the update is restricted to ΔW k = 0 for the module's input at every token
of the kept prompts, so their predictions are unchanged.

The algebra is checked against small examples computed by hand and against a second,
independent construction (the update parametrised on a basis of the kept keys' orthogonal
complement, then the unconstrained problem solved there); the models' logits are read by
plain forward passes, not by the code under test."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from schemas.edit_recipe import EditRequest, parse_edit_recipe
from schemas.recipe import RecipeError
from tests.support.tiny_edit import CONTEXT, LAYER, STRONG, TEMPLATES, settings, tiny_target
from workers.edit.algebra import delta_from_factors, memit_update, rome_direction
from workers.edit.memit import memit_edit
from workers.edit.rome import rome_edit
from workers.edit.update import EditContext
from workers.errors import InputError

# --- algebra ---------------------------------------------------------------------------


def test_rome_direction_with_a_kept_key_matches_the_hand_computed_example():
    # C = diag(1, 2, 4), k̄ = (1, 2, 2), kept key p = (1, 1, 0):
    # C⁻¹k̄ = (1, 1, 0.5), C⁻¹p = (1, 0.5, 0), pᵀC⁻¹p = 1.5, pᵀC⁻¹k̄ = 2
    # u ∝ C⁻¹k̄ − C⁻¹p (pᵀC⁻¹k̄)/(pᵀC⁻¹p) = (1, 1, 0.5) − (1, 0.5, 0)·4/3 = (−1/3, 1/3, 1/2)
    C = torch.diag(torch.tensor([1.0, 2.0, 4.0]))
    k = torch.tensor([1.0, 2.0, 2.0])
    p = torch.tensor([[1.0], [1.0], [0.0]])
    expected = torch.tensor([-1 / 3, 1 / 3, 1 / 2])
    u = rome_direction(k, C, p)
    torch.testing.assert_close(u, expected / expected.norm())
    # without mom2 adjustment (C = I): u ∝ k̄ − p (pᵀk̄)/(pᵀp) = (1, 2, 2) − (1, 1, 0)·3/2
    expected_i = torch.tensor([-0.5, 0.5, 2.0])
    torch.testing.assert_close(rome_direction(k, None, p), expected_i / expected_i.norm())


def test_repeated_or_rescaled_kept_keys_count_once():
    C = torch.diag(torch.tensor([1.0, 2.0, 4.0]))
    k = torch.tensor([1.0, 2.0, 2.0])
    p = torch.tensor([[1.0], [1.0], [0.0]])
    once = rome_direction(k, C, p)
    torch.testing.assert_close(rome_direction(k, C, torch.cat([p, p, 1e-3 * p], 1)), once)


def test_kept_keys_that_span_the_subject_key_are_a_clear_error():
    k = torch.tensor([1.0, 2.0, 2.0])
    P = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # k = P (1, 2)
    with pytest.raises(InputError, match="kept keys span the subject's key"):
        rome_direction(k, torch.eye(3), P)


def test_memit_update_with_a_kept_key_matches_the_hand_computed_example():
    # d_in = 2, one key k = (1, 1), C = I, λ = 1: M = I + kkᵀ = [[2, 1], [1, 2]]
    # M⁻¹k = (1/3, 1/3); kept p = (1, 0): M⁻¹p = (2/3, −1/3), pᵀM⁻¹p = 2/3, pᵀM⁻¹k = 1/3
    # A = M⁻¹k − M⁻¹p (1/3)/(2/3) = (0, 1/2); R = 3 → ΔW = [[0, 1.5]]
    R = torch.tensor([[3.0]])
    K = torch.tensor([[1.0], [1.0]])
    left, right = memit_update(R, K, torch.eye(2), 1.0, torch.tensor([[1.0], [0.0]]))
    torch.testing.assert_close(delta_from_factors(left, right), torch.tensor([[0.0, 1.5]]))


def _complement(P: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of {x : Pᵀx = 0}, from a full QR of P."""
    Q, _ = torch.linalg.qr(P, mode="complete")
    return Q[:, P.shape[1] :]


def test_the_kept_updates_solve_the_constrained_problems():
    """ROME: among ΔW with ΔW k̄ = r and ΔW P = 0 the least tr(ΔW C ΔWᵀ) has rows ∝
    Q (QᵀCQ)⁻¹ Qᵀk̄. MEMIT: the least λ tr(ΔW C ΔWᵀ) + ‖ΔW K − R‖² under ΔW P = 0 is
    X Qᵀ with X = R KᵀQ (λ QᵀCQ + QᵀKKᵀQ)⁻¹ (Q: basis of P's orthogonal complement)."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out, m, p = 12, 5, 3, 4
    A = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    C = A @ A.T / d_in + 0.1 * torch.eye(d_in, dtype=torch.float64)
    P = torch.randn(d_in, p, generator=g, dtype=torch.float64)
    Q = _complement(P)
    k = torch.randn(d_in, generator=g, dtype=torch.float64)

    u = rome_direction(k, C, P).double()
    expected = Q @ torch.linalg.solve(Q.T @ C @ Q, Q.T @ k)
    torch.testing.assert_close(u, expected / expected.norm(), atol=1e-6, rtol=1e-5)
    assert float((P.T @ u).abs().max()) < 1e-6

    K = torch.randn(d_in, m, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, m, generator=g, dtype=torch.float64)
    lam = 2.0
    left, right = memit_update(R, K, C, lam, P)
    dW = delta_from_factors(left.double(), right.double())
    QK = Q.T @ K
    X = R @ QK.T @ torch.linalg.inv(lam * Q.T @ C @ Q + QK @ QK.T)
    torch.testing.assert_close(dW, X @ Q.T, atol=1e-5, rtol=1e-4)
    assert float((dW @ P).abs().max()) < 1e-5


# --- on tiny models ----------------------------------------------------------------------

KEEP = ["w1 w2 w3 w7", "w12 w6 w7 w30 w31"]
VALUES = dataclasses.replace(STRONG, clamp_factor=4.0)


def _target(kind: str):
    return tiny_target(kind, output_scale=1.0)


@torch.no_grad()
def _logits(model, tok, prompts: list[str]) -> list[torch.Tensor]:
    return [
        model(torch.tensor([tok(p, add_special_tokens=False).input_ids])).logits[0] for p in prompts
    ]


def _max_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_rome_edit_leaves_the_kept_prompts_unchanged(kind):
    target = _target(kind)
    model, tok = target.model, target.tokenizer
    request = EditRequest(prompt="w5 w6 w7 w8", subject="w8", target_new="w20")
    kept = request.model_copy(update={"keep_prompts": KEEP})
    before = _logits(model, tok, [*KEEP, request.prompt])
    changes = {}
    for name, r in (("plain", request), ("kept", kept)):
        u = rome_edit(target, r, settings(values=VALUES), CONTEXT)
        with target.restored([LAYER]):
            target.apply(LAYER, delta_from_factors(u.left, u.right))
            after = _logits(model, tok, [*KEEP, request.prompt])
        changes[name] = (_max_change(before[:-1], after[:-1]), _max_change(before[-1:], after[-1:]))
    assert changes["plain"][0] > 1e-2, "the test needs an edit that moves the kept prompts"
    assert changes["kept"][0] < 1e-4 * changes["plain"][0] + 1e-5
    assert changes["kept"][1] > 1e-2  # the edited prompt still moves


def test_a_memit_batch_leaves_the_kept_prompts_unchanged():
    target = _target("llama")
    model, tok = target.model, target.tokenizer
    requests = [
        EditRequest(prompt="w5 w6 w7 w8", subject="w8", target_new="w20", keep_prompts=KEEP[:1]),
        EditRequest(prompt="w40 w41 w42", subject="w41", target_new="w21", keep_prompts=KEEP[1:]),
    ]
    before = _logits(model, tok, KEEP)
    weights = {i: target.weight(i) for i in (0, 1)}
    originals = {i: w.detach().clone() for i, w in weights.items()}
    C = {i: torch.eye(128) for i in (0, 1)}
    s = settings(layers=(0, 1), values=VALUES, mom2_update_weight=1.0)
    memit_edit(target, requests, s, EditContext(TEMPLATES, C))
    edited = sum(float((weights[i].detach() - originals[i]).abs().max()) for i in (0, 1))
    assert edited > 1e-3
    assert _max_change(before, _logits(model, tok, KEEP)) < 1e-4


# --- recipe ------------------------------------------------------------------------------

FACT = {"prompt": "The capital of Japan is", "subject": "Japan", "target_new": "Paris"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {
                "edit_method": "rome",
                "requests": [{**FACT, "keep_prompts": ["The capital of Japan is"]}],
            },
            "requests[0]: keep_prompts[0]: 'The capital of Japan is' is the prompt being edited",
        ),
        (
            {"edit_method": "rome", "requests": [{**FACT, "keep_prompts": ["ok", "  "]}]},
            "requests[0]: keep_prompts[1]: must not be empty",
        ),
        (
            {"edit_method": "rome", "requests": [{**FACT, "keep_prompts": ["x"] * 65}]},
            "requests[0].keep_prompts: List should have at most 64 items",
        ),
        (
            {
                "edit_method": "memit",
                "requests": [
                    {**FACT, "keep_prompts": ["The capital of Peru is"]},
                    {"prompt": "The capital of Peru is", "subject": "Peru", "target_new": "Oslo"},
                ],
            },
            "requests[0].keep_prompts[0]: 'The capital of Peru is' is the prompt of requests[1]",
        ),
    ],
)
def test_invalid_keep_prompts_name_the_field(data, message):
    with pytest.raises(RecipeError) as e:
        parse_edit_recipe({"model": "./smollm2", **data})
    assert message in str(e.value)
