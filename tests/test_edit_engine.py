"""run_edit end to end on tiny random models, in seconds: the phases in order, the edited
checkpoint (only the edited tensor changes, by the recorded factors), revert, the gate, the
method table, the checks against the model's depth, cancellation, and one loaded model
reused across edits.

Numbers are checked against the written files (plain tensor arithmetic) and plain forward
passes of a freshly loaded model, not against the code under test. The models are random:
the value optimisation runs without early stop or a tight clamp so that an edit takes, and
such an edit breaks the gate, so most recipes here publish flagged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas.edit_recipe import EditMethod, EditRecipe, parse_edit_recipe
from testbed.tiny_models import save_tokenizer, write_word_corpus
from tests.support.tiny_edit import tiny_model
from workers.edit import EditGateError, LocalCovarianceCache, revert_edit, run_edit
from workers.edit.architectures import default_mom2_update_weight
from workers.edit.checkpoint import EDIT_DIR, FACTORS
from workers.edit.covariance import COMPUTED
from workers.edit.engine import load_model
from workers.edit.methods import METHODS
from workers.errors import CancelledError, InputError
from workers.sources import SourceSettings, resolve_reference
from workers.tensors import CheckpointReader

LAYER = 1
DEPTH = 3  # tiny_model's layers
PHASES = ["load", "templates", "covariance", "probe", "edit", "metrics", "write"]
FACT = {
    "prompt": "w5 w6 w7 w8",
    "subject": "w8",
    "target_new": "w20 w21",
    "paraphrase_prompts": ["w9 w8"],
    "neighborhood_prompts": ["w40 w41 w42"],
}
SECOND_FACT = {"prompt": "w50 w51 w52", "subject": "w52", "target_new": "w60"}
# no early stop, no KL, a loose clamp: an update large enough to take on a random model
STRONG = {
    "v_num_grad_steps": 10,
    "v_lr": 0.5,
    "v_weight_decay": 0.0,
    "kl_factor": 0.0,
    "clamp_norm_factor": 1e4,
    "v_early_stop_loss": 0.0,
    "context_template_counts": [[2, 3]],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny_model("llama") and tiny_model("gpt2") saved with the word-level tokenizer."""
    root = tmp_path_factory.mktemp("tiny_edit")
    out = {}
    for kind in ("llama", "gpt2"):
        tiny_model(kind).save_pretrained(str(root / kind))
        save_tokenizer(root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_corpus(tmp_path_factory.mktemp("tiny_corpus") / "corpus.txt", 40)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> LocalCovarianceCache:
    return LocalCovarianceCache(tmp_path_factory.mktemp("tiny_covariance"))


def _recipe(model: Path, corpus: Path, method: str = "rome", **changes: Any) -> EditRecipe:
    data: dict[str, Any] = {
        "edit_method": method,
        "model": str(model),
        "requests": [FACT] if method == "rome" else [FACT, SECOND_FACT],
        "hyperparameters": {**STRONG, "layers": [LAYER] if method == "rome" else [0, 1]},
        "covariance": {"source": "text", "paths": [str(corpus)], "tokens": 512, "max_length": 32},
        "on_gate_failure": "publish_flagged",
    }
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return parse_edit_recipe(data)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(folder) as reader:
        return {name: reader.read(name) for name in reader.names}


@torch.no_grad()
def _mean_log_prob(model: Any, prompt: list[int], target: list[int]) -> float:
    logp = torch.log_softmax(model(torch.tensor([prompt + target])).logits[0].double(), -1)
    return sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(target)) / len(target)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_rome_edit_changes_only_the_edited_tensor_by_its_factors_and_reverts_bit_for_bit(
    checkpoints, corpus, cache, tmp_path, kind
):
    parent = checkpoints[kind]
    seen: list[str] = []
    result = run_edit(
        _recipe(parent, corpus), tmp_path / "edited", cache=cache, progress=seen.append
    )

    assert seen == PHASES
    edited = f"{'model.layers' if kind == 'llama' else 'transformer.h'}.{LAYER}.mlp." + (
        "down_proj.weight" if kind == "llama" else "c_proj.weight"
    )
    before, after = _tensors(parent), _tensors(tmp_path / "edited")
    assert before.keys() == after.keys()
    assert [n for n in before if not torch.equal(before[n], after[n])] == [edited]
    with safe_open(str(tmp_path / "edited" / EDIT_DIR / FACTORS), "pt") as f:
        delta = torch.outer(
            f.get_tensor(f"request0.layer{LAYER}.left"),
            f.get_tensor(f"request0.layer{LAYER}.right"),
        )  # nn.Linear orientation; GPT-2's Conv1D stores the transpose
    stored_delta = delta.T if kind == "gpt2" else delta
    torch.testing.assert_close(after[edited], before[edited] + stored_delta)
    W0, W1 = before[edited].double(), after[edited].double()
    assert result.metrics["relative_update_norm"][str(LAYER)] == pytest.approx(
        float((W1 - W0).norm() / W0.norm()), rel=1e-4
    )

    # the edit takes: the written model, loaded afresh, prefers target_new (plain forward)
    tok = AutoTokenizer.from_pretrained(str(parent))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "edited")).eval()
    prompt = tok(FACT["prompt"], add_special_tokens=False).input_ids
    new = tok(FACT["target_new"], add_special_tokens=False).input_ids
    (true,) = result.metrics["targets_true"]
    true_ids = tok(true, add_special_tokens=False).input_ids
    assert _mean_log_prob(model, prompt, new) > _mean_log_prob(model, prompt, true_ids)
    assert result.metrics["efficacy"] == 1.0

    manifest = json.loads((tmp_path / "edited" / "manifest.json").read_text())
    assert manifest["kind"] == "edit" and manifest["method"] == "rome"
    assert manifest["layers"] == [LAYER] and manifest["architecture"] == kind
    assert manifest["flagged"] is True and manifest["metrics"]["gate"]["failures"]
    assert manifest["edited_tensors"] == [{"name": edited, "file": "model.safetensors"}]
    assert [c["layer"] for c in manifest["covariance"]] == [LAYER]
    assert set(manifest["timings"]) == {f"{p}_s" for p in PHASES} | {"total_s"}
    for entry in manifest["files"]:
        assert _sha256(tmp_path / "edited" / entry["path"]) == entry["sha256"], entry["path"]
    for key in ("denominator", "relative_denominator", "update_scale", "v_steps"):
        assert len(result.metrics[key]) == 1, key

    revert_edit(tmp_path / "edited", tmp_path / "reverted")
    files = sorted(p.name for p in parent.iterdir())
    assert sorted(p.name for p in (tmp_path / "reverted").iterdir()) == files
    for name in files:
        assert _sha256(tmp_path / "reverted" / name) == _sha256(parent / name), name


