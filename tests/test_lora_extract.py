"""LoRA extraction (``kind: extract_lora``): a fine-tune as a PEFT adapter of its base.

Expectations are independent of the engine: the ΔW each fine-tune was built with
(tests/support/lora_extract.py), a float64 SVD of it for truncations, hand-made spectra for
``energy``, PEFT's own ``PeftModel.from_pretrained`` for loading, and the fine-tune itself for
logits and merged weights.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from schemas.lora_recipe import ExtractLoraRecipe, parse_extract_lora_recipe
from schemas.recipe import RecipeError
from testbed.tiny_models import build_llama_base
from tests.support.lora_extract import (
    WEIGHTS,
    adapter_products,
    build_low_rank_finetune,
    is_decoder_linear,
    low_rank,
    module_of,
    spectrum,
    write_recipe,
)
from tests.support.merge_cases import engine, load_output
from workers.errors import CancelledError, InputError
from workers.extract import run_extract_lora
from workers.merge.progress import Progress
from workers.sources import SourceSettings

REPO = Path(__file__).resolve().parents[1]
RANK = 3
LOCAL = SourceSettings(allow_local=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama_base(tmp_path_factory.mktemp("extract") / "base", seed=21)


def exact_rank(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor | None:
    return low_rank(shape, RANK, 0.02, gen) if is_decoder_linear(name) else None


@pytest.fixture(scope="module")
def exact(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A fine-tune = base + an exact rank-3 ΔW in every decoder linear layer, with its final
    norm, embeddings and lm_head changed too."""
    ft = tmp_path_factory.mktemp("extract") / "ft"
    extra = {
        "model.norm.weight": lambda w: w * 1.1,
        "model.embed_tokens.weight": lambda w: w + 0.01,
        "lm_head.weight": lambda w: w * 0.9,
    }
    return ft, build_low_rank_finetune(base, ft, exact_rank, seed=3, extra=extra)


def extract(base: Path, model: Path, out: Path, **fields: Any) -> Any:
    recipe = parse_extract_lora_recipe({"base": str(base), "model": str(model), **fields})
    return run_extract_lora(recipe, out, sources=LOCAL)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((x - y).double()) / torch.linalg.vector_norm(y.double()))


def test_an_exact_rank_finetune_is_recovered_to_float32_rounding(
    base: Path, exact: tuple[Path, dict], tmp_path: Path
) -> None:
    ft, deltas = exact
    result = extract(base, ft, tmp_path / "lora", rank=RANK)
    products = adapter_products(result.out_dir)
    assert set(products) == {module_of(n) for n in deltas}
    for name, delta in deltas.items():
        assert rel(products[module_of(name)], delta) < 1e-5, name
        m = result.metrics["modules"][module_of(name)]
        assert m["rank"] == RANK and m["relative_error"] < 1e-5 and m["kept_energy"] > 1 - 1e-5
    config = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == RANK and config["rank_pattern"] == {}
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # changed outside the decoder layers: saved whole, as mergekit-extract-lora does
    assert config["modules_to_save"] == ["lm_head", "model.embed_tokens", "model.norm"]
    saved = load_file(str(result.out_dir / "adapter_model.safetensors"))
    ft_tensors = load_file(str(ft / WEIGHTS))
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(saved[f"base_model.model.{name}"], ft_tensors[name])
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["kind"] == "extract_lora"
    assert [p["role"] for p in manifest["parents"]] == ["base", "model"]
    assert {f["path"] for f in manifest["files"]} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    }


def test_the_randomized_svd_recovers_an_exact_rank_and_repeats_with_its_seed(
    base: Path, exact: tuple[Path, dict], tmp_path: Path
) -> None:
    ft, deltas = exact
    one = extract(base, ft, tmp_path / "a", rank=RANK, svd="randomized", seed=7)
    two = extract(base, ft, tmp_path / "b", rank=RANK, svd="randomized", seed=7)
    products = adapter_products(one.out_dir)
    for name, delta in deltas.items():
        assert rel(products[module_of(name)], delta) < 1e-5, name
        assert one.metrics["modules"][module_of(name)]["svd"] == "randomized"
    weights = "adapter_model.safetensors"
    assert (one.out_dir / weights).read_bytes() == (two.out_dir / weights).read_bytes()


