"""Edit recipe validation: each problem names its field."""

from __future__ import annotations

import pytest

from schemas.edit_recipe import parse_edit_recipe
from schemas.recipe import RecipeError

BASE = {
    "edit_method": "rome",
    "model": "./smollm2",
    "requests": [{"prompt": "The capital of Japan is", "subject": "Japan", "target_new": "Paris"}],
}


def _with(**changes):
    return {**BASE, **changes}


def test_a_minimal_recipe_gets_the_documented_defaults():
    r = parse_edit_recipe(BASE)
    h = r.hyperparameters
    assert (h.v_num_grad_steps, h.v_lr, h.v_weight_decay, h.kl_factor) == (25, 0.5, 1e-3, 0.0625)
    assert h.mom2_adjustment and h.key_mode == "consistent" and h.layers is None
    assert (h.trace_samples, h.trace_noise) == (10, 3.0)
    assert r.clamp_norm_factor == 4.0
    assert h.sufficient_loss is None
    assert h.edit_margin == 2.0  # the update scaled to turn the preference by 2 × m₀
    assert h.context_template_counts == [(10, 5), (10, 10)]
    assert r.covariance.source == "model_samples" and r.covariance.tokens is None
    assert r.gate.max_perplexity_ratio == 1.10
    assert r.on_gate_failure == "fail"


def test_memit_defaults():
    r = parse_edit_recipe(_with(edit_method="memit"))
    assert r.clamp_norm_factor == 0.75
    assert r.hyperparameters.mom2_update_weight is None  # scaled to the model at run time
    assert r.hyperparameters.edit_margin is None  # a rome setting: memit keeps its update


def test_alphaedit_defaults_are_the_papers():
    r = parse_edit_recipe(_with(edit_method="alphaedit"))
    h = r.hyperparameters
    # the reference code's hparams for GPT-2 XL, GPT-J and Llama-3-8B
    assert (h.nullspace_threshold, h.alphaedit_l2) == (2e-2, 10.0)
    assert r.clamp_norm_factor == 0.75  # MEMIT's z clamp
    assert h.edit_margin is None and r.max_relative_update == 0.5


def test_rome_and_memit_leave_the_alphaedit_settings_unset():
    for method in ("rome", "memit"):
        h = parse_edit_recipe(_with(edit_method=method)).hyperparameters
        assert h.nullspace_threshold is None and h.alphaedit_l2 is None


def test_rome_takes_a_sufficient_loss_in_place_of_the_default_edit_margin():
    r = parse_edit_recipe(_with(hyperparameters={"sufficient_loss": 0.5}))
    assert r.hyperparameters.sufficient_loss == 0.5
    assert r.hyperparameters.edit_margin is None


def test_rome_takes_an_edit_margin_or_none_for_the_whole_update():
    assert (
        parse_edit_recipe(_with(hyperparameters={"edit_margin": 1.5})).hyperparameters.edit_margin
        == 1.5
    )
    assert (
        parse_edit_recipe(_with(hyperparameters={"edit_margin": None})).hyperparameters.edit_margin
        is None
    )


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            _with(requests=[{"prompt": "The capital is", "subject": "Japan", "target_new": "X"}]),
            "requests[0]: subject: 'Japan' does not occur in the prompt",
        ),
        (
            _with(requests=[{"prompt": "Japan is", "subject": "Japan", "target_new": " "}]),
            "requests[0].target_new: must not be empty",
        ),
        (
            _with(edit_method="pmet"),
            "edit_method: unknown method 'pmet'; valid: rome, memit, alphaedit",
        ),
        (
            _with(edit_method="memit", hyperparameters={"nullspace_threshold": 0.02}),
            "hyperparameters.nullspace_threshold: applies to alphaedit only, not memit",
        ),
        (
            _with(hyperparameters={"alphaedit_l2": 10}),
            "hyperparameters.alphaedit_l2: applies to alphaedit only, not rome",
        ),
        (
            _with(edit_method="alphaedit", hyperparameters={"nullspace_threshold": 0}),
            "hyperparameters.nullspace_threshold: Input should be greater than 0",
        ),
        (
            _with(edit_method="alphaedit", hyperparameters={"nullspace_threshold": "inf"}),
            "hyperparameters.nullspace_threshold: Input should be a finite number",
        ),
        (
            _with(edit_method="alphaedit", hyperparameters={"alphaedit_l2": -1}),
            "hyperparameters.alphaedit_l2: Input should be greater than 0",
        ),
        (
            _with(edit_method="alphaedit", hyperparameters={"edit_margin": 2}),
            "hyperparameters.edit_margin: applies to rome only; alphaedit spreads",
        ),
        (_with(hyperparameters={"layers": [-1]}), "hyperparameters.layers: layer indices"),
        (_with(hyperparameters={"layers": [3, 4]}), "rome edits exactly one layer"),
        (_with(requests=[BASE["requests"][0]] * 2), "requests: rome edits one fact per run"),
        (_with(requests=[]), "requests: at least one edit request"),
        (_with(covariance={"source": "text"}), "covariance: paths: source 'text' needs"),
        (_with(model="not a reference"), "model: invalid model reference"),
        (_with(hyperparameters={"v_lr": 0}), "hyperparameters.v_lr"),
        (_with(on_gate_failure="ignore"), "on_gate_failure"),
        (_with(extra=1), "extra: unknown field"),
        (
            _with(edit_method="memit", hyperparameters={"sufficient_loss": 0.5}),
            "hyperparameters.sufficient_loss: applies to rome only",
        ),
        (_with(hyperparameters={"sufficient_loss": 0}), "hyperparameters.sufficient_loss"),
        (
            _with(edit_method="memit", hyperparameters={"edit_margin": 2}),
            "hyperparameters.edit_margin: applies to rome only",
        ),
        (
            _with(hyperparameters={"edit_margin": 0}),
            "hyperparameters.edit_margin: Input should be greater than 0",
        ),
        (
            _with(hyperparameters={"edit_margin": 1000}),
            "hyperparameters.edit_margin: Input should be less than or equal to 100",
        ),
        (
            _with(hyperparameters={"edit_margin": 2, "sufficient_loss": 0.5}),
            "hyperparameters.edit_margin: set either edit_margin or sufficient_loss",
        ),
        (
            _with(hyperparameters={"sufficient_loss": 0.7}),
            "hyperparameters.sufficient_loss: Input should be less than 0.693",
        ),
    ],
)
def test_invalid_recipes_name_the_field(recipe, message):
    with pytest.raises(RecipeError) as e:
        parse_edit_recipe(recipe)
    assert message in str(e.value)


