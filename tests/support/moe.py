"""MoE assembly fixtures and independent expectations (workers/moe).

- Experts are seeded fine-tunes of one tiny Llama base (testbed.tiny_models.build_finetune).
- Each expert's domain is a handful of words of the tiny tokenizer that no other domain uses,
  so a router row made from its prompts is close to those words' representations and far
  from the other domains' (meaningful routing on an untrained model).
- ``reference_hidden_gates`` / ``reference_cheap_embed_gates`` recompute the routers with a
  plain float64 loop over the prompts (transformers' ``output_hidden_states`` of the base, or
  its embedding rows), written from mergekit's definition, not from workers/moe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from testbed.tiny_models import build_finetune, llama_config, save_tokenizer

WEIGHTS = "model.safetensors"
# three words per domain: w10… for expert 0, w100… for expert 1, w200… for expert 2
DOMAINS = [[f"w{10 + k}" for k in range(3)], [f"w{100 + k}" for k in range(3)]]
DOMAINS.append([f"w{200 + k}" for k in range(3)])


def domain_prompts(domain: int, n: int = 4) -> list[str]:
    """``n`` prompts of the domain's words in rotating orders."""
    words = DOMAINS[domain]
    return [" ".join(words[(i + j) % len(words)] for j in range(6)) for i in range(n)]


def build_experts(base: Path, folder: Path, count: int) -> list[Path]:
    return [
        build_finetune(base, folder / f"expert{i}", seed=100 + i, rel_noise=0.2)
        for i in range(count)
    ]


def build_llama_variant(target: Path, seed: int, **config: Any) -> Path:
    """A tiny Llama with ``config`` overrides (e.g. another intermediate_size)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(**config))
    model.save_pretrained(str(target), safe_serialization=True)
    save_tokenizer(target)
    return target


def qwen2_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer: the 256 byte symbols, no merges, <|endoftext|> (id 256)
    and no BOS — transformers loads a qwen2 model's tokenizer as Qwen2Tokenizer whatever
    tokenizer_config.json says, so the tiny word-level tokenizer cannot be used."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    end = "<|endoftext|>"
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token=end, pad_token=end)


def build_qwen2_base(target: Path, seed: int) -> Path:
    """A tiny Qwen2 (q/k/v biases, untied lm_head) with a byte-level Qwen2 tokenizer."""
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=257,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=256,
        pad_token_id=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        for layer in model.model.layers:  # nonzero biases, so copying them is visible
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.02)
    model.save_pretrained(str(target), safe_serialization=True)
    qwen2_tokenizer().save_pretrained(str(target))
    return target


def moe_recipe(base: Path, experts: list[Path], **extra: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "base_model": str(base),
        "experts": [
            {"source_model": str(e), "positive_prompts": domain_prompts(i)}
            for i, e in enumerate(experts)
        ],
    }
    recipe.update(extra)
    return recipe


def write_recipe(folder: Path, recipe: dict[str, Any], name: str = "moe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _ids(tokenizer: Any, prompt: str) -> list[int]:
    """BOS, when the tokenizer has one, then the prompt's tokens (mergekit's tokenization)."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [*bos, *tokenizer.encode(prompt, add_special_tokens=False)]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / max(float(v.norm()), 1e-8)


def reference_hidden_gates(
    base: Path, experts: list[dict[str, Any]], *, average: bool = False
) -> torch.Tensor:
    """(layers, experts, hidden) float64: per layer, the unit vector of (mean over positive
    prompts of the input of that layer at the prompt's last token — or, with ``average``, its
    mean over the prompt's tokens) minus the same over the negative prompts."""
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64).eval()
    layers = model.config.num_hidden_layers

    def layer_means(prompts: list[str]) -> list[torch.Tensor]:
        sums = [torch.zeros(model.config.hidden_size, dtype=torch.float64)] * layers
        for p in prompts:
            with torch.no_grad():
                hs = model(torch.tensor([_ids(tokenizer, p)]), output_hidden_states=True)
            for layer in range(layers):
                # hidden_states[layer] is what enters decoder layer `layer`
                h = hs.hidden_states[layer][0]
                sums[layer] = sums[layer] + (h.mean(dim=0) if average else h[-1])
        return [s / len(prompts) for s in sums]

    rows = []
    for e in experts:
        pos = layer_means(e["positive_prompts"])
        neg = layer_means(e["negative_prompts"]) if e.get("negative_prompts") else None
        rows.append(
            [_unit(pos[i] - (neg[i] if neg else 0)) for i in range(layers)]  # type: ignore[operator]
        )
    return torch.stack([torch.stack([rows[e][i] for e in range(len(rows))]) for i in range(layers)])


def reference_cheap_embed_gates(base: Path, experts: list[dict[str, Any]]) -> torch.Tensor:
    """(experts, hidden) float64: unit(unit(Σ embeddings of the positive prompts' tokens) −
    unit(Σ of the negative ones'))."""
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    embed = load_file(str(base / WEIGHTS))["model.embed_tokens.weight"].double()

    def summed(prompts: list[str]) -> torch.Tensor:
        total = torch.zeros(embed.shape[1], dtype=torch.float64)
        for p in prompts:
            for t in _ids(tokenizer, p):
                total += embed[t]
        return _unit(total)

    rows = []
    for e in experts:
        v = summed(e["positive_prompts"])
        if e.get("negative_prompts"):
            v = v - summed(e["negative_prompts"])
        rows.append(_unit(v))
    return torch.stack(rows)
