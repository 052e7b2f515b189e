"""Builders of tiny real checkpoints for the merge tests.

Every model here is a genuine ``transformers`` model with its random initialisation, saved
with ``save_pretrained(..., safe_serialization=True)`` next to a small real tokenizer, so
the engine reads exactly what it would read from the Hub. A *fine-tune* is its base plus
seeded noise of a realistic scale (a few percent of each tensor's RMS): part of the noise
is shared by all fine-tunes of a family (so task vectors are correlated, as real ones are,
and sign election / Model Stock have something to work with), part is the model's own.
Some tensors of each fine-tune are left exactly equal to the base and some rows of others
are, so task vectors contain exact zeros.

Builders take a target directory and a seed, and are deterministic: the same arguments
give byte-identical weights. They never touch torch's global random state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

VOCAB_SIZE = 256
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0, 1, 2, 3
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
SHARDED_SIZE = "100KB"  # a tiny Llama (~720 KB in float32) then has ~8 shards

# Tensors every fine-tune changes completely (no exact zeros in their task vector), so
# keep-rate statistics can be measured on them.
ALWAYS_CHANGED = ("embed_tokens", "lm_head", "wte")


# ---------------------------------------------------------------------------------------------
# Tokenizers


def build_tokenizer(vocab_size: int = VOCAB_SIZE, variant: int = 0) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocab_size`` tokens: 4 specials then plain words.

    ``variant`` changes the words (and their order), so two variants have the same size but
    different vocabularies — what a fine-tune with its own tokenizer looks like.
    """
    n_words = vocab_size - len(SPECIAL_TOKENS)
    if variant == 0:
        words = [f"w{i}" for i in range(n_words)]
    else:
        words = [f"v{variant}x{i}" for i in reversed(range(n_words))]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def save_tokenizer(target: Path, vocab_size: int = VOCAB_SIZE, variant: int = 0) -> None:
    build_tokenizer(vocab_size, variant).save_pretrained(str(target))


# ---------------------------------------------------------------------------------------------
# Configs and bases


def llama_config(**overrides: object) -> LlamaConfig:
    kw: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def gpt2_config(**overrides: object) -> GPT2Config:
    kw: dict[str, Any] = dict(
        n_embd=64,
        n_layer=3,
        n_head=4,
        vocab_size=VOCAB_SIZE,
        n_positions=128,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return GPT2Config(**kw)


def _save(model: torch.nn.Module, target: Path, max_shard_size: str | None) -> None:
    kwargs: dict[str, object] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(target), **kwargs)  # type: ignore[operator]


