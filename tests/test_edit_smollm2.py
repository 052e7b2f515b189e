"""ROME and MEMIT on a real model (SmolLM2-135M-Instruct, testbed/smollm2.py).

The model knows "The capital of Japan is" → " Tokyo". Settings are the recipe defaults
except where CI time on 2 CPU cores demands less: 5 sampled context templates instead of
20, and the keys' covariance from a small plain-text corpus (no sampling from the model).
The model is loaded once for the module (``smol``): every edit runs on it and run_edit
restores its weights bit for bit.

Slow (minutes on 2 CPU cores): ``pytest -m "not slow"`` leaves these out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from schemas.edit_recipe import parse_edit_recipe
from schemas.references import parse_reference
from testbed.smollm2 import write_text_corpus
from weightsmith.cli import main as cli_main
from workers.edit import EditGateError, LocalCovarianceCache, run_edit
from workers.edit.algebra import rome_direction
from workers.edit.architectures import EditModel
from workers.edit.checkpoint import EDIT_DIR, FACTORS
from workers.edit.covariance import CovarianceKey
from workers.edit.engine import load_model, model_revision
from workers.edit.rome import subject_keys
from workers.edit.templates import context_templates
from workers.sources import SourceSettings, resolve_reference
from workers.tensors import CheckpointReader

pytestmark = pytest.mark.slow

LAYER = 5
NEIGHBORHOOD = [
    "The capital of Germany is",
    "The capital of Italy is",
    "The capital of Spain is",
    "The capital of Russia is",
    "The capital of Egypt is",
    "The capital of Canada is",
    "The Eiffel Tower is located in the city of",
    "Mount Fuji is a mountain in",
    "The currency of the United Kingdom is the",
    "The largest ocean on Earth is the",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("edit_corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def cov_cache(tmp_path_factory):
    return LocalCovarianceCache(tmp_path_factory.mktemp("covariance"))


@pytest.fixture(scope="module")
def smol(smollm2) -> EditModel:
    """SmolLM2, loaded once for the module's edits."""
    return load_model(resolve_reference(parse_reference(str(smollm2)), SourceSettings()), "smollm2")


def _recipe(smollm2: Path, corpus: Path, **overrides):
    data = {
        "edit_method": "rome",
        "model": str(smollm2),
        "requests": [
            {
                "prompt": "The capital of Japan is",
                "subject": "Japan",
                "target_new": "Paris",
                "target_true": "Tokyo",
                "paraphrase_prompts": [
                    # subject-initial paraphrases ("Japan's capital is") do not generalise
                    # on this 135M model: the first token's key is an outlier
                    "The capital city of Japan is",
                    "The capital of Japan is the city of",
                    "In Japan, the capital is",
                ],
                "neighborhood_prompts": NEIGHBORHOOD,
            }
        ],
        "hyperparameters": {"layers": [LAYER], "context_template_counts": [[5, 5]]},
        "covariance": {"source": "text", "paths": [str(corpus)], "tokens": 2048},
    }
    for k, v in overrides.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and k in data else v
    return parse_edit_recipe(data)