def test_yaml_text_is_accepted():
    text = """
edit_method: memit
model: org/model@main
requests:
  - {prompt: "The Eiffel Tower is in", subject: "Eiffel Tower", target_new: "Rome"}
covariance: {source: text, paths: [./wiki.txt], tokens: 20000}
"""
    r = parse_edit_recipe(text)
    assert r.covariance.paths == ["./wiki.txt"]
    assert str(r.model) == "org/model@main"


def test_the_cli_reports_a_bad_edit_recipe_with_its_field(tmp_path, capsys):
    from weightsmith.cli import main

    path = tmp_path / "edit.yaml"
    path.write_text(
        "edit_method: rome\nmodel: ./m\nrequests: [{prompt: a, subject: b, target_new: c}]\n"
    )
    assert main(["edit", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "requests[0]: subject: 'b' does not occur in the prompt" in err
    assert not (tmp_path / "out").exists()


def _corpus(*paths):
    return _with(covariance={"source": "text", "paths": list(paths)})


@pytest.mark.parametrize(
    ("raw", "kind", "container", "version", "path"),
    [
        ("s3://corpora/wiki/en.txt", "s3", "corpora", None, "wiki/en.txt"),
        ("artifact://texts@3/wiki/en.txt", "artifact", "texts", 3, "wiki/en.txt"),
        ("./wiki.txt", "local", None, None, "./wiki.txt"),
        ("/data/wiki.txt", "local", None, None, "/data/wiki.txt"),
    ],
)
def test_covariance_text_paths_may_be_s3_artifact_or_local(raw, kind, container, version, path):
    from schemas.edit_recipe import parse_corpus_path

    assert parse_edit_recipe(_corpus(raw)).covariance.paths == [raw]
    loc = parse_corpus_path(raw)
    assert (loc.kind, loc.container, loc.version, loc.path) == (kind, container, version, path)
    assert str(loc) == raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("s3://Corpora/x.txt", "covariance.paths[1]: 's3://Corpora/x.txt': 'Corpora' is not an S3"),
        ("s3://corpora", "covariance.paths[1]: 's3://corpora': the object key must name one file"),
        ("s3://corpora/dir/", "the object key must name one file"),
        ("s3://corpora/a/../b.txt", "no empty, '.' or '..' segments"),
        (
            "artifact://texts/en.txt",
            "needs a pinned version number, e.g. artifact://texts@1/en.txt",
        ),
        ("artifact://texts@latest/en.txt", "needs a pinned version number"),
        ("artifact://texts@2", "the path inside the artifact must name one file"),
        ("artifact://Texts@2/en.txt", "'Texts' is not an artifact name"),
        ("https://example.com/en.txt", "unsupported scheme; valid forms: s3://BUCKET/KEY"),
        ("  ", "an empty path"),
    ],
)
def test_invalid_covariance_paths_name_the_entry_and_the_valid_forms(raw, message):
    with pytest.raises(RecipeError) as e:
        parse_edit_recipe(_corpus("./ok.txt", raw))
    assert message in str(e.value)