def build_llama_base(
    target: Path,
    seed: int,
    *,
    max_shard_size: str | None = None,
    tokenizer_variant: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A randomly initialised tiny Llama (untied lm_head); sharded when max_shard_size is set.

    ``dtype`` is the storage dtype (the weights are initialised in float32, then cast).
    """
    target = Path(target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config())
    _save(model.to(dtype).eval(), target, max_shard_size)  # type: ignore[arg-type]
    save_tokenizer(target, VOCAB_SIZE, tokenizer_variant)
    return target


def build_gpt2_base(target: Path, seed: int, *, tokenizer_variant: int = 0) -> Path:
    """A randomly initialised tiny GPT-2 with tied embeddings (no lm_head.weight on disk).

    Its biases and LayerNorm biases are exactly zero, as GPT-2's initialisation makes them.
    """
    target = Path(target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(gpt2_config())
    _save(model.eval(), target, None)
    save_tokenizer(target, VOCAB_SIZE, tokenizer_variant)
    return target


# ---------------------------------------------------------------------------------------------
# Fine-tunes


def _rms(t: torch.Tensor) -> float:
    return math.sqrt(float(t.double().pow(2).mean())) if t.numel() else 0.0


def build_finetune(
    base: Path,
    target: Path,
    seed: int,
    *,
    shared_seed: int | None = None,
    shared_fraction: float = 0.3,
    rel_noise: float = 0.05,
    frozen_fraction: float = 0.15,
    partial_fraction: float = 0.3,
    max_shard_size: str | None = None,
    tokenizer_variant: int | None = None,
) -> Path:
    """``base`` plus seeded noise, saved like ``base`` (same architecture and config).

    - noise of tensor x: rel_noise·rms(x)·(√f·z_shared + √(1−f)·z_own) with f =
      ``shared_fraction``; z_shared is drawn from ``shared_seed`` (give the same one to all
      fine-tunes of a family to correlate their task vectors), z_own from ``seed``; tensors
      whose RMS is 0 (GPT-2's zero biases) get noise of absolute scale rel_noise·0.02;
    - about ``frozen_fraction`` of the tensors are left exactly equal to the base;
    - in about ``partial_fraction`` of the other 2-D tensors a block of rows is left equal;
    - tensors named like ``ALWAYS_CHANGED`` are always changed completely;
    - ``tokenizer_variant``: None keeps the base's tokenizer vocabulary (variant 0); another
      value saves a different vocabulary of the same size;
    - the noise is added in float32 and the result stored in the base's dtype (for bf16,
      entries whose noise is below half an ulp stay equal to the base, as in real bf16
      fine-tunes, and task vectors are coarse: many equal magnitudes).
    """
    base, target = Path(base), Path(target)
    cfg = json.loads((base / "config.json").read_text())
    store_dtype = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    own = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(shared_seed if shared_seed is not None else seed + 1)
    # named_parameters() lists a tied weight once, so lm_head follows wte in GPT-2.
    params = sorted(model.named_parameters(), key=lambda kv: kv[0])
    n_frozen = max(1, round(frozen_fraction * len(params)))
    candidates = [i for i, (n, _) in enumerate(params) if not any(a in n for a in ALWAYS_CHANGED)]
    order = torch.randperm(len(candidates), generator=own).tolist()
    frozen = {candidates[j] for j in order[:n_frozen]}
    with torch.no_grad():
        for i, (name, p) in enumerate(params):
            # Draw for every tensor (frozen or not) so the shared component of a tensor is
            # the same in all fine-tunes whatever each one froze.
            z_shared = torch.randn(p.shape, generator=shared, dtype=torch.float32)
            z_own = torch.randn(p.shape, generator=own, dtype=torch.float32)
            partial = float(torch.rand((), generator=own))
            cut = float(torch.rand((), generator=own))
            if i in frozen:
                continue
            rms = _rms(p)
            scale = rel_noise * (rms if rms > 0 else 0.02)
            noise = scale * (
                math.sqrt(shared_fraction) * z_shared + math.sqrt(1 - shared_fraction) * z_own
            )
            if (
                p.dim() == 2
                and partial < partial_fraction
                and not any(a in name for a in ALWAYS_CHANGED)
            ):
                rows = max(1, int(cut * p.shape[0] * 0.5))
                noise[:rows] = 0.0
            p.add_(noise.to(p.dtype))
    _save(model.to(store_dtype).eval(), target, max_shard_size)
    variant = 0 if tokenizer_variant is None else tokenizer_variant
    save_tokenizer(target, int(model.config.vocab_size), variant)
    return target


# ---------------------------------------------------------------------------------------------
# Families


def build_family(
    kind: str,
    root: Path,
    seed: int,
    n_finetunes: int,
    *,
    max_shard_size: str | None = None,
    finetune_shard_sizes: list[str | None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Path]:
    """``{"base": path, "ft1": path, ...}`` for ``kind`` "llama" or "gpt2" under ``root``.

    ``finetune_shard_sizes`` gives each fine-tune its own shard size (default:
    ``max_shard_size``), so a family can mix shard layouts. ``dtype`` (Llama only) is the
    storage dtype of the whole family.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if kind == "llama":
        base = build_llama_base(root / "base", seed, max_shard_size=max_shard_size, dtype=dtype)
    elif kind == "gpt2":
        if max_shard_size is not None or dtype != torch.float32:
            raise ValueError("the GPT-2 family is single-file float32")
        base = build_gpt2_base(root / "base", seed)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    out: dict[str, Path] = {"base": base}
    for i in range(1, n_finetunes + 1):
        shard = finetune_shard_sizes[i - 1] if finetune_shard_sizes else max_shard_size
        out[f"ft{i}"] = build_finetune(
            base, root / f"ft{i}", seed * 1000 + i, shared_seed=seed * 1000, max_shard_size=shard
        )
    return out


def weight_map(model_dir: Path) -> dict[str, str]:
    """Tensor name → shard file name, for a sharded or single-file checkpoint."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118


def build_resized_finetune(source: Path, target: Path, rows: int, variant: int) -> Path:
    """A copy of ``source`` whose vocabulary has ``rows`` tokens (embedding and output head
    cut or grown to ``rows``, config vocab_size with them) with tokenizer ``variant`` of that
    size: a fine-tune whose vocabulary differs in size and content."""
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    model.resize_token_embeddings(rows)
    _save(model.eval(), Path(target), None)
    save_tokenizer(Path(target), rows, variant)
    return Path(target)


# ---------------------------------------------------------------------------------------------
# LoRA adapters


def build_lora_adapter(base: Path, target: Path, seed: int, **config: Any) -> Path:
    """A PEFT LoRA adapter of the model in ``base``, saved in ``target`` as users publish them
    (``save_pretrained``); ``init_lora_weights=False`` draws A and B at random (PEFT's default
    makes B zero, so ΔW would prove nothing); ``config`` are
    ``peft.LoraConfig`` fields (r, lora_alpha, target_modules, use_rslora, …)."""
    from peft import LoraConfig, get_peft_model

    config.setdefault("init_lora_weights", False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(base))
        peft_model = get_peft_model(model, LoraConfig(**config))
        # modules_to_save start as copies of the base: change them so replacing shows
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.data += 0.01 * torch.randn_like(p)
    peft_model.save_pretrained(str(target), safe_serialization=True)
    return target


def write_word_corpus(path: Path, paragraphs: int) -> Path:
    """A text corpus in the tiny tokenizer's words (w4 … w249), seeded: ``paragraphs``
    paragraphs of 60 words, for an edit's key covariance."""
    import random

    rng = random.Random(0)
    text = [" ".join(f"w{rng.randrange(4, 250)}" for _ in range(60)) for _ in range(paragraphs)]
    path.write_text("\n\n".join(text) + "\n")
    return path
