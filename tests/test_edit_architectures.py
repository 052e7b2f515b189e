"""Edits of every supported decoder family, on tiny random models built with transformers'
own classes (tests/support/edit_families.py): a ROME edit through run_edit writes the
family's MLP output projection and nothing else, and the written model, loaded afresh and
run by transformers, prefers the new target; MEMIT where the family allows it, refused with
the reason where it does not; an unsupported model type refused with the supported list.

The expected tensor names are transformers' own, written out here, not read from the
architecture table under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

from schemas.edit_recipe import EditRecipe, parse_edit_recipe
from testbed.tiny_models import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    build_tokenizer,
    save_tokenizer,
    write_word_corpus,
)
from tests.support.edit_families import FAMILIES, build_family_checkpoint
from workers.edit import LocalCovarianceCache, run_edit
from workers.edit.architectures import EditModel, architecture_for
from workers.edit.checkpoint import EDIT_DIR, FACTORS
from workers.errors import InputError
from workers.sources import SourceSettings, resolve_reference
from workers.tensors import CheckpointReader

LAYER = 1
FACT = {"prompt": "w5 w6 w7 w8", "subject": "w8", "target_new": "w20 w21"}
SECOND_FACT = {"prompt": "w50 w51 w52", "subject": "w52", "target_new": "w60"}
STRONG = {  # no early stop, no KL, a loose clamp: an update that takes on a random model
    "v_num_grad_steps": 10,
    "v_lr": 0.5,
    "v_weight_decay": 0.0,
    "kl_factor": 0.0,
    "clamp_norm_factor": 1e4,
    "v_early_stop_loss": 0.0,
    "context_template_counts": [[2, 3]],
}

# the weight an edit of layer L writes, as transformers names it in the checkpoint
DOWN_PROJ = "model.layers.{}.mlp.down_proj.weight"
EDITED = {
    "llama": DOWN_PROJ,
    "llama3": DOWN_PROJ,
    "mistral": DOWN_PROJ,
    "qwen2": DOWN_PROJ,
    "qwen3": DOWN_PROJ,
    "gemma": DOWN_PROJ,
    "gemma2": DOWN_PROJ,
    "gemma3_text": DOWN_PROJ,
    "phi3": DOWN_PROJ,  # gate_up_proj is fused; down_proj is not
    "olmo2": DOWN_PROJ,
    "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight",
    "gpt2": "transformer.h.{}.mlp.c_proj.weight",  # Conv1D: stored [d_in, d_out]
}
POST_NORM = {"gemma2": "post_feedforward_layernorm", "gemma3_text": "post_feedforward_layernorm"}
POST_NORM["olmo2"] = "post_feedforward_layernorm"
MODEL_TYPES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "gpt2",
    "gpt_neox",
]


def test_every_family_has_a_builder_and_an_expected_tensor():
    assert set(FAMILIES) == set(EDITED)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: build_family_checkpoint(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_corpus(tmp_path_factory.mktemp("families_corpus") / "corpus.txt", 20)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> LocalCovarianceCache:
    return LocalCovarianceCache(tmp_path_factory.mktemp("families_covariance"))


def _recipe(model: Path, corpus: Path, method: str = "rome", **hyper: Any) -> EditRecipe:
    return parse_edit_recipe(
        {
            "edit_method": method,
            "model": str(model),
            "requests": [FACT] if method == "rome" else [FACT, SECOND_FACT],
            "hyperparameters": {
                **STRONG,
                "layers": [LAYER] if method == "rome" else [0, 1],
                **hyper,
            },
            "covariance": {
                "source": "text",
                "paths": [str(corpus)],
                "tokens": 512,
                "max_length": 32,
            },
            "on_gate_failure": "publish_flagged",
        }
    )


def _run(family: str, recipe: EditRecipe, out: Path | None, **kwargs: Any) -> Any:
    """run_edit of ``recipe``. transformers 5 loads any qwen2 checkpoint's tokenizer as a
    byte-level BPE Qwen2Tokenizer, which cannot hold the tests' word-level vocabulary, so
    the qwen2 model comes with the word-level tokenizer built directly (everything else,
    the model's loading included, as for any family)."""
    if family == "qwen2":
        resolved = resolve_reference(recipe.model, SourceSettings())
        model = _load(resolved.path)
        kwargs["loaded"] = EditModel(model, build_tokenizer(), architecture_for(model.config))
        kwargs["resolved"] = resolved
    return run_edit(recipe, out, **kwargs)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(folder) as reader:
        return {name: reader.read(name) for name in reader.names}


@torch.no_grad()
def _mean_log_prob(model: Any, tokenizer: Any, prompt: str, target: str) -> float:
    """Mean per-token log P(target | prompt) by the model's own forward pass."""
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    t = tokenizer(target, add_special_tokens=False).input_ids
    logits = model(torch.tensor([p + t])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(p) + j - 1, tok]) for j, tok in enumerate(t)) / len(t)