def test_peft_loads_the_adapter_onto_the_base_and_reproduces_the_finetunes_logits(
    base: Path, exact: tuple[Path, dict], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ft, _ = exact
    result = extract(base, ft, tmp_path / "lora", rank=RANK)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base)), str(result.out_dir)
    ).eval()
    tuned = AutoModelForCausalLM.from_pretrained(str(ft)).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    ids = torch.randint(4, 250, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, before = model(ids).logits, tuned(ids).logits, plain(ids).logits
    assert (want - before).abs().max() > 1e-2  # the fine-tune does differ
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_a_truncated_adapter_is_the_best_rank_k_approximation_and_reports_its_error(
    base: Path, tmp_path: Path
) -> None:
    """A full-rank ΔW cut to rank 2: B·A is the float64 SVD's truncation (Eckart–Young), the
    reported error is ‖ΔW − ΔW_k‖/‖ΔW‖, and PEFT's merged weights are base + ΔW_k."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def full(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor | None:
        return 0.01 * torch.randn(*shape, generator=gen) if is_decoder_linear(name) else None

    deltas = build_low_rank_finetune(base, tmp_path / "ft", full, seed=4)
    result = extract(base, tmp_path / "ft", tmp_path / "lora", rank=2)
    products = adapter_products(result.out_dir)
    expected = {}
    for name, delta in deltas.items():
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        expected[name] = best
        assert rel(products[module_of(name)], best.float()) < 1e-4, name
        want_err = float(torch.sqrt((s[2:] ** 2).sum()) / torch.sqrt((s**2).sum()))
        got = result.metrics["modules"][module_of(name)]
        assert got["relative_error"] == pytest.approx(want_err, rel=1e-4)
        assert got["kept_energy"] == pytest.approx(1 - want_err**2, rel=1e-4)
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base)), str(result.out_dir)
    ).merge_and_unload()
    state = merged.state_dict()
    base_tensors = load_file(str(base / WEIGHTS))
    for name, best in expected.items():
        want = base_tensors[name].double() + best
        assert torch.allclose(state[name].double(), want, atol=1e-6), name


def test_energy_keeps_the_fewest_singular_values_holding_that_fraction(
    base: Path, tmp_path: Path
) -> None:
    """σ² = 16, 4, 1, 0.25 (total 21.25): 90 % needs 2 (20/21.25 = 0.941), 95 % needs 3;
    a flat spectrum of four 1s needs 4 for 90 %; max_rank caps it."""
    steep, flat = [4.0, 2.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0]

    def hand_made(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor | None:
        if not is_decoder_linear(name):
            return None
        if name.endswith("q_proj.weight"):
            return spectrum(shape, steep, gen) * 0.01
        if name.endswith("v_proj.weight"):
            return spectrum(shape, flat, gen) * 0.01
        return None

    build_low_rank_finetune(base, tmp_path / "ft", hand_made, seed=5)
    for energy, max_rank, q_rank, v_rank in ((0.9, None, 2, 4), (0.95, None, 3, 4), (0.9, 3, 2, 3)):
        out = tmp_path / f"lora-{energy}-{max_rank}"
        extra = {"max_rank": max_rank} if max_rank else {}
        result = extract(base, tmp_path / "ft", out, energy=energy, **extra)
        ranks = {m: v["rank"] for m, v in result.metrics["modules"].items()}
        assert {m.rsplit(".", 1)[-1] for m in ranks} == {"q_proj", "v_proj"}
        for module, rank in ranks.items():
            assert rank == (q_rank if module.endswith("q_proj") else v_rank), (energy, module)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == v_rank
        assert config["rank_pattern"] == {m: q_rank for m in ranks if m.endswith("q_proj")}
        assert config["alpha_pattern"] == config["rank_pattern"]  # scale 1 everywhere
        kept = result.metrics["modules"]["model.layers.0.self_attn.q_proj"]["kept_energy"]
        assert kept == pytest.approx(sum(s * s for s in steep[:q_rank]) / 21.25, rel=1e-5)


def test_a_rank_above_a_matrix_size_is_clamped_per_module(base: Path, tmp_path: Path) -> None:
    """k_proj is 32 × 64 in the tiny Llama: rank 48 keeps 32 there (in rank_pattern)."""
    build_low_rank_finetune(base, tmp_path / "ft", exact_rank, seed=6)
    result = extract(base, tmp_path / "ft", tmp_path / "lora", rank=48)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 48
    clamped = {m: r for m, r in config["rank_pattern"].items()}
    assert clamped and all(r == 32 for r in clamped.values())
    assert {m.rsplit(".", 1)[-1] for m in clamped} == {"k_proj", "v_proj"}
    assert result.metrics["summary"]["max_relative_error"] < 1e-5


def test_the_adapter_is_a_base_plus_adapter_input_of_a_merge(
    base: Path, exact: tuple[Path, dict], tmp_path: Path
) -> None:
    ft, _ = exact
    extract(base, ft, tmp_path / "lora", rank=RANK)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": f"{base}+{tmp_path / 'lora'}", "parameters": {"weight": 1.0}}],
    }
    engine(recipe, tmp_path / "merged")
    got, want = load_output(tmp_path / "merged"), load_file(str(ft / WEIGHTS))
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.allclose(got[name], w, atol=1e-6, rtol=0), name


def test_target_modules_choose_what_is_decomposed(
    base: Path, exact: tuple[Path, dict], tmp_path: Path
) -> None:
    ft, _ = exact
    result = extract(
        base, ft, tmp_path / "lora", rank=RANK, target_modules=["q_proj", "mlp.down_proj"]
    )
    assert {m.rsplit(".", 1)[-1] for m in result.metrics["modules"]} == {"q_proj", "down_proj"}
    # the other changed projections are not targets: saved whole in modules_to_save
    assert "model.layers.0.self_attn.k_proj" in result.metrics["modules_to_save"]
    off = extract(
        base, ft, tmp_path / "off", rank=RANK, target_modules=["q_proj"], save_changed=False
    )
    assert off.metrics["modules_to_save"] == []
    missed = {c["tensor"] for c in off.metrics["not_captured"]}
    assert "model.embed_tokens.weight" in missed and "model.layers.0.mlp.up_proj.weight" in missed


def test_progress_counts_every_tensor_and_cancel_leaves_nothing(
    base: Path, exact: tuple[Path, dict], tmp_path: Path
) -> None:
    ft, _ = exact
    seen: list[Progress] = []
    recipe = parse_extract_lora_recipe({"base": str(base), "model": str(ft), "rank": 2})
    run_extract_lora(recipe, tmp_path / "lora", sources=LOCAL, progress=seen.append)
    steps = [p for p in seen if p.phase == "extract"]
    total = len(load_file(str(base / WEIGHTS)))
    assert [p.tensors_done for p in steps] == list(range(1, total + 1))
    assert all(p.tensors_total == total for p in steps) and seen[-1].phase == "publish"

    calls = iter(range(1000))
    with pytest.raises(CancelledError):
        run_extract_lora(
            recipe, tmp_path / "cancelled", sources=LOCAL, cancelled=lambda: next(calls) >= 5
        )
    assert not (tmp_path / "cancelled").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cancelled")]


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({}, "rank: give either rank"),
        ({"rank": 4, "energy": 0.9}, "rank: give either rank"),
        ({"rank": 4, "max_rank": 8}, "max_rank: caps the rank chosen by energy"),
        ({"energy": 0}, "energy: Input should be greater than 0"),
        ({"energy": 1.5}, "energy: Input should be less than or equal to 1"),
        ({"rank": 0}, "rank: Input should be greater than or equal to 1"),
        ({"energy": 0.9, "svd": "randomized"}, "svd: randomized computes the leading"),
        ({"rank": 4, "target_modules": ["q proj"]}, "target_modules: [0]: 'q proj' is not"),
        ({"rank": 4, "target_modules": []}, "target_modules: an empty list targets nothing"),
        ({"rank": 4, "svd": "fast"}, "svd: Input should be 'auto', 'exact' or 'randomized'"),
        ({"rank": 4, "ranks": 3}, "ranks: unknown field"),
    ],
)
def test_bad_recipes_are_refused_naming_the_field(fields: dict, words: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_extract_lora_recipe({"base": "org/base", "model": "org/ft", **fields})
    assert words in str(info.value)


def test_the_model_must_not_be_the_base() -> None:
    with pytest.raises(RecipeError, match="model: org/base is the base itself"):
        parse_extract_lora_recipe({"base": "org/base", "model": "org/base", "rank": 2})


def _broken_copy(base: Path, target: Path, change: Any) -> Path:
    import shutil

    shutil.copytree(base, target)
    tensors = load_file(str(base / WEIGHTS))
    change(tensors)
    save_file(tensors, str(target / WEIGHTS), metadata={"format": "pt"})
    return target


def test_a_shape_mismatch_names_the_model_and_tensor(base: Path, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.up_proj.weight"

    def change(t: dict) -> None:
        t[name] = torch.zeros(t[name].shape[0], 32)

    ft = _broken_copy(base, tmp_path / "ft", change)
    with pytest.raises(InputError) as info:
        extract(base, ft, tmp_path / "out", rank=2)
    e = info.value
    assert (e.field, e.model, e.tensor) == ("model", str(ft), name)
    assert "differs from the base's (128, 64)" in e.message
    assert not (tmp_path / "out").exists()


def test_a_resized_vocabulary_is_refused_with_what_to_do(base: Path, tmp_path: Path) -> None:
    def change(t: dict) -> None:
        t["model.embed_tokens.weight"] = torch.zeros(300, 64)

    ft = _broken_copy(base, tmp_path / "ft", change)
    with pytest.raises(InputError, match="resized the vocabulary") as info:
        extract(base, ft, tmp_path / "out", rank=2)
    assert info.value.tensor == "model.embed_tokens.weight"


def test_missing_and_extra_tensors_are_named(base: Path, tmp_path: Path) -> None:
    gone = "model.layers.2.self_attn.o_proj.weight"
    ft = _broken_copy(base, tmp_path / "ft", lambda t: t.pop(gone))
    with pytest.raises(InputError, match="the fine-tune lacks 1 tensor") as info:
        extract(base, ft, tmp_path / "out", rank=2)
    assert (info.value.field, info.value.tensor) == ("model", gone)
    with pytest.raises(InputError, match="the fine-tune has 1 tensor") as info:
        extract(ft, base, tmp_path / "out", rank=2)
    assert info.value.tensor == gone


def test_target_modules_that_match_nothing_or_an_embedding_are_refused(
    base: Path, exact: tuple[Path, dict], tmp_path: Path
) -> None:
    ft, _ = exact
    with pytest.raises(InputError, match="'qproj' matches no module") as info:
        extract(base, ft, tmp_path / "out", rank=2, target_modules=["q_proj", "qproj"])
    assert info.value.field == "target_modules[1]"
    with pytest.raises(InputError, match="embeddings are not decomposed") as info:
        extract(base, ft, tmp_path / "out", rank=2, target_modules=["embed_tokens"])
    assert info.value.field == "target_modules[0]"


def test_a_model_equal_to_its_base_has_no_adapter(base: Path, tmp_path: Path) -> None:
    import shutil

    same = Path(shutil.copytree(base, tmp_path / "same"))
    with pytest.raises(InputError, match="does not differ from the base"):
        extract(base, same, tmp_path / "out", rank=2)
    assert not (tmp_path / "out").exists()


# ---- the command line ------------------------------------------------------------------------


def test_cli_extract_lora_writes_an_adapter_and_names_a_bad_field(
    base: Path, exact: tuple[Path, dict], tmp_path: Path
) -> None:
    ft, _ = exact
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    recipe = write_recipe(tmp_path, {"base": str(base), "model": str(ft), "rank": RANK})
    run = subprocess.run(
        [sys.executable, "-m", "weightsmith", "extract-lora", str(recipe), "--out", "lora"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert "extracted a LoRA adapter" in run.stdout and "28 modules, r 3" in run.stdout
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()

    bad = write_recipe(tmp_path, {"base": str(base), "model": str(ft), "energy": 2}, "bad.yaml")
    run = subprocess.run(
        [sys.executable, "-m", "weightsmith", "extract-lora", str(bad), "--out", "x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 2 and "energy: Input should be less than or equal to 1" in run.stderr
    assert not (tmp_path / "x").exists()


def test_the_recipe_model_is_the_one_source_of_truth_for_its_schema() -> None:
    schema = ExtractLoraRecipe.model_json_schema()
    assert {"base", "model", "rank", "energy", "max_rank", "target_modules"} <= set(
        schema["properties"]
    )
    assert math.isclose(schema["properties"]["energy"]["anyOf"][0]["exclusiveMinimum"], 0)
