"""ROME's sufficient-edit scaling: the update is scaled down to the least multiple (to 2⁻⁷)
under which every rewrite prompt's target NLL is at most ``sufficient_loss``.

The NLL is recomputed here by a plain implementation (the whole text through the model,
log-softmax over the vocabulary at each target position), not by the code under test."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from schemas.edit_recipe import EditRequest
from tests.support.tiny_edit import (
    CONTEXT,
    LAYER,
    STRONG,
    TEMPLATES,
    settings,
    tiny_target,
    with_delta,
)
from workers.edit.algebra import delta_from_factors
from workers.edit.rome import rome_edit

REQUEST = EditRequest(prompt="w5 w6 w7 w8", subject="w8", target_new="w20")


@torch.no_grad()
def _nll(model, tok, request: EditRequest) -> float:
    """The worst, over the templates, of the mean NLL of target_new's tokens."""
    target = tok(request.target_new, add_special_tokens=False).input_ids
    worst = 0.0
    for t in TEMPLATES:
        context = tok(t.format(request.prompt), add_special_tokens=False).input_ids
        ids = torch.tensor([context + target])
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        nll = [-float(logp[len(context) + j - 1, label]) for j, label in enumerate(target)]
        worst = max(worst, sum(nll) / len(nll))
    return worst


def _edited_nll(target, delta: torch.Tensor) -> float:
    return with_delta(target, delta, lambda: _nll(target.model, target.tokenizer, REQUEST))


def _edit(target, sufficient_loss, values=STRONG):
    return rome_edit(
        target, REQUEST, settings(values=values, sufficient_loss=sufficient_loss), CONTEXT
    )


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_update_is_scaled_to_the_least_multiple_that_reaches_the_loss(kind):
    target = tiny_target(kind)
    before = target.weight(LAYER).detach().clone()

    full = _edit(target, None)
    full_delta = delta_from_factors(full.left, full.right)
    loss_before = _nll(target.model, target.tokenizer, REQUEST)
    loss_full = _edited_nll(target, full_delta)
    assert loss_full < loss_before / 4, "the test needs an edit that overshoots"
    sufficient = (loss_full + loss_before) / 4  # reachable, with room to scale down

    scaled = _edit(target, sufficient)
    assert torch.equal(target.weight(LAYER), before)  # restored bit for bit
    assert 0 < scaled.scale < 1 and full.scale == 1.0
    torch.testing.assert_close(scaled.left, scaled.scale * full.left)
    torch.testing.assert_close(scaled.right, full.right)
    assert _edited_nll(target, scaled.scale * full_delta) <= sufficient
    # least to the bisection's resolution: one step less does not reach the loss
    assert _edited_nll(target, (scaled.scale - 2**-7) * full_delta) > sufficient


def test_an_unreachable_loss_keeps_the_whole_update():
    target = tiny_target("llama")
    weak = dataclasses.replace(STRONG, steps=1, lr=0.01)
    full = _edit(target, None, weak)
    loss_full = _edited_nll(target, delta_from_factors(full.left, full.right))
    kept = _edit(target, loss_full / 2, weak)
    assert kept.scale == 1.0
    torch.testing.assert_close(kept.left, full.left)
