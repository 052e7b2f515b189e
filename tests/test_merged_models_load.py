"""Merged outputs are real models: transformers loads them and they generate.

For each family a merge is loaded with ``AutoModelForCausalLM.from_pretrained`` (no missing,
unexpected or mismatched weights), its weights are the ones on disk, and it generates a few
tokens from fixed input ids. For GPT-2's tied embeddings, config.json's
``tie_word_embeddings`` must agree with whether ``lm_head.weight`` was written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from schemas.recipe import parse_recipe
from testbed.tiny_models import VOCAB_SIZE
from tests.support.reference_merge import load_checkpoint
from workers.merge.engine import run_merge

INPUT_IDS = torch.tensor([[1, 17, 42, 99, 5, 230]])


def _merge(method: str, family: dict[str, Path], out_dir: Path, **parameters) -> Path:
    recipe = {
        "merge_method": method,
        "models": [{"model": str(family[k])} for k in family if k != "base"],
    }
    if method != "linear":
        recipe["base_model"] = str(family["base"])
    if parameters:
        recipe["parameters"] = parameters
    run_merge(parse_recipe(recipe), out_dir, seed=7)
    return out_dir


def _load_and_generate(out_dir: Path) -> AutoModelForCausalLM:
    model, info = AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    model.eval()
    # the loaded weights are the ones written (nothing re-initialised)
    on_disk = load_checkpoint(out_dir)
    state = model.state_dict()
    for name, tensor in on_disk.items():
        torch.testing.assert_close(state[name], tensor.float(), rtol=0, atol=0, msg=name)
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
        assert logits.shape == (1, INPUT_IDS.shape[1], VOCAB_SIZE)
        assert torch.isfinite(logits).all()
        gen = model.generate(
            INPUT_IDS,
            attention_mask=torch.ones_like(INPUT_IDS),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            pad_token_id=3,
        )
    assert gen.shape == (1, INPUT_IDS.shape[1] + 4)
    assert torch.equal(gen[:, : INPUT_IDS.shape[1]], INPUT_IDS)
    assert int(gen.max()) < VOCAB_SIZE
    return model


def _tie_consistent(out_dir: Path) -> bool:
    cfg = json.loads((out_dir / "config.json").read_text())
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    has_head = "lm_head.weight" in index["weight_map"]
    tied = cfg.get("tie_word_embeddings", True)  # transformers' default is True
    return tied == (not has_head)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "slerp"])
def test_llama_merge_loads_and_generates(method, llama_family, tmp_path):
    family = llama_family if method != "slerp" else {k: llama_family[k] for k in ("base", "ft1")}
    params = {"t": 0.4} if method == "slerp" else {"density": 0.5} if method != "linear" else {}
    out = _merge(method, family, tmp_path / "out", **params)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg.get("tie_word_embeddings") is False
    assert _tie_consistent(out)
    _load_and_generate(out)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "slerp"])
def test_gpt2_tied_merge_loads_and_generates(method, gpt2_family, tmp_path):
    family = gpt2_family if method != "slerp" else {k: gpt2_family[k] for k in ("base", "ft1")}
    params = {"t": 0.5} if method == "slerp" else {"density": 0.5} if method == "ties" else {}
    out = _merge(method, family, tmp_path / "out", **params)
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert _tie_consistent(out)
    model = _load_and_generate(out)
    if json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True):
        # tied: the head is the merged embedding itself
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    else:
        written = load_checkpoint(out)
        torch.testing.assert_close(written["lm_head.weight"], written["transformer.wte.weight"])


def test_sharded_merge_loads_and_generates(sharded_llama_family, tmp_path):
    out = tmp_path / "out"
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(sharded_llama_family["base"]),
        "models": [{"model": str(sharded_llama_family[k])} for k in ("ft1", "ft2")],
        "parameters": {"weight": 0.5},
        "output": {"shard_size": "100KB"},
    }
    run_merge(parse_recipe(recipe), out)
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())
                   ["weight_map"].values())) > 1  # fmt: skip
    _load_and_generate(out)
