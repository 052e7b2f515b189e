"""ROME's edit_margin scaling: the update is scaled down to the least multiple (to 2⁻⁷) under
which the prompt prefers target_new to target_true by edit_margin × the margin m₀ (at least
1 nat) by which the unedited model preferred target_true.

The margin is recomputed here by a plain implementation (the whole text through the model,
log-softmax over the vocabulary at each target position, float64), not by the code under
test."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from schemas.edit_recipe import EditRequest
from tests.support.tiny_edit import CONTEXT, LAYER, STRONG, settings, tiny_target, with_delta
from workers.edit.algebra import delta_from_factors
from workers.edit.rome import rome_edit

PROMPT, SUBJECT, NEW = "w5 w6 w7 w8", "w8", "w20 w21"


@torch.no_grad()
def _mean_log_prob(model, tok, prompt: str, target: str) -> float:
    context = tok(prompt, add_special_tokens=False).input_ids
    ids = tok(target, add_special_tokens=False).input_ids
    logp = torch.log_softmax(model(torch.tensor([context + ids])).logits[0].double(), dim=-1)
    return sum(float(logp[len(context) + j - 1, t]) for j, t in enumerate(ids)) / len(ids)


def _margin(model, tok, true: str) -> float:
    """mean log P(new) − mean log P(true) on the bare prompt."""
    return _mean_log_prob(model, tok, PROMPT, NEW) - _mean_log_prob(model, tok, PROMPT, true)


@torch.no_grad()
def _greedy(model, tok) -> str:
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    return str(tok.decode([int(model(torch.tensor([ids])).logits[0, -1].argmax())]))


def _edited_margin(target, delta: torch.Tensor, true: str) -> float:
    return with_delta(target, delta, lambda: _margin(target.model, target.tokenizer, true))


def _edit(target, request, edit_margin, values=STRONG, target_true=None):
    s = settings(values=values, edit_margin=edit_margin)
    return rome_edit(target, request, s, CONTEXT, target_true=target_true)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_update_is_scaled_to_the_least_multiple_that_reaches_the_margin(kind):
    target = tiny_target(kind)
    model, tok = target.model, target.tokenizer
    true = _greedy(model, tok)
    assert true != "w20"
    request = EditRequest(prompt=PROMPT, subject=SUBJECT, target_new=NEW, target_true=true)
    before = target.weight(LAYER).detach().clone()

    full = _edit(target, request, None)
    full_delta = delta_from_factors(full.left, full.right)
    m0 = -_margin(model, tok, true)
    assert m0 > 0  # the greedy token is preferred
    m_full = _edited_margin(target, full_delta, true)
    assert m_full > 0, "the test needs an edit that turns the preference"
    kappa = m_full / 2 / max(m0, 1.0)  # reachable, with room to scale down

    scaled = _edit(target, request, kappa)
    assert torch.equal(target.weight(LAYER), before)  # restored bit for bit
    assert 0 < scaled.scale < 1 and full.scale == 1.0
    torch.testing.assert_close(scaled.left, scaled.scale * full.left)
    torch.testing.assert_close(scaled.right, full.right)
    needed = kappa * max(m0, 1.0)
    assert _edited_margin(target, scaled.scale * full_delta, true) >= needed - 1e-4
    # least to the bisection's resolution: one step less does not reach the margin
    assert _edited_margin(target, (scaled.scale - 2**-7) * full_delta, true) < needed


def test_without_target_true_the_margin_is_against_the_greedy_next_token():
    target = tiny_target("llama")
    true = _greedy(target.model, target.tokenizer)
    given = EditRequest(prompt=PROMPT, subject=SUBJECT, target_new=NEW, target_true=true)
    bare = EditRequest(prompt=PROMPT, subject=SUBJECT, target_new=NEW)
    assert _edit(target, bare, 3.0).scale == _edit(target, given, 3.0).scale
    # the caller's target_true (the engine passes the probe's) takes precedence
    other = EditRequest(prompt=PROMPT, subject=SUBJECT, target_new=NEW, target_true="w30")
    assert _edit(target, other, 3.0, target_true=true).scale == _edit(target, given, 3.0).scale


def test_a_weakly_held_fact_is_turned_by_at_least_the_minimum_margin():
    """0 < m₀ < 1 nat counts as 1 nat: the edit makes target_new win by edit_margin nats."""
    target = tiny_target("llama")
    model, tok = target.model, target.tokenizer
    margins = {f"w{i}": -_margin(model, tok, f"w{i}") for i in range(30, 250)}
    true = min((t for t, m in margins.items() if 0 < m < 1), key=lambda t: margins[t])
    request = EditRequest(prompt=PROMPT, subject=SUBJECT, target_new=NEW, target_true=true)
    full = _edit(target, request, None)
    scaled = _edit(target, request, 2.0)
    delta = delta_from_factors(full.left, full.right)
    assert 0 < scaled.scale < 1
    assert _edited_margin(target, scaled.scale * delta, true) >= 2.0 - 1e-4
    assert _edited_margin(target, (scaled.scale - 2**-7) * delta, true) < 2.0


def test_a_fact_the_model_does_not_hold_keeps_the_whole_update():
    """m₀ ≤ 0 (target_new already preferred): the margin cannot size the edit."""
    target = tiny_target("llama")
    true = "w30"
    assert _margin(target.model, target.tokenizer, true) >= 0
    request = EditRequest(prompt=PROMPT, subject=SUBJECT, target_new=NEW, target_true=true)
    full = _edit(target, request, None)
    kept = _edit(target, request, 2.0)
    assert kept.scale == 1.0
    torch.testing.assert_close(kept.left, full.left)


def test_an_unreachable_margin_keeps_the_whole_update():
    target = tiny_target("llama")
    true = _greedy(target.model, target.tokenizer)
    request = EditRequest(prompt=PROMPT, subject=SUBJECT, target_new=NEW, target_true=true)
    weak = dataclasses.replace(STRONG, steps=1, lr=0.01)
    full = _edit(target, request, None, weak)
    kept = _edit(target, request, 100.0, weak)
    assert kept.scale == 1.0
    torch.testing.assert_close(kept.left, full.left)
