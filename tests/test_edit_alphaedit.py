"""AlphaEdit (``edit_method: alphaedit``) and the edit history an edited model carries.

The update is checked against a plain numpy float64 reference of the paper's formula
(tests/support/reference_alphaedit.py: SVD projector, explicit inverse), with keys and
covariances read by forward hooks, not by the code under test. Sequential edits go through
run_edit twice: the second edit reads the first one's history from the artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas.edit_recipe import EditRecipe, EditRequest, parse_edit_recipe
from testbed.tiny_models import save_tokenizer, write_word_corpus
from tests.support.reference_alphaedit import (
    last_word_key,
    reference_delta,
    reference_projector,
    second_moment,
)
from tests.support.tiny_edit import STRONG, TEMPLATES, tiny_model, tiny_target
from workers.edit import LocalCovarianceCache, revert_edit, run_edit
from workers.edit.algebra import alphaedit_update, nullspace_projector, without_keys
from workers.edit.alphaedit import alphaedit_edit
from workers.edit.history import HISTORY, EditHistory, read_history
from workers.edit.settings import EditSettings
from workers.edit.update import EditContext
from workers.errors import InputError

LAYERS = (0, 1)
FIRST = {"prompt": "w5 w6 w7 w8", "subject": "w8", "target_new": "w20 w21"}
SECOND = {"prompt": "w50 w51 w52", "subject": "w52", "target_new": "w60"}
EARLIER = {"prompt": "w70 w71 w72", "subject": "w72", "target_new": "w80"}
# the tiny model's key second moments have eigenvalues of 1e-5 … 1e-3 and ‖k‖² ≈ 0.015: a
# threshold near the median eigenvalue leaves about half the directions free, and an l2 well
# below ‖k‖² lets the edit take
THRESHOLD = 1.1e-4
L2 = 1e-4
RECIPE_STRONG = {
    "v_num_grad_steps": 10,
    "v_lr": 0.5,
    "v_weight_decay": 0.0,
    "kl_factor": 0.0,
    "clamp_norm_factor": 1e4,
    "v_early_stop_loss": 0.0,
    "context_template_counts": [[2, 3]],
}


# ---- the algebra against the reference --------------------------------------------------------


def _rank_deficient_problem(seed: int = 0) -> dict[str, np.ndarray]:
    """C = K₀K₀ᵀ/n of rank 7 in 12 dimensions, two new keys, one earlier key, residuals."""
    rng = np.random.default_rng(seed)
    K0 = rng.normal(size=(12, 7)) @ rng.normal(size=(7, 40))
    return {
        "K0": K0,
        "C": K0 @ K0.T / 40,
        "R": rng.normal(size=(5, 2)),
        "K1": rng.normal(size=(12, 2)),
        "Kp": rng.normal(size=(12, 1)),
    }


@pytest.mark.parametrize("with_earlier", [False, True])
def test_the_update_equals_the_papers_formula_in_float64(with_earlier):
    p = _rank_deficient_problem()
    Kp = p["Kp"] if with_earlier else None
    t = lambda a: torch.from_numpy(a)  # noqa: E731

    P = nullspace_projector(t(p["C"]), 1e-8)
    left, right = alphaedit_update(
        t(p["R"]).float(), t(p["K1"]).float(), P, None if Kp is None else t(Kp).float(), 0.5
    )

    want = reference_delta(
        p["R"].astype(np.float32),
        p["K1"].astype(np.float32),
        p["C"],
        1e-8,
        0.5,
        None if Kp is None else Kp.astype(np.float32),
    )
    assert round(float(torch.trace(P))) == 5  # 12 − rank 7
    np.testing.assert_allclose((left @ right.T).double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_the_update_leaves_the_preserved_keys_outputs_where_they_were():
    p = _rank_deficient_problem()
    t = lambda a: torch.from_numpy(a).float()  # noqa: E731
    P = nullspace_projector(torch.from_numpy(p["C"]), 1e-8)
    left, right = alphaedit_update(t(p["R"]), t(p["K1"]), P, t(p["Kp"]), 0.5)
    delta = (left @ right.T).double().numpy()

    # every key C was accumulated from keeps its output: ΔW K₀ = 0
    moved = np.linalg.norm(delta @ p["K0"], axis=0) / np.linalg.norm(p["K0"], axis=0)
    assert moved.max() < 1e-6 * np.linalg.norm(delta)
    # and the new keys do move
    assert np.linalg.norm(delta @ p["K1"]) > 0.1 * np.linalg.norm(p["R"])


def test_a_kept_key_is_taken_out_of_the_null_space():
    p = _rank_deficient_problem()
    P = nullspace_projector(torch.from_numpy(p["C"]), 1e-8)
    kept = torch.from_numpy(np.random.default_rng(1).normal(size=(12, 2)))

    Pk = without_keys(P, kept)

    torch.testing.assert_close(Pk @ Pk, Pk)  # still a projector
    assert round(float(torch.trace(Pk))) == 3
    assert float((Pk @ kept).norm()) < 1e-10


# ---- the engine on a tiny model ---------------------------------------------------------------


def _corpus_texts() -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(f"w{i}" for i in rng.integers(4, 120, size=12)) for _ in range(40)]


def _alphaedit_on_tiny_llama(history: EditHistory) -> tuple[Any, Any, dict[int, np.ndarray]]:
    target = tiny_target("llama")
    module = target.arch.module_name
    covariances = {
        layer: second_moment(target.model, target.tokenizer, module(layer), _corpus_texts())
        for layer in LAYERS
    }
    settings = EditSettings(
        layers=LAYERS,
        values=STRONG,
        key_mode="consistent",
        mom2_adjustment=True,
        nullspace_threshold=THRESHOLD,
        alphaedit_l2=L2,
    )
    context = EditContext(
        TEMPLATES, {k: torch.from_numpy(c).float() for k, c in covariances.items()}, history
    )
    requests = [EditRequest(**FIRST), EditRequest(**SECOND)]
    updates, notes = alphaedit_edit(target, requests, settings, context)
    return target, (updates, notes), covariances


def _earlier_history() -> EditHistory:
    """One earlier edit (EARLIER) whose key is recorded at layer 0 only (as a ROME edit at
    layer 0 would leave it): AlphaEdit reads its layer-1 key on the model."""
    model = tiny_model("llama")
    target = tiny_target("llama")
    k0 = last_word_key(
        model, target.tokenizer, target.arch.module_name(0), TEMPLATES, EARLIER["prompt"]
    )
    return EditHistory(
        edits=[{"method": "rome", "layers": [0], "requests": [EARLIER]}],
        keys={0: torch.from_numpy(k0).float()[:, None]},
        owners={0: torch.tensor([0])},
    )


def test_the_engines_update_on_a_tiny_model_matches_the_reference():
    target, (updates, notes), covariances = _alphaedit_on_tiny_llama(_earlier_history())
    model, tok = target.model, target.tokenizer  # edited: keys at l are read as they were

    for layer in LAYERS:
        module = target.arch.module_name(layer)
        ours = [u for u in sorted(updates, key=lambda u: u.request) if u.layer == layer]
        R = torch.stack([u.left for u in ours], 1).double().numpy()
        K1 = np.stack(
            [last_word_key(model, tok, module, TEMPLATES, r["prompt"]) for r in (FIRST, SECOND)], 1
        )
        Kp = last_word_key(model, tok, module, TEMPLATES, EARLIER["prompt"])[:, None]
        delta = sum(torch.outer(u.left, u.right) for u in ours).double().numpy()

        want = reference_delta(R, K1, covariances[layer], THRESHOLD, L2, Kp)
        scale = np.abs(want).max()
        np.testing.assert_allclose(delta, want, rtol=1e-3, atol=1e-4 * scale)

        # the directions C spans (eigenvalue ≥ threshold) keep their outputs: ΔW(I − P) = 0
        free = reference_projector(covariances[layer], THRESHOLD)
        assert np.abs(delta @ (np.eye(len(free)) - free)).max() < 1e-5 * scale
        assert notes["nullspace_dimension"][str(layer)] == round(np.trace(free))
        assert 0 < notes["nullspace_dimension"][str(layer)] < 128
        assert notes["protected_keys"][str(layer)] == 1


def test_the_earlier_edits_keys_move_less_with_the_history_than_without():
    history = _earlier_history()
    moved = {}
    for name, h in (("with", history), ("without", EditHistory.empty())):
        _target, (updates, _), _ = _alphaedit_on_tiny_llama(h)
        delta = sum(torch.outer(u.left, u.right) for u in updates if u.layer == 0).double()
        moved[name] = float((delta @ history.keys[0].double()).norm())
    assert moved["with"] < 0.2 * moved["without"]


# ---- sequential edits through run_edit: the history ------------------------------------------


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("alphaedit") / "llama"
    tiny_model("llama").save_pretrained(str(root))
    save_tokenizer(root)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_corpus(tmp_path_factory.mktemp("alphaedit_corpus") / "corpus.txt", 40)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> LocalCovarianceCache:
    return LocalCovarianceCache(tmp_path_factory.mktemp("alphaedit_covariance"))


def _recipe(model: Path, corpus: Path, method: str, facts: list[dict], **hyper: Any) -> EditRecipe:
    extra = {"nullspace_threshold": THRESHOLD, "alphaedit_l2": L2} if method == "alphaedit" else {}
    return parse_edit_recipe(
        {
            "edit_method": method,
            "model": str(model),
            "requests": facts,
            "hyperparameters": {**RECIPE_STRONG, "layers": list(LAYERS), **extra, **hyper},
            "covariance": {
                "source": "text",
                "paths": [str(corpus)],
                "tokens": 512,
                "max_length": 32,
            },
            "on_gate_failure": "publish_flagged",
        }
    )


@torch.no_grad()
def _prefers(model: Any, tok: Any, prompt: str, new: str, true: str) -> bool:
    def score(target: str) -> float:
        p = tok(prompt, add_special_tokens=False).input_ids
        t = tok(target, add_special_tokens=False).input_ids
        logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0].double(), -1)
        return sum(float(logp[len(p) + j - 1, x]) for j, x in enumerate(t)) / len(t)

    return score(new) > score(true)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_edits(parent, corpus, cache, tmp_path_factory) -> tuple[Path, Path, Any, Any]:
    """memit (FIRST, EARLIER) on the parent, then alphaedit (SECOND) on the result."""
    root = tmp_path_factory.mktemp("sequential")
    first = run_edit(_recipe(parent, corpus, "memit", [FIRST, EARLIER]), root / "v1", cache=cache)
    second = run_edit(_recipe(root / "v1", corpus, "alphaedit", [SECOND]), root / "v2", cache=cache)
    return root / "v1", root / "v2", first, second


def test_a_second_edit_keeps_the_first_edits_targets_and_carries_its_history(two_edits, parent):
    _v1, v2, first, second = two_edits
    tok = AutoTokenizer.from_pretrained(str(parent))
    model = AutoModelForCausalLM.from_pretrained(str(v2)).eval()
    for fact, true in zip([FIRST, EARLIER], first.metrics["targets_true"], strict=True):
        assert _prefers(model, tok, fact["prompt"], fact["target_new"], true), fact
    (true,) = second.metrics["targets_true"]
    assert _prefers(model, tok, SECOND["prompt"], SECOND["target_new"], true)

    # the second edit protected the first edit's two keys at each of its layers
    assert second.metrics["earlier_edits"] == 1
    assert second.metrics["protected_keys"] == {"0": 2, "1": 2}

    history = read_history(v2, model="v2")
    assert [e["method"] for e in history.edits] == ["memit", "alphaedit"]
    assert [r["prompt"] for r in history.requests] == [
        FIRST["prompt"],
        EARLIER["prompt"],
        SECOND["prompt"],
    ]
    for layer in LAYERS:
        assert history.owners[layer].tolist() == [0, 1, 2]
        recorded = {u.request: u.key for u in first.updates if u.layer == layer}
        torch.testing.assert_close(history.keys[layer][:, 0], recorded[0])
        torch.testing.assert_close(history.keys[layer][:, 1], recorded[1])
        (new,) = [u.key for u in second.updates if u.layer == layer]
        torch.testing.assert_close(history.keys[layer][:, 2], new)

    manifest = json.loads((v2 / "manifest.json").read_text())
    assert manifest["edit_history"]["file"] == HISTORY
    assert [len(e["requests"]) for e in manifest["edit_history"]["edits"]] == [2, 1]
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert listed[HISTORY] == _sha256(v2 / HISTORY)


def test_reverting_the_second_edit_gives_the_first_bit_for_bit(two_edits, tmp_path):
    v1, v2, _, _ = two_edits
    revert_edit(v2, tmp_path / "reverted")
    for path in (tmp_path / "reverted").iterdir():
        assert _sha256(path) == _sha256(v1 / path.name), path.name
    model_files = {p.name for p in v1.iterdir() if p.is_file() and p.name != "manifest.json"}
    assert {p.name for p in (tmp_path / "reverted").iterdir()} == model_files


# ---- bad input --------------------------------------------------------------------------------


def _write_history(folder: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    (folder / "edit").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / HISTORY), metadata=metadata)


GOOD_EDITS = json.dumps([{"method": "rome", "layers": [0], "requests": [EARLIER]}])
KEYS = {"layer0.keys": torch.zeros(128, 1), "layer0.requests": torch.tensor([0])}


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda f: (f / HISTORY).write_bytes(b"not safetensors"), "unreadable"),
        (
            lambda f: _write_history(f, KEYS, {"format": "other/1", "edits": GOOD_EDITS}),
            "format 'other/1'",
        ),
        (
            lambda f: _write_history(
                f, KEYS, {"format": "weightsmith.edit_history/1", "edits": "[{"}
            ),
            "'edits' metadata is not JSON",
        ),
        (
            lambda f: _write_history(
                f,
                KEYS,
                {
                    "format": "weightsmith.edit_history/1",
                    "edits": json.dumps([{"method": "rome", "requests": [{"prompt": "x"}]}]),
                },
            ),
            "edits[0].requests[0] is not an edit request",
        ),
        (
            lambda f: _write_history(
                f,
                {"layer0.keys": torch.zeros(128, 1), "layer0.requests": torch.tensor([3])},
                {"format": "weightsmith.edit_history/1", "edits": GOOD_EDITS},
            ),
            "layer0.requests names requests outside 0–0",
        ),
        (
            lambda f: _write_history(
                f,
                {"layer0.keys": torch.zeros(64, 1), "layer0.requests": torch.tensor([0])},
                {"format": "weightsmith.edit_history/1", "edits": GOOD_EDITS},
            ),
            "keys at layer 0 are 64-wide, the model's 128",
        ),
        (
            lambda f: _write_history(
                f,
                {"layer9.keys": torch.zeros(128, 1), "layer9.requests": torch.tensor([0])},
                {"format": "weightsmith.edit_history/1", "edits": GOOD_EDITS},
            ),
            "keys at layer 9; the model has 3 layers",
        ),
        (
            lambda f: _write_history(
                f,
                {"weights": torch.zeros(2)},
                {"format": "weightsmith.edit_history/1", "edits": GOOD_EDITS},
            ),
            "unexpected tensor 'weights'",
        ),
    ],
)
def test_a_malformed_or_foreign_history_is_an_input_error_naming_the_file(
    parent, corpus, cache, tmp_path, write, message
):
    model = tmp_path / "model"
    shutil.copytree(parent, model)
    (model / "edit").mkdir()
    write(model)
    seen: list[str] = []

    with pytest.raises(InputError) as e:
        run_edit(
            _recipe(model, corpus, "alphaedit", [SECOND]),
            tmp_path / "out",
            cache=cache,
            progress=seen.append,
        )

    assert e.value.file == HISTORY and e.value.model == str(model)
    assert message in str(e.value)
    assert seen == ["load"] and not (tmp_path / "out").exists()


def test_a_threshold_below_every_eigenvalue_is_an_input_error_naming_the_field(
    parent, corpus, cache, tmp_path
):
    recipe = _recipe(parent, corpus, "alphaedit", [SECOND], nullspace_threshold=1e-12)

    with pytest.raises(InputError) as e:
        run_edit(recipe, tmp_path / "out", cache=cache)

    assert e.value.field == "hyperparameters.nullspace_threshold"
    assert "no eigenvalue of the keys' covariance is below 1e-12" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_settings_carry_the_recipes_alphaedit_hyperparameters(parent, corpus):
    from workers.edit.engine import load_model
    from workers.edit.methods import edit_method
    from workers.sources import SourceSettings, resolve_reference

    recipe = _recipe(parent, corpus, "alphaedit", [SECOND])
    target = load_model(resolve_reference(recipe.model, SourceSettings()), "tiny")
    s = EditSettings.from_recipe(recipe, target, edit_method("alphaedit"))
    assert dataclasses.astuple(s)[-2:] == (THRESHOLD, L2)
