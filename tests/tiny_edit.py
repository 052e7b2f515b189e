"""A tiny random model to scale ROME updates on (tests of ``sufficient_loss`` and
``edit_margin``): its output layer is scaled up so that it has preferences and an edit can
overshoot, and the value optimisation has no early stop."""

from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from tests.models import gpt2_config, llama_config
from workers.edit.architectures import apply_delta, edited_weight
from workers.edit.values import ValueSettings

LAYER = 1
OUTPUT_SCALE = 50.0
TEMPLATES = ["{}", "w9 w10 . {}", "w11 . {}"]
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


def with_delta(model, arch, delta: torch.Tensor, measure):
    """``measure()`` on the model with ``delta`` added to LAYER's weight, then restored."""
    w = edited_weight(model, arch, LAYER)
    original = w.detach().clone()
    apply_delta(model, arch, LAYER, delta)
    try:
        return measure()
    finally:
        with torch.no_grad():
            w.copy_(original)
