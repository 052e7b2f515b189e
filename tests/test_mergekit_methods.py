"""The methods taken from mergekit 0.1.5 (nearswap, nuslerp, multislerp, karcher, sce,
arcee_fusion, ram, ramplus_tl): their rules refused clearly, and results computed by hand
on tiny hand-made checkpoints (tests/support/handmade.py). The engine-vs-reference cases of
every method are in tests/test_merge_methods.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.recipe import RecipeError, parse_recipe
from tests.support.handmade import (
    DOWN0,
    EMBED,
    HEAD,
    base_tensors,
    refused,
    shifted,
    write_model,
)
from tests.support.merge_cases import load_output
from workers.merge.engine import run_merge

BASE = "./models/base"
FT1 = "./models/ft1"  # base + 0.5 everywhere (the zoo fixture)
FT2 = "./models/ft2"  # base + 1.5 everywhere


def _recipe(method: str, *models: str, base: bool = True, **parameters: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"merge_method": method, "models": [{"model": m} for m in models]}
    if base:
        r["base_model"] = BASE
    if parameters:
        r["parameters"] = parameters
    return r


def _merge(root: Path, recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    run_merge(parse_recipe(recipe), root / "out", base_dir=root)
    return load_output(root / "out")


# -- rules, refused at the field ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "expect"),
    [
        (_recipe("nearswap", FT1), ("parameters.t", "nearswap needs the distance t")),
        (_recipe("nuslerp", FT1), ("models", "'nuslerp' needs exactly 2 model(s)")),
        (_recipe("nuslerp", FT1, FT2, BASE, base=False), ("models", "exactly 2")),
        (_recipe("arcee_fusion", FT1, FT2), ("models", "'arcee_fusion' needs exactly 1")),
        (_recipe("sce", FT1, FT2, base=False), ("base_model", "needs a base model")),
        (_recipe("ram", FT1, base=False), ("base_model", "needs a base model")),
        (_recipe("nearswap", FT1, base=False, t=0.1), ("base_model", "needs a base model")),
        (_recipe("karcher", FT1, FT2, max_iter=2.5), ("parameters.max_iter", "whole number")),
        (_recipe("karcher", FT1, FT2, max_iter=-1), ("parameters.max_iter", "≥ 0")),
        (
            _recipe("karcher", FT1, FT2, max_iter=[1, 5]),
            ("parameters.max_iter", "single value for the whole model"),
        ),
        (_recipe("sce", FT1, FT2, select_topk=1.5), ("parameters.select_topk", "≤ 1")),
        (_recipe("multislerp", FT1, FT2, eps=-1e-8), ("parameters.eps", "≥ 0")),
        (_recipe("ramplus_tl", FT1, FT2, alpha=-0.1), ("parameters.alpha", "≥ 0")),
        (_recipe("ram", FT1, FT2, weight=0.5), ("parameters.weight", "valid: epsilon")),
    ],
    ids=lambda v: v["merge_method"] if isinstance(v, dict) else None,
)
def test_recipes_breaking_a_method_rule_are_refused_at_the_field(
    recipe: dict[str, Any], expect: tuple[str, ...], zoo: Path, capsys
) -> None:
    refused(zoo, recipe, error=RecipeError, expect=expect, capsys=capsys)


def test_multislerp_weights_summing_to_zero_are_refused_naming_the_weights(
    zoo: Path, capsys
) -> None:
    recipe = _recipe("multislerp", FT1, FT2)
    recipe["models"][0]["parameters"] = {"weight": 1}
    recipe["models"][1]["parameters"] = {"weight": -1}
    refused(
        zoo,
        recipe,
        field="parameters.weight",
        tensor=HEAD,  # the first tensor written
        expect=("sum to 0", "normalize_weights"),
        capsys=capsys,
    )


# -- results computed by hand ---------------------------------------------------------------------


def test_nearswap_moves_by_t_over_the_distance(zoo: Path) -> None:
    # |θ1 − θ0| = 0.5 everywhere: w = 0.125 / 0.5 = 0.25, out = θ0 + 0.25·0.5
    out = _merge(zoo, _recipe("nearswap", FT1, t=0.125))
    for name, t in base_tensors().items():
        assert torch.equal(out[name], t + 0.125), name


def test_nearswap_takes_the_other_value_where_it_is_within_t(zoo: Path) -> None:
    out = _merge(zoo, _recipe("nearswap", FT1, t=0.5))
    for name, t in shifted(0.5).items():
        assert torch.equal(out[name], t), name


def test_ram_averages_the_changes_several_models_made(zoo: Path) -> None:
    # both models changed every element: (0.5 + 1.5) / 2
    out = _merge(zoo, _recipe("ram", FT1, FT2))
    for name, t in base_tensors().items():
        assert torch.equal(out[name], t + 1.0), name


def test_ramplus_tl_amplifies_the_changes_only_one_model_made(tmp_path: Path) -> None:
    base = base_tensors()
    write_model(tmp_path / "models" / "base", base)
    write_model(tmp_path / "models" / "ft1", shifted(0.5))
    ft2 = dict(base)
    ft2[DOWN0] = base[DOWN0].clone()
    ft2[DOWN0][0] += 1.5  # model 2 changes only row 0 of DOWN0 (16 of 128 elements)
    write_model(tmp_path / "models" / "ft2", ft2)
    out = _merge(tmp_path, _recipe("ramplus_tl", FT1, FT2, r=0.7, alpha=0.2))
    # DOWN0: model 1 shares 16 changes and alone made 112: ρ = 16/112 = 1/7 < α,
    # λ1 = 1 + 0.7/7 = 1.1; shared elements take the mean (0.5 + 1.5)/2 = 1
    expected = base[DOWN0] + 0.5 * 1.1
    expected[0] = base[DOWN0][0] + 1.0
    torch.testing.assert_close(out[DOWN0], expected, rtol=0, atol=1e-6)
    # elsewhere model 1 shares nothing: ρ = 0, λ1 = 1
    for name in (EMBED, HEAD):
        torch.testing.assert_close(out[name], base[name] + 0.5, rtol=0, atol=1e-6)


def test_nuslerp_puts_a_zero_task_vector_at_a_right_angle(zoo: Path) -> None:
    # τ1 = 0 normalises to 0, so cos Ω = 0 and Ω = π/2: with t = w2/(w1 + w2) = 0.5,
    # out = θ0 + (sin(π/4)·τ1 + sin(π/4)·τ2) / sin(π/2) = θ0 + 1.5/√2 (the lerp would add 0.75)
    write_model(zoo / "models" / "same", base_tensors())
    out = _merge(zoo, _recipe("nuslerp", "./models/same", FT2))
    for name, t in base_tensors().items():
        torch.testing.assert_close(out[name], t + 1.5 / math.sqrt(2), rtol=0, atol=1e-6)


def test_karcher_of_two_orthogonal_models_is_their_geodesic_midpoint(tmp_path: Path) -> None:
    # per tensor, A = 3·e_first and B = 1·e_last: the mean direction is (e_first + e_last)/√2
    # and the norm the mean of the norms, 2: out = √2 at both ends (linear would give 1.5, 0.5)
    a, b = {}, {}
    for name, t in base_tensors().items():
        a[name] = torch.zeros_like(t)
        a[name].view(-1)[0] = 3.0
        b[name] = torch.zeros_like(t)
        b[name].view(-1)[-1] = 1.0
    write_model(tmp_path / "models" / "a", a)
    write_model(tmp_path / "models" / "b", b)
    out = _merge(tmp_path, _recipe("karcher", "./models/a", "./models/b", base=False))
    for name, t in out.items():
        expected = torch.zeros_like(t)
        expected.view(-1)[0] = expected.view(-1)[-1] = math.sqrt(2)
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-6, msg=name)


def test_multislerp_of_two_orthogonal_models_keeps_the_mean_norm(tmp_path: Path) -> None:
    # unit directions e_first and e_last, norms 2 and 4, equal weights: the mean direction is
    # (e_first + e_last)/√2, the tangent parts cancel, the norm is the mean norm 3
    a, b = {}, {}
    for name, t in base_tensors().items():
        a[name] = torch.zeros_like(t)
        a[name].view(-1)[0] = 2.0
        b[name] = torch.zeros_like(t)
        b[name].view(-1)[-1] = 4.0
    write_model(tmp_path / "models" / "a", a)
    write_model(tmp_path / "models" / "b", b)
    out = _merge(tmp_path, _recipe("multislerp", "./models/a", "./models/b", base=False))
    for name, t in out.items():
        expected = torch.zeros_like(t)
        expected.view(-1)[0] = expected.view(-1)[-1] = 3 / math.sqrt(2)
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-6, msg=name)


def test_karcher_of_three_models_is_the_mean_angle_not_the_normalised_sum(
    tmp_path: Path,
) -> None:
    # directions e_first, e_first, e_last (norms 2, 1, 3), equal weights: on the circle they
    # span, the Karcher mean is at the mean angle (0 + 0 + 90°)/3 = 30°, not at the normalised
    # Euclidean mean's atan(1/2) ≈ 26.6°; the norm is the mean norm (2 + 1 + 3)/3 = 2
    norms_at = {"a": (2.0, 0), "b": (1.0, 0), "c": (3.0, -1)}
    for model, (norm, at) in norms_at.items():
        tensors = {}
        for name, t in base_tensors().items():
            tensors[name] = torch.zeros_like(t)
            tensors[name].view(-1)[at] = norm
        write_model(tmp_path / "models" / model, tensors)
    recipe = _recipe("karcher", *(f"./models/{m}" for m in norms_at), base=False)
    out = _merge(tmp_path, recipe)
    for name, t in out.items():
        expected = torch.zeros_like(t)
        expected.view(-1)[0] = 2 * math.cos(math.pi / 6)
        expected.view(-1)[-1] = 2 * math.sin(math.pi / 6)
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-5, msg=name)