def test_memit_spreads_a_batch_over_its_layers_with_the_default_lambda(checkpoints, corpus, cache):
    parent = checkpoints["llama"]
    result = run_edit(_recipe(parent, corpus, "memit"), None, cache=cache)

    m = result.metrics
    # λ = 15,000 · d_in / 11,008 with d_in = 128, the tiny Llama's MLP width
    assert m["mom2_update_weight"] == pytest.approx(15000 * 128 / 11008)
    assert m["mom2_update_weight"] == default_mom2_update_weight(128)
    assert m["denominator"] == [] and m["relative_denominator"] == []
    assert "update_scale" not in m
    assert m["v_steps"] == [(0, 10), (1, 10)]
    assert result.manifest["layers"] == [0, 1]
    assert [c["layer"] for c in result.manifest["covariance"]] == [0, 1]
    assert sorted((u.request, u.layer) for u in result.updates) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    weights = _tensors(parent)
    for layer in (0, 1):
        delta = sum(torch.outer(u.left, u.right) for u in result.updates if u.layer == layer)
        W = weights[f"model.layers.{layer}.mlp.down_proj.weight"].double()
        assert m["relative_update_norm"][str(layer)] == pytest.approx(
            float(delta.double().norm() / W.norm()), rel=1e-6
        )


def test_rome_without_mom2_adjustment_computes_no_covariance(checkpoints, corpus, cache):
    recipe = _recipe(checkpoints["llama"], corpus, hyperparameters={"mom2_adjustment": False})
    seen: list[str] = []
    computed = COMPUTED["passes"]

    result = run_edit(recipe, None, cache=cache, progress=seen.append)

    assert seen == [p for p in PHASES if p not in ("covariance", "write")]
    assert result.manifest["covariance"] == []
    assert COMPUTED["passes"] == computed