def _load(folder: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_rome_edit_writes_only_the_mlp_output_projection_and_the_prompt_then_prefers_the_new_target(  # noqa: E501
    checkpoints, corpus, cache, tmp_path, family
):
    parent = checkpoints[family]
    result = _run(family, _recipe(parent, corpus), tmp_path / "edited", cache=cache)

    edited = EDITED[family].format(LAYER)
    before, after = _tensors(parent), _tensors(tmp_path / "edited")
    assert before.keys() == after.keys()
    assert [n for n in before if not torch.equal(before[n], after[n])] == [edited]
    with safe_open(str(tmp_path / "edited" / EDIT_DIR / FACTORS), "pt") as f:
        delta = torch.outer(
            f.get_tensor(f"request0.layer{LAYER}.left"),
            f.get_tensor(f"request0.layer{LAYER}.right"),
        )
    stored = delta.T if family == "gpt2" else delta
    torch.testing.assert_close(after[edited], before[edited] + stored)

    tok = build_tokenizer()
    (true,) = result.metrics["targets_true"]
    old, new = _load(parent), _load(tmp_path / "edited")
    prompt, target_new = FACT["prompt"], FACT["target_new"]
    assert _mean_log_prob(old, tok, prompt, true) > _mean_log_prob(old, tok, prompt, target_new)
    assert _mean_log_prob(new, tok, prompt, target_new) > _mean_log_prob(new, tok, prompt, true)


# the ROME edit above covers every family in make test-fast; the MEMIT batch runs in make test
@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in POST_NORM])
def test_memit_edits_both_requests_of_a_batch(checkpoints, corpus, cache, family):
    parent = checkpoints[family]
    result = _run(family, _recipe(parent, corpus, "memit"), None, cache=cache)

    # the factors applied to a fresh copy by hand, then transformers' forward pass
    model = _load(parent)
    tok = build_tokenizer()
    state = model.state_dict()
    for layer in (0, 1):
        name = EDITED[family].format(layer)
        delta = sum(torch.outer(u.left, u.right) for u in result.updates if u.layer == layer)
        assert isinstance(delta, torch.Tensor)
        with torch.no_grad():
            state[name].add_(delta.T if family == "gpt2" else delta)
    for fact, true in zip((FACT, SECOND_FACT), result.metrics["targets_true"], strict=True):
        new = fact["target_new"]
        assert _mean_log_prob(model, tok, fact["prompt"], new) > _mean_log_prob(
            model, tok, fact["prompt"], true
        ), fact


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
@pytest.mark.parametrize("family", list(POST_NORM))
def test_memit_on_a_post_norm_family_is_refused_naming_the_norm_before_any_work(
    checkpoints, corpus, cache, family, method
):
    # AlphaEdit spreads MEMIT's residual over the same layers: refused for the same reason
    seen: list[str] = []
    with pytest.raises(InputError) as e:
        _run(
            family,
            _recipe(checkpoints[family], corpus, method),
            None,
            cache=cache,
            progress=seen.append,
        )

    assert e.value.field == "edit_method"
    assert f"{method} cannot edit {family!r}" in str(e.value)
    assert POST_NORM[family] in str(e.value) and "use edit_method 'rome'" in str(e.value)
    assert seen == ["load"]


def _module_output(model: Any, tokenizer: Any, module: str, prompt: str) -> torch.Tensor:
    """``module``'s output at the prompt's last token, by a forward hook."""
    got = {}

    def read(_m: Any, _args: Any, out: torch.Tensor) -> None:
        got["out"] = out[0, -1].double()

    handle = model.get_submodule(module).register_forward_hook(read)
    try:
        with torch.no_grad():
            model(torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids]))
    finally:
        handle.remove()
    return got["out"]


@pytest.mark.parametrize("family", list(POST_NORM))
def test_on_a_post_norm_family_rome_moves_the_projection_output_before_the_norm_by_its_delta(
    checkpoints, corpus, cache, family
):
    # key_mode original: ΔW k₀ = scale·(v* − W k₀) = scale·δ at the bare prompt's subject key,
    # what the v* optimisation saw through the post-MLP norm
    parent = checkpoints[family]
    prompt = FACT["prompt"]  # the subject is its last token
    recipe = _recipe(parent, corpus, key_mode="original")
    result = _run(family, recipe, None, cache=cache)
    (update,) = result.updates
    assert update.value is not None

    model = _load(parent)
    tok = build_tokenizer()
    module = f"model.layers.{LAYER}.mlp.down_proj"
    clean = _module_output(model, tok, module, prompt)
    norm_clean = _module_output(model, tok, f"model.layers.{LAYER}.{POST_NORM[family]}", prompt)
    with torch.no_grad():
        model.get_submodule(module).weight.add_(torch.outer(update.left, update.right))
    edited = _module_output(model, tok, module, prompt)
    norm_edited = _module_output(model, tok, f"model.layers.{LAYER}.{POST_NORM[family]}", prompt)

    expected = update.scale * update.value.delta.double()
    torch.testing.assert_close(edited - clean, expected, rtol=1e-4, atol=1e-4 * float(clean.norm()))
    # the residual stream gets the normalised output: not moved by the same vector
    assert not torch.allclose(norm_edited - norm_clean, expected, rtol=0.1, atol=0.0)


def test_an_unsupported_model_type_is_refused_listing_the_supported_ones(corpus, cache, tmp_path):
    config = OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=64,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    OPTForCausalLM(config).save_pretrained(str(tmp_path / "opt"))
    save_tokenizer(tmp_path / "opt")
    seen: list[str] = []

    with pytest.raises(InputError) as e:
        run_edit(_recipe(tmp_path / "opt", corpus), None, cache=cache, progress=seen.append)

    message = str(e.value)
    assert "cannot edit architecture 'opt'" in message
    listed = message.split("supported model types are ", 1)[1]
    assert sorted(t.strip() for t in listed.split(",")) == sorted(MODEL_TYPES)
    assert e.value.model == str(tmp_path / "opt")
    assert seen == ["load"]
