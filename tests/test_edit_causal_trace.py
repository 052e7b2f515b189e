"""``layers: auto``: the causal trace that chooses the edited layers.

The batched trace (``workers.edit.causal_trace``) is checked against a plain float64
re-implementation (tests/support/reference_trace.py: one sequence per forward pass, full
logits) on tiny random Llama and GPT-2 models; the chosen layer against the argmax of the
reference's effects within layers 1 … ⌊depth/2⌋; the cache by counting forward passes; and
run_edit end to end with auto, fixed and scaled-default layers, and the refusals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from schemas.edit_recipe import EditRecipe, parse_edit_recipe
from schemas.recipe import RecipeError
from testbed.tiny_models import (
    build_tokenizer,
    gpt2_config,
    llama_config,
    save_tokenizer,
    write_word_corpus,
)
from tests.support.reference_trace import reference_trace
from workers.edit import LocalCovarianceCache, run_edit
from workers.edit.architectures import EditModel, architecture_for
from workers.edit.causal_trace import (
    TRACED,
    LocalTraceCache,
    ObjectStoreTraceCache,
    TraceSettings,
    choose_layers,
    peak_layer,
    search_range,
    trace_prompt,
)
from workers.edit.methods import METHODS
from workers.errors import InputError

DEPTH = 6
LOGIT_SCALE = 10.0  # the final norm's weight × 10: a random model with preferences
SETTINGS = TraceSettings(samples=4, noise=1.0, seed=7)  # less noise: larger effects
FACTS = [
    {"prompt": "w5 w6 w7 w8 w9", "subject": "w6 w7", "target_new": "w20"},
    {"prompt": "w50 w51 w52", "subject": "w52", "target_new": "w60"},
    {"prompt": "w70 w71 w72 w73", "subject": "w70", "target_new": "w80", "target_true": "w81"},
]


def _model(kind: str) -> Any:
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(llama_config(num_hidden_layers=DEPTH))
        norm = model.model.norm
    else:
        model = GPT2LMHeadModel(gpt2_config(n_layer=DEPTH))
        norm = model.transformer.ln_f
    with torch.no_grad():
        norm.weight.mul_(LOGIT_SCALE)
    return model.eval()


def _target(kind: str) -> EditModel:
    model = _model(kind)
    return EditModel(model, build_tokenizer(), architecture_for(model.config))


def _mlp_names(target: EditModel) -> list[str]:
    return [target.arch.module_name(layer) for layer in range(DEPTH)]


def _requests(facts: list[dict[str, Any]]) -> list[Any]:
    recipe = parse_edit_recipe({"edit_method": "memit", "model": "org/m@main", "requests": facts})
    return recipe.requests


def _reference(target: EditModel, fact: dict[str, Any], settings: TraceSettings = SETTINGS):
    tok = target.tokenizer
    answer = None
    if fact.get("target_true"):
        answer = tok(" " + fact["target_true"], add_special_tokens=False)["input_ids"][0]
    return reference_trace(
        target.model,
        _mlp_names(target),
        tok,
        fact["prompt"],
        fact["subject"],
        answer,
        samples=settings.samples,
        noise=settings.noise,
        seed=settings.seed,
    )


# ---- the trace against the reference ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "fact", FACTS, ids=["two-token-subject", "last-token-subject", "first-token-target-true"]
)
def test_the_batched_trace_equals_the_plain_float64_one(kind, fact):
    target = _target(kind)
    ours = trace_prompt(target, fact["prompt"], fact["subject"], fact.get("target_true"), SETTINGS)
    ref = _reference(target, fact)

    assert ours.target_token == ref.answer
    assert ours.p_clean == pytest.approx(ref.p_clean, rel=1e-4, abs=1e-7)
    assert ours.p_corrupted == pytest.approx(ref.p_corrupted, rel=1e-4, abs=1e-7)
    assert ours.p_restored == pytest.approx(ref.p_restored, rel=1e-4, abs=1e-7)
    if fact.get("target_true") is None:  # the model's own answer: something to find
        assert ref.p_corrupted < ref.p_clean
        assert max(ref.effects) - min(ref.effects) > 1e-4
    assert ours.indirect_effect == pytest.approx(ref.effects, rel=1e-3, abs=1e-6)


def test_the_subject_tokens_and_the_noise_scale_are_recorded():
    target = _target("llama")
    fact = FACTS[0]
    ours = trace_prompt(target, fact["prompt"], fact["subject"], None, SETTINGS)
    ids = target.tokenizer(fact["prompt"])["input_ids"]
    words = [target.tokenizer.decode([i]).strip() for i in ids]
    first, last = ours.subject_tokens
    assert words[first : last + 1] == ["w6", "w7"]
    std = float(target.model.get_input_embeddings().weight.detach().double().std())
    assert ours.noise_std == pytest.approx(SETTINGS.noise * std, rel=1e-12)


# ---- choosing the layers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "expected"), [(1, (0, 0)), (2, (1, 1)), (3, (1, 1)), (6, (1, 3)), (30, (1, 15))]
)
def test_the_search_range_is_layers_1_to_half_the_depth(depth, expected):
    assert search_range(depth) == expected


def test_the_peak_is_the_argmax_within_the_range_lowest_on_a_tie():
    # layer 0 and layer 4 (beyond ⌊6/2⌋) are larger, and are not candidates
    assert peak_layer([9.0, 0.1, 0.3, 0.2, 5.0, 0.0], 6) == 2
    assert peak_layer([0.0, 0.3, 0.3, 0.3, 0.0, 0.0], 6) == 1
    assert peak_layer([0.0, -0.2, -0.1, -0.3, 0.0, 0.0], 6) == 2


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_the_chosen_layers_follow_the_argmax_of_the_reference_effects(method, tmp_path):
    target = _target("llama")
    facts = FACTS[:1] if method == "rome" else FACTS
    refs = [_reference(target, f) for f in facts]
    mean = [sum(r.effects[layer] for r in refs) / len(refs) for layer in range(DEPTH)]
    peak = max(range(1, DEPTH // 2 + 1), key=lambda layer: mean[layer])

    choice = choose_layers(
        target,
        _requests(facts),
        SETTINGS,
        METHODS[method].layers_at,
        model_revision="tiny",
        cache=LocalTraceCache(tmp_path),
    )

    assert choice.peak == peak
    assert choice.effects == pytest.approx(mean, rel=1e-3, abs=1e-6)
    # ROME: the peak; MEMIT: a band as wide as the scaled default (layers 1–2 of 6) from it
    assert choice.layers == ([peak] if method == "rome" else [peak, peak + 1])
    assert choice.record()["search_range"] == [1, 3]
    assert len(choice.record()["prompts"]) == len(facts)


def test_a_memit_band_that_would_run_past_the_last_layer_ends_at_it():
    memit = METHODS["memit"]
    assert memit.default_layers(32) == [4, 5, 6, 7, 8]
    assert memit.layers_at(1, 32) == [1, 2, 3, 4, 5]
    assert memit.layers_at(16, 32) == [16, 17, 18, 19, 20]
    assert memit.layers_at(2, 3) == [1, 2]  # width 2 on 3 layers


# ---- the cache -------------------------------------------------------------------------------


def _forward_counter(model: Any) -> list[int]:
    calls = [0]

    def count(_m: Any, _a: Any) -> None:
        calls[0] += 1

    model.base_model.register_forward_pre_hook(count)
    return calls


@pytest.mark.parametrize("store", ["local", "object_store"])
def test_a_cached_trace_comes_back_the_same_without_forward_passes(store, tmp_path):
    from infra.storage import LocalObjectStore

    cache = (
        LocalTraceCache(tmp_path / "traces")
        if store == "local"
        else ObjectStoreTraceCache(LocalObjectStore(tmp_path / "store"))
    )
    target = _target("llama")
    requests = _requests(FACTS[:2])
    rome = METHODS["rome"].layers_at
    calls = _forward_counter(target.model)

    first = choose_layers(target, requests, SETTINGS, rome, model_revision="rev", cache=cache)
    assert first.cache == ["miss", "miss"] and calls[0] > 0
    before, traced = calls[0], TRACED["prompts"]
    again = choose_layers(target, requests, SETTINGS, rome, model_revision="rev", cache=cache)

    assert again.cache == ["hit", "hit"]
    assert calls[0] == before and TRACED["prompts"] == traced  # no forward pass at all
    assert again.traces == first.traces and again.layers == first.layers

    # another revision or other settings are other entries
    other = TraceSettings(samples=3, noise=SETTINGS.noise, seed=7)
    assert choose_layers(
        target, requests, other, rome, model_revision="rev", cache=cache
    ).cache == ["miss", "miss"]
    assert choose_layers(
        target, requests, SETTINGS, rome, model_revision="rev2", cache=cache
    ).cache == ["miss", "miss"]


# ---- run_edit --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deep_tiny") / "llama"
    _model("llama").save_pretrained(str(root))
    save_tokenizer(root)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_corpus(tmp_path_factory.mktemp("trace_corpus") / "corpus.txt", 40)


def _recipe(model: Path, corpus: Path, method: str, **hyperparameters: Any) -> EditRecipe:
    facts = FACTS[:1] if method == "rome" else FACTS
    return parse_edit_recipe(
        {
            "edit_method": method,
            "model": str(model),
            "requests": facts,
            "hyperparameters": {
                "v_num_grad_steps": 3,
                "context_template_counts": [[1, 3]],
                "trace_samples": SETTINGS.samples,
                "trace_noise": SETTINGS.noise,
                **hyperparameters,
            },
            "covariance": {
                "source": "text",
                "paths": [str(corpus)],
                "tokens": 512,
                "max_length": 32,
            },
            "seed": SETTINGS.seed,
            "on_gate_failure": "publish_flagged",
        }
    )


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_run_edit_with_auto_layers_edits_where_the_trace_peaks_and_records_it(
    checkpoint, corpus, tmp_path, method
):
    assert _recipe(checkpoint, corpus, method).hyperparameters.layers is None  # the default
    recipe = _recipe(checkpoint, corpus, method, layers="auto")
    seen: list[str] = []
    traces = LocalTraceCache(tmp_path / "traces")

    result = run_edit(
        recipe,
        tmp_path / "edited",
        cache=LocalCovarianceCache(tmp_path / "cov"),
        trace_cache=traces,
        progress=seen.append,
    )

    assert seen[:2] == ["load", "trace"] and "trace_s" in result.manifest["timings"]
    target = _target("llama")
    facts = FACTS[:1] if method == "rome" else FACTS
    refs = [_reference(target, f) for f in facts]
    mean = [sum(r.effects[layer] for r in refs) / len(refs) for layer in range(DEPTH)]
    peak = max(range(1, 4), key=lambda layer: mean[layer])
    layers = [peak] if method == "rome" else [peak, peak + 1]
    manifest = json.loads((tmp_path / "edited" / "manifest.json").read_text())
    assert manifest["layers"] == layers and manifest["layer_choice"] == "auto"
    assert sorted({u.layer for u in result.updates}) == layers
    trace = manifest["causal_trace"]
    assert trace == manifest["metrics"]["causal_trace"] == result.metrics["causal_trace"]
    assert trace["peak"] == peak and trace["layers"] == layers
    assert trace["indirect_effect"] == pytest.approx(mean, abs=1e-5)
    assert [p["cache"] for p in trace["prompts"]] == ["miss"] * len(facts)
    assert result.metrics["layers"] == layers


@pytest.mark.parametrize(
    ("layers", "expected", "choice"), [([2], [2], "fixed"), (None, [1], "default")]
)
def test_fixed_and_default_layers_run_no_trace(
    checkpoint, corpus, tmp_path, layers, expected, choice
):
    recipe = _recipe(checkpoint, corpus, "rome", layers=layers, mom2_adjustment=False)
    seen: list[str] = []
    traced = TRACED["prompts"]

    result = run_edit(recipe, None, trace_cache=LocalTraceCache(tmp_path), progress=seen.append)

    assert "trace" not in seen and "trace_s" not in result.manifest["timings"]
    assert TRACED["prompts"] == traced
    assert result.manifest["layers"] == expected  # null: ROME layer 1
    assert result.manifest["layer_choice"] == choice
    assert result.metrics["causal_trace"] is None
    assert {u.layer for u in result.updates} == set(expected)


# ---- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hyperparameters", "message"),
    [
        ({"layers": "autoo"}, "hyperparameters.layers: 'autoo' is not valid: write auto"),
        ({"layers": 3}, "hyperparameters.layers: 3 is not valid: write auto, a list"),
        ({"layers": []}, "hyperparameters.layers: an empty list edits nothing"),
        ({"layers": [-1]}, "hyperparameters.layers: layer indices start at 0"),
        ({"trace_samples": 0}, "hyperparameters.trace_samples"),
        ({"trace_samples": 101}, "hyperparameters.trace_samples"),
        ({"trace_noise": 0}, "hyperparameters.trace_noise"),
    ],
)
def test_bad_layer_and_trace_values_are_refused_naming_the_field(hyperparameters, message):
    with pytest.raises(RecipeError) as e:
        parse_edit_recipe(
            {
                "edit_method": "rome",
                "model": "org/m@main",
                "requests": FACTS[:1],
                "hyperparameters": hyperparameters,
            }
        )
    assert message in str(e.value)


def test_a_layer_beyond_the_depth_is_refused_before_any_trace(checkpoint, corpus, tmp_path):
    recipe = _recipe(checkpoint, corpus, "rome", layers=[DEPTH])
    seen: list[str] = []
    with pytest.raises(InputError) as e:
        run_edit(recipe, None, trace_cache=LocalTraceCache(tmp_path), progress=seen.append)
    assert e.value.field == "hyperparameters.layers" and seen == ["load"]

    auto = _recipe(checkpoint, corpus, "rome", layers="auto", v_loss_layer=DEPTH)
    seen.clear()
    with pytest.raises(InputError) as e:
        run_edit(auto, None, trace_cache=LocalTraceCache(tmp_path), progress=seen.append)
    assert e.value.field == "hyperparameters.v_loss_layer" and seen == ["load"]


def test_the_cli_edits_at_the_traced_layer_and_keeps_the_trace_in_its_cache_dir(
    checkpoint, corpus, tmp_path, capsys
):
    from weightsmith.cli import main

    recipe = {
        "edit_method": "rome",
        "model": str(checkpoint),
        "requests": FACTS[:1],
        "hyperparameters": {
            "layers": "auto",
            "v_num_grad_steps": 2,
            "context_template_counts": [[1, 3]],
            "trace_samples": SETTINGS.samples,
            "trace_noise": SETTINGS.noise,
            "mom2_adjustment": False,
        },
        "seed": SETTINGS.seed,
        "on_gate_failure": "publish_flagged",
    }
    path = tmp_path / "edit.json"
    path.write_text(json.dumps(recipe))
    cache_dir = tmp_path / "cache"

    code = main(["edit", str(path), "--out", str(tmp_path / "out"), "--cache-dir", str(cache_dir)])

    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    layers = manifest["layers"]
    assert f"at layers {layers} (auto)" in capsys.readouterr().out
    assert len(list((cache_dir / "trace").glob("*.json"))) == 1
