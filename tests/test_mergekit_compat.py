"""The mergekit compatibility set (testbed/compat.py): every recipe shaped like the ones people
run with mergekit (its examples/, the LazyMergekit templates, frankenmerges, LoRA inputs) is
accepted and merges on the tiny models into the expected tensors, layer count and dtype, and
its values equal the independent dense reference (tests/support/reference_merge.py,
reference_slices.py). The comparison with mergekit 0.1.5 itself is bench/mergekit_compat.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from schemas.recipe import RecipeError, parse_recipe
from testbed.compat import RECIPES, CompatRecipe
from tests.support.lora import peft_merged
from tests.support.merge_cases import ATOL, RTOL, assert_matches_reference, engine
from tests.support.reference_merge import reference_merge
from tests.support.reference_slices import reference_sliced_merge

SEED = 7


@pytest.fixture(scope="module")
def compat_families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    from testbed.compat import build_families

    return build_families(tmp_path_factory.mktemp("compat_models"))


def test_the_set_covers_what_the_issue_lists() -> None:
    names = [r.name for r in RECIPES]
    assert len(names) == len(set(names)) >= 25
    shaped = " ".join(r.shaped_like for r in RECIPES)
    for example in ("linear", "ties", "bio-merge", "gradient-slerp", "orcamini-platy-44layer",
                    "arcee_fusion"):  # fmt: skip
        assert f"examples/{example}.yml" in shaped, example
    for template in ("SLERP", "TIES", "DARE TIES", "passthrough", "Model Stock", "DELLA"):
        assert f"LazyMergekit {template} template" in shaped, template
    assert any("+$lora" in r.text for r in RECIPES)
    assert sum(1 for r in RECIPES if "tokenizer" in r.text) >= 3


def _materialise_loras(recipe: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """The recipe with each BASE+ADAPTER replaced by a folder holding PEFT's own merge of it
    (merge_and_unload), so the reference merge reads plain checkpoints."""
    for i, entry in enumerate(recipe.get("models") or []):
        if "+" not in entry["model"]:
            continue
        base, adapter = (Path(p) for p in entry["model"].split("+"))
        dest = tmp / f"peft{i}"
        dest.mkdir()
        tensors = {k: v.contiguous() for k, v in peft_merged(base, adapter).items()}
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(base / "config.json", dest / "config.json")
        entry["model"] = str(dest)
    return recipe


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.mark.parametrize("case", RECIPES, ids=lambda c: c.name)
def test_compat_recipe_merges_like_the_reference(
    case: CompatRecipe, compat_families: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    recipe = case.render(compat_families[case.family])
    if case.pending:
        try:
            parse_recipe(recipe)
        except RecipeError as e:
            assert "tokenizer" in str(e), str(e)
            pytest.skip(f"pending: {case.pending}")
    _, out = engine(recipe, tmp_path / "out", seed=SEED)

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("num_hidden_layers", config.get("n_layer")) == case.layers

    reference_recipe = _materialise_loras(case.render(compat_families[case.family]), tmp_path)
    if "slices" in recipe:
        ref = reference_sliced_merge(reference_recipe, seed=SEED)
    else:
        ref = reference_merge(reference_recipe, seed=SEED)
    want_dtype = getattr(torch, recipe.get("dtype") or "float32")
    assert {t.dtype for t in ref.values() if t.is_floating_point()} == {want_dtype}
    # the reference rounds its float64 result once; the engine its float32 result: in a
    # half-precision output the two may sit one ulp apart
    rtol = max(RTOL, torch.finfo(want_dtype).eps)
    if "tokenizer" in recipe or "tokenizer_source" in recipe:
        # rows realigned to the output vocabulary (tests/test_merge_tokenizers.py checks them
        # against tests/support/reference_vocab.py); every other tensor is merged as usual
        rows = config["vocab_size"]
        for name in VOCAB_TENSORS:
            assert out.pop(name).shape[0] == rows, name
            ref.pop(name)
    assert_matches_reference(out, ref, out_dir=tmp_path / "out", rtol=rtol, atol=ATOL)


def test_linear_with_an_unlisted_base_averages_it_in(
    compat_families: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    """mergekit's planner adds base_model to the inputs when models does not list it: the
    linear merge is then (θ1 + θ2 + θ0)/3, checked on one tensor by hand."""
    from testbed.compat import by_name
    from tests.support.reference_merge import load_checkpoint

    fam = compat_families["llama"]
    _, out = engine(by_name()["linear_with_base"].render(fam), tmp_path / "out", seed=SEED)
    name = "model.layers.1.mlp.up_proj.weight"
    thetas = [load_checkpoint(fam[k])[name].double() for k in ("ft1", "ft2", "base")]
    torch.testing.assert_close(out[name].double(), sum(thetas) / 3, rtol=1e-6, atol=1e-7)


def test_linear_with_an_unlisted_base_and_own_weights_is_refused(
    compat_families: dict[str, dict[str, Path]],
) -> None:
    fam = compat_families["llama"]
    recipe = {
        "merge_method": "linear",
        "base_model": str(fam["base"]),
        "models": [{"model": str(fam["ft1"]), "parameters": {"weight": 0.7}},
                   {"model": str(fam["ft2"]), "parameters": {"weight": 0.3}}],
    }  # fmt: skip
    with pytest.raises(RecipeError, match=r"base_model: 'linear' merges base_model .* weight"):
        parse_recipe(recipe)
    # listing the base with its weight, or a top-level weight, is accepted
    parse_recipe({**recipe, "parameters": {"weight": 0.5}})
    listed = [*recipe["models"], {"model": str(fam["base"]), "parameters": {"weight": 0.1}}]
    parse_recipe({**recipe, "models": listed})


def test_passthrough_with_an_unlisted_base_counts_it_as_a_second_model(
    compat_families: dict[str, dict[str, Path]],
) -> None:
    fam = compat_families["llama"]
    recipe = {"merge_method": "passthrough", "base_model": str(fam["base"]),
              "models": [{"model": str(fam["ft1"])}]}  # fmt: skip
    with pytest.raises(RecipeError, match=r"needs exactly 1 model\(s\), got 2 \(base_model"):
        parse_recipe(recipe)
