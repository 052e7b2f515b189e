"""A tiny random model to scale ROME updates on (tests of ``sufficient_loss`` and
``edit_margin``): its output layer is scaled up so that it has preferences and an edit can
overshoot, and the value optimisation has no early stop."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from testbed.tiny_models import build_tokenizer, gpt2_config, llama_config
from workers.edit.architectures import EditModel, architecture_for
from workers.edit.settings import EditSettings
from workers.edit.update import EditContext
from workers.edit.values import ValueSettings

LAYER = 1
OUTPUT_SCALE = 50.0
TEMPLATES = ["{}", "w9 w10 . {}", "w11 . {}"]
CONTEXT = EditContext(TEMPLATES)  # no covariances: the tests edit with u = k̄ (C = I)
# a strong edit: no early stop, so v* overshoots what the target needs
STRONG = ValueSettings(
    steps=10,
    lr=0.5,
    weight_decay=0.0,
    kl_factor=0.0,
    clamp_factor=1e4,
    early_stop_loss=0.0,
    loss_layer=None,
)


def tiny_model(kind: str, output_scale: float = OUTPUT_SCALE):
    """A seeded 3-layer Llama or GPT-2 with its output embeddings × ``output_scale``."""
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(llama_config(num_hidden_layers=3))
    else:
        model = GPT2LMHeadModel(gpt2_config())
    if output_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(output_scale)
    return model.eval()


def tiny_target(kind: str, output_scale: float = OUTPUT_SCALE) -> EditModel:
    """:func:`tiny_model` with the tests' word-level tokenizer, as the model under edit."""
    model = tiny_model(kind, output_scale)
    return EditModel(model, build_tokenizer(), architecture_for(model.config))


def settings(**changes: Any) -> EditSettings:
    """ROME at LAYER with STRONG values, consistent keys, u = k̄ and no scaling, with
    ``changes``."""
    base = EditSettings(
        layers=(LAYER,), values=STRONG, key_mode="consistent", mom2_adjustment=False
    )
    return dataclasses.replace(base, **changes)


def with_delta(target: EditModel, delta: torch.Tensor, measure):
    """``measure()`` on the model with ``delta`` added to LAYER's weight, then restored."""
    with target.restored([LAYER]):
        target.apply(LAYER, delta)
        return measure()
