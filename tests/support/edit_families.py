"""Tiny random checkpoints of every decoder family the edit engine supports, built with
transformers' own classes (2–3 layers, 64 wide) and saved next to the tests' word-level
tokenizer.

Like ``tiny_edit.tiny_model``, the output embeddings are scaled up so that a random model
has preferences an edit must overturn. The Gemma families are built untied: with tied
embeddings the scale (times Gemma's √d input scale) makes a random model repeat its input
token with certainty. GPT-2 stays tied, as in ``tiny_edit``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from testbed.tiny_models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, save_tokenizer

OUTPUT_SCALE = 50.0
# Gemma-2 caps its logits at ±30 (tanh): × 50 would saturate the cap, and its gradient
SCALE = {"gemma2": 5.0}
DEPTH = 3

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=DEPTH,
    num_attention_heads=4,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=128,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)
_GQA = {"num_key_value_heads": 2}
_GEMMA = {**_GQA, "head_dim": 16, "tie_word_embeddings": False}

# family → (config class, model class, config changes); the family is the name the tests
# use, the model_type is what transformers writes to config.json.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GQA),
    # Llama 3.x: llama3 RoPE scaling with a short original context, so it scales here
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            **_GQA,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            "rope_theta": 500000.0,
        },
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_GQA, "sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_GQA, "head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _GEMMA),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", _GEMMA),  # logit soft-capping at 30
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_GEMMA, "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _GQA),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _GQA),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 64, "n_layer": DEPTH, "n_head": 4, "n_positions": 128},
    ),
}


def family_config(family: str) -> Any:
    config_class, _, changes = FAMILIES[family]
    kw = dict(_COMMON)
    if family == "gpt2":  # GPT-2 names its sizes differently
        kw = {k: v for k, v in kw.items() if k.endswith("_token_id") or k == "vocab_size"}
    kw.update(changes)
    return getattr(transformers, config_class)(**kw)


def family_model(family: str, seed: int = 0) -> Any:
    """A seeded random model of ``family`` (eval mode, float32), output embeddings × 50
    (× ``SCALE[family]`` where set)."""
    _, model_class, _ = FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_class)(family_config(family))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(SCALE.get(family, OUTPUT_SCALE))
    return model.eval()


def build_family_checkpoint(target: Path, family: str, seed: int = 0) -> Path:
    """:func:`family_model` saved as safetensors with the word-level tokenizer."""
    family_model(family, seed).save_pretrained(str(target))
    save_tokenizer(target)
    return target