def test_a_gate_failure_raises_with_the_metrics_and_writes_nothing(
    checkpoints, corpus, cache, tmp_path
):
    recipe = _recipe(checkpoints["llama"], corpus, on_gate_failure="fail")
    out = tmp_path / "out" / "edited"

    with pytest.raises(EditGateError) as e:
        run_edit(recipe, out, cache=cache)

    failures = e.value.metrics["gate"]["failures"]
    assert failures and all(f in str(e.value) for f in failures)
    assert e.value.metrics["gate"]["passed"] is False
    assert list(tmp_path.iterdir()) == []  # not even a staging folder
    # every threshold with its bound (the console charts them): the recipe's defaults, by hand
    m = e.value.metrics
    expected = [("perplexity_ratio", m["perplexity_ratio"], 1.10, "max")]
    norm = m["relative_update_norm"][str(LAYER)]
    expected += [(f"relative_update_norm.{LAYER}", norm, 0.5, "max")]
    expected += [("relative_denominator.0", abs(m["relative_denominator"][0]), 1e-3, "min")]
    checks = m["gate"]["checks"]
    assert [(c["metric"], c["value"], c["bound"], c["kind"]) for c in checks] == expected
    for c, (_, value, bound, kind) in zip(checks, expected, strict=True):
        assert c["passed"] is (value <= bound if kind == "max" else value >= bound)
    assert sum(not c["passed"] for c in checks) == len(failures)


@pytest.mark.parametrize(
    ("hyperparameters", "field", "message"),
    [
        (
            {"layers": [DEPTH]},
            "hyperparameters.layers",
            f"layer(s) [{DEPTH}] do not exist: the model has {DEPTH} layers (0–{DEPTH - 1})",
        ),
        (
            {"v_loss_layer": DEPTH},
            "hyperparameters.v_loss_layer",
            f"layer {DEPTH} does not exist: the model has {DEPTH} layers (0–{DEPTH - 1})",
        ),
    ],
)
def test_a_layer_beyond_the_models_depth_is_refused_naming_the_field_before_any_work(
    checkpoints, corpus, cache, tmp_path, hyperparameters, field, message
):
    recipe = _recipe(checkpoints["llama"], corpus, hyperparameters=hyperparameters)
    seen: list[str] = []

    with pytest.raises(InputError) as e:
        run_edit(recipe, tmp_path / "edited", cache=cache, progress=seen.append)

    assert e.value.field == field and message in str(e.value)
    assert seen == ["load"] and not (tmp_path / "edited").exists()


def test_a_model_without_its_config_is_an_input_error_naming_the_model(
    checkpoints, corpus, cache, tmp_path
):
    broken = tmp_path / "no-config"
    shutil.copytree(checkpoints["llama"], broken)
    (broken / "config.json").unlink()

    with pytest.raises(InputError) as e:
        run_edit(_recipe(broken, corpus), None, cache=cache)

    assert e.value.model == str(broken)
    assert "cannot load the model with transformers" in str(e.value)