@pytest.fixture(scope="module")
def rome_edit(smollm2, smol, corpus, cov_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("rome") / "edited"
    return run_edit(_recipe(smollm2, corpus), out, cache=cov_cache, loaded=smol)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rome_makes_the_new_target_preferred_without_collateral_damage(rome_edit):
    m = rome_edit.metrics
    assert m["efficacy"] == 1.0
    assert m["paraphrase"] == 1.0
    assert m["neighborhood"] >= 0.9
    assert m["perplexity_ratio"] <= 1.10
    assert rome_edit.gate_passed
    assert 0 < m["relative_update_norm"][str(LAYER)] < 0.5


def test_a_sufficient_loss_scales_the_same_update_down(rome_edit, smollm2, smol, corpus, cov_cache):
    """The default edit (edit_margin 2) and a sufficient_loss edit are the same whole update
    (same v* and u: same recipe, seed, templates) scaled by different factors: their norms
    divided by the reported scales agree, and the fact takes with both."""
    (default_scale,) = rome_edit.metrics["update_scale"]
    recipe = _recipe(smollm2, corpus, hyperparameters={"sufficient_loss": 0.5})
    m = run_edit(recipe, None, cache=cov_cache, loaded=smol).metrics
    (scale,) = m["update_scale"]
    assert 0 < scale < 1 and scale != default_scale
    default = rome_edit.metrics["relative_update_norm"][str(LAYER)]
    assert m["relative_update_norm"][str(LAYER)] / scale == pytest.approx(
        default / default_scale, rel=1e-3
    )
    assert m["efficacy"] == 1.0


def test_a_smaller_edit_margin_takes_a_smaller_share_of_the_same_update(
    rome_edit, smollm2, smol, corpus, cov_cache
):
    """A small edit_margin (turn the preference by a quarter of the margin the model held)
    scales the same whole update down further than the default 2 (which this edit, with
    CI's 5 templates and small corpus, may not reach), and the fact still takes."""
    (default_scale,) = rome_edit.metrics["update_scale"]
    recipe = _recipe(smollm2, corpus, hyperparameters={"edit_margin": 0.25})
    m = run_edit(recipe, None, cache=cov_cache, loaded=smol).metrics
    (scale,) = m["update_scale"]
    assert 0 < scale < default_scale
    default = rome_edit.metrics["relative_update_norm"][str(LAYER)]
    assert m["relative_update_norm"][str(LAYER)] / scale == pytest.approx(
        default / default_scale, rel=1e-3
    )
    assert m["efficacy"] == 1.0
    assert m["efficacy_probability_gap"] < rome_edit.metrics["efficacy_probability_gap"]


def test_the_edited_checkpoint_differs_only_in_the_edited_tensor(rome_edit, smollm2):
    edited_name = f"model.layers.{LAYER}.mlp.down_proj.weight"
    from safetensors import safe_open

    with (
        CheckpointReader(smollm2) as before,
        CheckpointReader(rome_edit.out_dir) as after,
        safe_open(str(rome_edit.out_dir / EDIT_DIR / FACTORS), "pt") as factors,
    ):
        assert before.names == after.names
        for name in before.names:
            same = torch.equal(before.read(name), after.read(name))
            assert same == (name != edited_name), name
        left = factors.get_tensor(f"request0.layer{LAYER}.left")
        right = factors.get_tensor(f"request0.layer{LAYER}.right")
        W0, W1 = before.read(edited_name), after.read(edited_name)
    assert torch.allclose(W0 + torch.outer(left, right), W1, atol=1e-6)
    manifest = json.loads((rome_edit.out_dir / "manifest.json").read_text())
    assert manifest["kind"] == "edit" and not manifest["flagged"]
    assert manifest["edited_tensors"] == [{"name": edited_name, "file": "model.safetensors"}]
    for entry in manifest["files"]:
        assert _sha256(rome_edit.out_dir / entry["path"]) == entry["sha256"]


def test_revert_restores_the_original_bit_for_bit(rome_edit, smollm2, tmp_path):
    out = tmp_path / "reverted"
    assert cli_main(["edit", "--revert", str(rome_edit.out_dir), "--out", str(out)]) == 0
    original = sorted(p.name for p in smollm2.iterdir() if p.name != "converted.json")
    assert sorted(p.name for p in out.iterdir()) == original
    for name in original:
        assert _sha256(out / name) == _sha256(smollm2 / name), name


def test_destructive_settings_trip_the_gate_and_write_nothing(
    smollm2, smol, corpus, cov_cache, tmp_path
):
    recipe = _recipe(
        smollm2,
        corpus,
        hyperparameters={
            "layers": [LAYER],
            "context_template_counts": [[0, 5]],
            "mom2_adjustment": False,
            "clamp_norm_factor": 100.0,
            "v_lr": 5.0,
            "v_weight_decay": 0.0,
            "kl_factor": 0.0,
            "v_early_stop_loss": 0.0,
            "v_num_grad_steps": 6,
            "edit_margin": None,  # the whole update
        },
    )
    out = tmp_path / "edited"
    with pytest.raises(EditGateError) as e:
        run_edit(recipe, out, cache=cov_cache, loaded=smol)
    assert not out.exists()
    assert e.value.metrics["gate"]["failures"]
    assert "perplexity ratio" in str(e.value) or "‖ΔW‖/‖W‖" in str(e.value)


def test_first_token_subject_has_a_far_smaller_denominator_with_original_keys(
    smollm2, smol, corpus, cov_cache, rome_edit
):
    # the covariance of LAYER was cached by the rome_edit fixture
    resolved = resolve_reference(_recipe(smollm2, corpus).model, SourceSettings())
    model, tok = smol.model, smol.tokenizer
    record = next(r for r in rome_edit.manifest["covariance"] if r["key"]["layer"] == LAYER)
    hit = cov_cache.get(CovarianceKey(**record["key"]))
    assert hit is not None and record["model_revision"] == model_revision(resolved)
    templates = context_templates(model, tok, [(5, 5)], seed=0)
    # "Japan" is one token, at position 0 of the bare prompt
    keys = subject_keys(
        model, tok, smol.arch.module_name(LAYER), templates, "Japan is a country in", "Japan"
    )
    u = rome_direction(keys.k_bar, hit[0])  # unit norm
    consistent = abs(float(u @ keys.k_bar))
    original = abs(float(u @ keys.k0))
    assert original < 0.1 * consistent


def test_memit_edits_ten_facts_at_once(smollm2, smol, corpus, cov_cache):
    facts = [
        ("The capital of Japan is", "Japan", "Paris", "Tokyo"),
        ("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
        ("The capital of Germany is", "Germany", "Madrid", "Berlin"),
        ("The Colosseum is located in the city of", "Colosseum", "London", "Rome"),
        ("The capital of Egypt is", "Egypt", "Oslo", "Cairo"),
        ("Albert Einstein was born in the country of", "Albert Einstein", "Canada", "Germany"),
        ("The Mona Lisa was painted by", "Mona Lisa", "Picasso", "Leonardo"),
        ("The Statue of Liberty is located in", "Statue of Liberty", "Sydney", "New"),
        ("The capital of Russia is", "Russia", "Lisbon", "Moscow"),
        ("The Great Wall is located in", "Great Wall", "Brazil", "China"),
    ]
    neighborhood = [
        "The capital of Italy is",
        "The capital of Spain is",
        "The largest ocean is the",
    ]
    recipe = parse_edit_recipe(
        {
            "edit_method": "memit",
            "model": str(smollm2),
            "requests": [
                {
                    "prompt": p,
                    "subject": s,
                    "target_new": new,
                    "target_true": true,
                    "neighborhood_prompts": neighborhood,
                }
                for p, s, new, true in facts
            ],
            "hyperparameters": {"context_template_counts": [[2, 5]], "v_num_grad_steps": 12},
            "covariance": {"source": "text", "paths": [str(corpus)], "tokens": 2048},
        }
    )
    result = run_edit(recipe, None, cache=cov_cache, loaded=smol)
    m = result.metrics
    assert m["efficacy"] >= 0.9
    assert m["neighborhood"] >= 0.9
    assert m["perplexity_ratio"] <= 1.10
    assert sorted(int(x) for x in m["relative_update_norm"]) == [4, 5, 6, 7, 8]


KEEP = [
    "The capital of Germany is",
    "The currency of the United Kingdom is the",
    "Tokyo is a city in",
]


@torch.no_grad()
def _kept_logit_change(target: EditModel, updates) -> float:
    """Max |Δ logit| over every position of the KEEP prompts, plain forward passes before and
    after adding the updates to the unedited model (its weights restored afterwards)."""
    model, tok = target.model, target.tokenizer
    ids = [torch.tensor([tok(p).input_ids]) for p in KEEP]
    before = [model(x).logits for x in ids]
    with target.restored({u.layer for u in updates}):
        for u in updates:
            w = model.get_submodule(target.arch.module_name(u.layer)).weight
            w += torch.outer(u.left, u.right)
        after = [model(x).logits for x in ids]
    return max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True))


def test_kept_prompts_keep_their_predictions(rome_edit, smollm2, smol, corpus, cov_cache):
    """The same edit with keep_prompts: it still takes, and the kept prompts' logits are
    unchanged (float32 rounding), where the plain edit moves them. (The constraint costs
    some generality: the kept keys share the paraphrases' "The capital of" context, so not
    every paraphrase is asserted.)"""
    recipe = _recipe(smollm2, corpus)
    request = recipe.requests[0].model_copy(update={"keep_prompts": KEEP})
    kept_recipe = recipe.model_copy(update={"requests": [request]})
    result = run_edit(kept_recipe, None, cache=cov_cache, loaded=smol)
    m = result.metrics
    assert m["efficacy"] == 1.0 and m["gate"]["passed"]
    assert (m["keep_unchanged"], m["keep_prompts"]) == (1.0, 3)
    plain = _kept_logit_change(smol, rome_edit.updates)
    kept = _kept_logit_change(smol, result.updates)
    assert plain > 0.05, "the test needs an edit that moves the kept prompts"
    assert kept < 1e-3