def test_a_cancelled_edit_stops_before_its_next_phase_and_writes_nothing(
    checkpoints, corpus, cache, tmp_path
):
    seen: list[str] = []

    def cancelled() -> bool:
        return seen[-1:] == ["probe"]  # cancel once the probe has started

    with pytest.raises(CancelledError):
        run_edit(
            _recipe(checkpoints["llama"], corpus),
            tmp_path / "edited",
            cache=cache,
            progress=seen.append,
            cancelled=cancelled,
        )

    assert seen == ["load", "templates", "covariance", "probe"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_a_model_loaded_once_serves_several_edits_and_comes_back_bit_for_bit(
    checkpoints, corpus, cache, method
):
    resolved = resolve_reference(_recipe(checkpoints["llama"], corpus).model, SourceSettings())
    target = load_model(resolved, "tiny")
    weights = {k: v.clone() for k, v in target.model.state_dict().items()}
    recipe = _recipe(checkpoints["llama"], corpus, method)

    shared = run_edit(recipe, None, cache=cache, resolved=resolved, loaded=target)
    with pytest.raises(EditGateError):
        run_edit(
            recipe.model_copy(update={"on_gate_failure": "fail"}),
            None,
            cache=cache,
            resolved=resolved,
            loaded=target,
        )
    alone = run_edit(recipe, None, cache=cache)  # loads its own copy

    state = target.model.state_dict()
    assert all(torch.equal(state[k], w) for k, w in weights.items())
    assert json.dumps(shared.metrics) == json.dumps(alone.metrics)


def test_every_edit_method_of_the_recipe_has_one_engine_method():
    assert set(METHODS) == set(typing.get_args(EditMethod))
    assert all(name == method.name for name, method in METHODS.items())


def test_the_covariance_phase_reports_sampling_then_statistics_in_tokens(checkpoints, tmp_path):
    # 16 rows × 16 tokens, sampled in one batch: each step counts one token of every row
    sampled = {"source": "model_samples", "tokens": 256, "max_length": 16}
    recipe = _with_covariance(_recipe(checkpoints["llama"], tmp_path), sampled)
    cache = LocalCovarianceCache(tmp_path / "cache")
    events: list[tuple[str, int, int]] = []

    def progress(p: Any) -> None:
        events.append((p.step, p.tokens_done, p.tokens_total))

    run_edit(recipe, None, cache=cache, covariance_progress=progress)
    assert events == [("sampling", 16 * length, 256) for length in range(1, 17)]

    # another layer: the kept samples are counted by a forward pass, nothing is sampled
    events.clear()
    samples = COMPUTED["samples"]
    other = recipe.model_copy(
        update={"hyperparameters": recipe.hyperparameters.model_copy(update={"layers": [0]})}
    )
    run_edit(other, None, cache=cache, covariance_progress=progress)
    assert events == [("statistics", 0, 256), ("statistics", 256, 256)]
    assert COMPUTED["samples"] == samples


def _with_covariance(recipe: EditRecipe, covariance: dict[str, Any]) -> EditRecipe:
    data = recipe.model_dump(mode="json", exclude_none=True)
    return parse_edit_recipe({**data, "covariance": covariance})


class _CancelAt:
    """A cancel flag raised by the test itself at a chosen moment; counts the checks made
    once it is raised (the first must stop the job)."""

    def __init__(self) -> None:
        self.raised = False
        self.checks_after = 0

    def __call__(self) -> bool:
        if self.raised:
            self.checks_after += 1
        return self.raised


@pytest.mark.parametrize(
    ("source", "step"),
    [("model_samples", "sampling"), ("kept model_samples", "statistics"), ("text", "statistics")],
)
def test_a_cancel_during_the_covariance_stops_at_the_next_check_and_restores_the_weights(
    checkpoints, corpus, tmp_path, source, step
):
    resolved = resolve_reference(_recipe(checkpoints["llama"], corpus).model, SourceSettings())
    target = load_model(resolved, "tiny")
    weights = {k: v.clone() for k, v in target.model.state_dict().items()}
    cov = {"source": source.removeprefix("kept "), "tokens": 512, "max_length": 32}
    if source == "text":
        cov["paths"] = [str(corpus)]
    recipe = _with_covariance(_recipe(checkpoints["llama"], corpus), cov)
    if source.startswith("kept"):  # samples kept by an edit of another layer
        h = recipe.hyperparameters.model_copy(update={"layers": [0]})
        run_edit(
            recipe.model_copy(update={"hyperparameters": h}),
            None,
            cache=LocalCovarianceCache(tmp_path / "cache"),
            resolved=resolved,
            loaded=target,
        )
    cancel = _CancelAt()
    events: list[str] = []

    def progress(p: Any) -> None:
        events.append(p.step)
        if p.step == step:
            cancel.raised = True

    with pytest.raises(CancelledError):
        run_edit(
            recipe,
            tmp_path / "edited",
            cache=LocalCovarianceCache(tmp_path / "cache"),
            resolved=resolved,
            loaded=target,
            cancelled=cancel,
            covariance_progress=progress,
        )

    assert cancel.checks_after == 1 and events[-1] == step
    assert events.count(step) == 1  # nothing more was sampled or counted
    assert not (tmp_path / "edited").exists()
    state = target.model.state_dict()
    assert all(torch.equal(state[k], w) for k, w in weights.items())


def test_a_cancel_during_the_value_optimisation_stops_at_the_next_layer(
    checkpoints, corpus, cache, tmp_path
):
    seen: list[str] = []
    cancel = _CancelAt()
    forwards = []

    def cancelled() -> bool:
        if seen[-1:] == ["edit"]:
            forwards.append(1)
            cancel.raised = cancel.raised or len(forwards) == 20  # some steps into v*
        return cancel()

    with pytest.raises(CancelledError):
        run_edit(
            _recipe(checkpoints["llama"], corpus),
            tmp_path / "edited",
            cache=cache,
            progress=seen.append,
            cancelled=cancelled,
        )

    assert seen[-1] == "edit" and cancel.checks_after == 1
