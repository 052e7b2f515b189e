"""Checks of the reference merge itself, against values computed by hand.

Every example is a tiny checkpoint (2×3 tensors, a config.json) whose expected output is
worked out in the comments, so the reference that the engine tests trust is itself tested
against something independent of any code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merging import randomness
from tests.support.reference_merge import (
    breadcrumbs_mask,
    della_probabilities,
    evaluate,
    gradient_t,
    layer_of,
    load_checkpoint,
    reference_merge,
    tensor_seed,
    topk_mask,
    uniform,
)

R2 = math.sqrt(0.5)


def close(actual: torch.Tensor, expected: object, *, atol: float = 1e-6) -> None:
    exp = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), exp, rtol=1e-6, atol=atol)


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def ckpt(root: Path, name: str, tensors: dict[str, torch.Tensor], config: dict | None = None):
    d = root / name
    d.mkdir(parents=True)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    (d / "config.json").write_text(json.dumps(config or {"num_hidden_layers": 3}))
    return str(d)


W = "model.layers.0.mlp.w"  # the one tensor of the single-tensor examples (layer 0: t = 0)


# ---------------------------------------------------------------------------------------------
# Protocol helpers


def test_rng_is_the_documented_protocol():
    for seed, idx, name in [(0, 0, "a"), (123456789, 2, "model.layers.3.mlp.up_proj.weight")]:
        assert tensor_seed(seed, idx, name) == randomness.tensor_seed(seed, idx, name)
        assert 0 <= tensor_seed(seed, idx, name) < 2**63
        shape = torch.Size([7, 5])
        u = uniform(seed, idx, name, shape)
        assert u.dtype == torch.float32 and u.shape == shape
        assert torch.equal(u, randomness.uniform(seed, idx, name, shape))
    assert not torch.equal(uniform(1, 0, "a", (64,)), uniform(1, 1, "a", (64,)))
    assert not torch.equal(uniform(1, 0, "a", (64,)), uniform(1, 0, "b", (64,)))


def test_layer_of_and_gradient_position():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("transformer.h.2.attn.c_attn.weight") == 2
    for outside in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                    "transformer.wte.weight", "transformer.ln_f.bias"):  # fmt: skip
        assert layer_of(outside) is None
        assert gradient_t(outside, 4) == 0.0
    assert gradient_t("model.layers.0.x", 3) == 0.0
    assert gradient_t("model.layers.1.x", 3) == 0.5
    assert gradient_t("model.layers.2.x", 3) == 1.0
    assert gradient_t("model.layers.0.x", 1) == 1.0  # one layer: t = 1


def test_evaluate_gradients_and_filters():
    assert evaluate(0.3, "x", 0.7) == 0.3
    assert evaluate([0.0, 1.0], "x", 0.5) == pytest.approx(0.5)
    # [1, 0, 2, 4] at t = 0.5: position 0.5·3 = 1.5 → halfway between 0 and 2 = 1
    assert evaluate([1.0, 0.0, 2.0, 4.0], "x", 0.5) == pytest.approx(1.0)
    assert evaluate([1.0, 0.0, 2.0, 4.0], "x", 1.0) == pytest.approx(4.0)
    # t = 1/3: position 1 → exactly the second value
    assert evaluate([1.0, 0.0, 2.0, 4.0], "x", 1 / 3) == pytest.approx(0.0)
    flt = [{"filter": "mlp", "value": 2.0}, {"filter": "layers.1", "value": 3.0}]
    assert evaluate(flt, "model.layers.1.mlp.w", 0.5) == 2.0  # first match wins
    assert evaluate(flt, "model.layers.1.attn.w", 0.5) == 3.0
    assert evaluate(flt, "model.embed.weight", 0.0) is None  # no match: next scope decides
    assert evaluate([{"filter": "*", "value": 5}], "anything", 0.0) == 5
    assert evaluate([{"value": 5}], "anything", 0.0) == 5
    assert evaluate({"filter": "mlp", "value": [0.0, 1.0]}, "model.layers.1.mlp.w", 0.5) == 0.5


# ---------------------------------------------------------------------------------------------
# Parameter resolution through whole merges (task_arithmetic: base 0, τ = θ, out = Σ w·θ)

NAMES = ["model.embed.weight", "model.layers.0.attn.w", "model.layers.0.mlp.w",
         "model.layers.1.attn.w", "model.layers.1.mlp.w", "model.layers.2.mlp.w"]  # fmt: skip


def _ones_family(tmp_path: Path, config: dict | None = None, names=NAMES):
    z = {n: torch.zeros(2, 3) for n in names}
    base = ckpt(tmp_path, "base", z, config)
    ft1 = ckpt(tmp_path, "ft1", {n: torch.ones(2, 3) for n in names}, config)
    ft2 = ckpt(tmp_path, "ft2", {n: 2 * torch.ones(2, 3) for n in names}, config)
    return base, ft1, ft2


def _scale_of(out: dict[str, torch.Tensor], name: str) -> float:
    v = out[name]
    assert torch.allclose(v, v.flatten()[0].expand_as(v))
    return float(v.flatten()[0])


def test_gradient_interpolation_three_layers(tmp_path):
    base, ft1, _ = _ones_family(tmp_path)
    recipe = {"merge_method": "task_arithmetic", "base_model": base,
              "models": [{"model": ft1, "parameters": {"weight": [0.0, 1.0]}}]}  # fmt: skip
    out = reference_merge(recipe)
    # t = layer/2: layer 0 → 0, layer 1 → 0.5, layer 2 → 1; the embedding (no layer) → t = 0
    expected = {"model.embed.weight": 0.0, "model.layers.0.attn.w": 0.0,
                "model.layers.0.mlp.w": 0.0, "model.layers.1.attn.w": 0.5,
                "model.layers.1.mlp.w": 0.5, "model.layers.2.mlp.w": 1.0}  # fmt: skip
    assert {n: _scale_of(out, n) for n in NAMES} == pytest.approx(expected)

    recipe["models"][0]["parameters"]["weight"] = [1.0, 0.0, 2.0, 4.0]
    out = reference_merge(recipe)
    # layer 0: t 0 → 1; layer 1: t 0.5 → position 1.5 → (0 + 2)/2 = 1; layer 2: t 1 → 4
    expected = {"model.embed.weight": 1.0, "model.layers.0.attn.w": 1.0,
                "model.layers.0.mlp.w": 1.0, "model.layers.1.attn.w": 1.0,
                "model.layers.1.mlp.w": 1.0, "model.layers.2.mlp.w": 4.0}  # fmt: skip
    assert {n: _scale_of(out, n) for n in NAMES} == pytest.approx(expected)


def test_gradient_one_layer_and_gpt2_config(tmp_path):
    names = ["model.embed.weight", "model.layers.0.mlp.w"]
    base, ft1, _ = _ones_family(tmp_path / "a", {"num_hidden_layers": 1}, names)
    out = reference_merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": ft1, "parameters": {"weight": [0.2, 0.8]}}],
        }
    )
    assert _scale_of(out, "model.layers.0.mlp.w") == pytest.approx(0.8)  # n = 1: t = 1
    assert _scale_of(out, "model.embed.weight") == pytest.approx(0.2)  # outside: t = 0

    names = ["transformer.wte.weight", "transformer.h.0.mlp.w", "transformer.h.1.mlp.w",
             "transformer.h.2.mlp.w"]  # fmt: skip
    base, ft1, _ = _ones_family(tmp_path / "b", {"n_layer": 3}, names)
    out = reference_merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"weight": [0.0, 1.0]},
            "models": [{"model": ft1}],
        }
    )
    got = [_scale_of(out, n) for n in names]
    assert got == pytest.approx([0.0, 0.0, 0.5, 1.0])


def test_filter_precedence(tmp_path):
    base, ft1, ft2 = _ones_family(tmp_path)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "parameters": {"weight": [{"filter": "attn", "value": 5.0}, {"filter": "*", "value": 7.0}]},
        "models": [
            {"model": ft1, "parameters": {"weight": [{"filter": "mlp", "value": 2.0},
                                                     {"filter": "layers.1", "value": 3.0}]}},
            {"model": ft2},
        ],
    }  # fmt: skip
    out = reference_merge(recipe)
    # ft1 (θ = 1): own list first; when none of its filters matches, the top level decides.
    # ft2 (θ = 2): top level only (attn → 5, everything else → 7).
    w1 = {
        "model.embed.weight": 7,
        "model.layers.0.attn.w": 5,
        "model.layers.0.mlp.w": 2,
        "model.layers.1.attn.w": 3,
        "model.layers.1.mlp.w": 2,
        "model.layers.2.mlp.w": 2,
    }
    w2 = {
        "model.embed.weight": 7,
        "model.layers.0.attn.w": 5,
        "model.layers.0.mlp.w": 7,
        "model.layers.1.attn.w": 5,
        "model.layers.1.mlp.w": 7,
        "model.layers.2.mlp.w": 7,
    }
    for n in NAMES:  # fmt: skip
        assert _scale_of(out, n) == pytest.approx(w1[n] * 1 + w2[n] * 2), n

    # a gradient inside a filter entry, and a scalar at model level beating the top level
    recipe["models"][0]["parameters"]["weight"] = [{"filter": "mlp", "value": [0.0, 1.0]}]
    recipe["models"][1]["parameters"] = {"weight": 0.5}
    out = reference_merge(recipe)
    mlp = {"model.layers.0.mlp.w": 0.0, "model.layers.1.mlp.w": 0.5, "model.layers.2.mlp.w": 1.0}
    for n in NAMES:
        w_ft1 = mlp.get(n, 5.0 if "attn" in n else 7.0)
        assert _scale_of(out, n) == pytest.approx(w_ft1 * 1 + 0.5 * 2), n


# ---------------------------------------------------------------------------------------------
# linear, task_arithmetic, dtypes and non-float tensors


def test_linear(tmp_path):
    a = ckpt(tmp_path, "a", {W: t([[1, 2, 3], [4, 5, 6]])})
    b = ckpt(tmp_path, "b", {W: t([[3, 2, 1], [0, 0, 0]])})
    models = [{"model": a, "parameters": {"weight": 1.0}},
              {"model": b, "parameters": {"weight": 3.0}}]  # fmt: skip
    out = reference_merge({"merge_method": "linear", "models": models})
    # (θa + 3θb)/4 = ([1,2,3]+[9,6,3])/4, ([4,5,6]+0)/4
    close(out[W], [[2.5, 2.0, 1.5], [1.0, 1.25, 1.5]])
    out = reference_merge({"merge_method": "linear", "models": models,
                           "parameters": {"normalize": False}})  # fmt: skip
    close(out[W], [[10, 8, 6], [4, 5, 6]])


def test_task_arithmetic(tmp_path):
    base = ckpt(tmp_path, "base", {W: t([[1, 1, 1], [1, 1, 1]])})
    a = ckpt(tmp_path, "a", {W: t([[2, 1, 1], [1, 1, 3]])})  # τa = [[1,0,0],[0,0,2]]
    b = ckpt(tmp_path, "b", {W: t([[1, 0, 1], [1, 1, 1]])})  # τb = [[0,-1,0],[0,0,0]]
    recipe = {"merge_method": "task_arithmetic", "base_model": base,
              "parameters": {"lambda": 0.5},
              "models": [{"model": a, "parameters": {"weight": 2.0}},
                         {"model": b, "parameters": {"weight": 1.0}}]}  # fmt: skip
    # 1 + 0.5·(2τa + τb) = 1 + 0.5·[[2,-1,0],[0,0,4]]
    close(reference_merge(recipe)[W], [[2, 0.5, 1], [1, 1, 3]])
    recipe["parameters"]["normalize"] = True  # divide 2τa + τb by 3
    close(reference_merge(recipe)[W], [[1 + 1 / 3, 1 - 1 / 6, 1], [1, 1, 1 + 2 / 3]])


def test_output_dtype_and_non_float_tensors(tmp_path):
    ids = torch.tensor([[0, 1, 2]], dtype=torch.int64)
    base = ckpt(
        tmp_path,
        "base",
        {
            W: t([[1, 1, 1], [1, 1, 1]]),
            "model.pos_ids": ids,
            "model.norm.weight": torch.ones(3, dtype=torch.bfloat16),
        },
    )
    ft = ckpt(
        tmp_path,
        "ft",
        {
            W: t([[2, 2, 2], [2, 2, 2]]),
            "model.pos_ids": ids + 5,
            "model.norm.weight": torch.full((3,), 3.0, dtype=torch.bfloat16),
        },
    )
    recipe = {"merge_method": "task_arithmetic", "base_model": base,
              "parameters": {"weight": 0.5}, "models": [{"model": ft}]}  # fmt: skip
    out = reference_merge(recipe)
    assert out[W].dtype == torch.float32 and out["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(out["model.pos_ids"], ids)  # copied from the base, not merged
    close(out["model.norm.weight"], [2.0, 2.0, 2.0])  # 1 + 0.5·(3 − 1), bf16 kept
    out = reference_merge({**recipe, "dtype": "float16"})
    assert out[W].dtype == torch.float16 and out["model.norm.weight"].dtype == torch.float16
    out = reference_merge({**recipe, "dtype": "float16", "out_dtype": "bfloat16"})
    assert out[W].dtype == torch.bfloat16 and out["model.pos_ids"].dtype == torch.int64
    close(out[W], [[1.5] * 3] * 2)


# ---------------------------------------------------------------------------------------------
# TIES

TAU1 = [[3, -1, 0], [2, -2, 1]]
TAU2 = [[-1, -2, 4], [-3, 1, 0]]
TAU3 = [[-2, 0, -1], [1, 1, -1]]


def _tv_family(tmp_path, taus, base_value=0.0, extra=None):
    base_t = torch.full((2, 3), base_value)
    base = ckpt(tmp_path, "base", {W: base_t, **(extra or {})})
    fts = [ckpt(tmp_path, f"ft{i}", {W: base_t + t(tau), **(extra or {})})
           for i, tau in enumerate(taus)]  # fmt: skip
    return base, fts


def test_ties_sign_election_with_zeros(tmp_path):
    base, fts = _tv_family(tmp_path, [TAU1, TAU2, TAU3], base_value=10.0)
    recipe = {"merge_method": "ties", "base_model": base,
              "models": [{"model": f} for f in fts]}  # fmt: skip
    # density 1: no trimming. Σ τ = [[0,-3,3],[0,0,0]] → signs [[+,-,+],[+,+,+]] (0 is +)
    # (0,0) +: only τ1's 3 agrees → 3/1           (0,1) −: -1, -2 → -3/2 (τ3's 0 never agrees)
    # (0,2) +: τ2's 4 → 4 (τ1's 0 does not count)  (1,0) +: 2, 1 → 3/2
    # (1,1) +: 1, 1 → 2/2                          (1,2) +: τ1's 1 → 1 (τ2's 0 does not count)
    close(reference_merge(recipe)[W], 10 + t([[3, -1.5, 4], [1.5, 1, 1]]))
    recipe["parameters"] = {"normalize": False}
    close(reference_merge(recipe)[W], 10 + t([[3, -3, 4], [3, 2, 1]]))
    # weights (1, 2, 1): D2 = 2τ2; Σ D = [[-1,-5,7],[-3,1,0]] → signs [[-,-,+],[-,+,+]]
    # (0,0) −: D2 -2 (w 2) + D3 -2 (w 1) → -4/3   (0,1) −: D1 -1 + D2 -4 over 1 + 2 → -5/3
    # (0,2) +: D2 8 → 8/2                          (1,0) −: D2 -6 → -6/2
    # (1,1) +: D2 2 + D3 1 over 3 → 1              (1,2) +: Σ = 0 counts +: D1 1 → 1
    recipe["parameters"] = {}
    recipe["models"][1]["parameters"] = {"weight": 2.0}
    close(reference_merge(recipe)[W], 10 + t([[-4 / 3, -5 / 3, 4], [-3, 1, 1]]))


def test_ties_trim(tmp_path):
    base, fts = _tv_family(tmp_path, [TAU1, TAU2])
    recipe = {"merge_method": "ties", "base_model": base, "parameters": {"density": 0.5},
              "models": [{"model": f} for f in fts]}  # fmt: skip
    # k = int(0.5·6) = 3. τ1 keeps 3, 2, -2 → [[3,0,0],[2,-2,0]]; τ2 keeps 4, -3, -2 →
    # [[0,-2,4],[-3,0,0]]. Σ = [[3,-2,4],[-1,-2,0]]: each entry has one agreeing model, and
    # (1,2) has none (divisor 0 → 1, mixed 0).
    close(reference_merge(recipe)[W], [[3, -2, 4], [-3, -2, 0]])
    # density 0.1 for τ2: int(0.6) = 0 but at least one entry is kept: only the 4.
    # τ2' = [[0,0,4],[0,0,0]] → Σ = [[3,0,4],[2,-2,0]] → (0,1) sign + with no agreeing model
    recipe["models"][1]["parameters"] = {"density": 0.1}
    close(reference_merge(recipe)[W], [[3, 0, 4], [2, -2, 0]])
    recipe["parameters"]["lambda"] = 0.5
    close(reference_merge(recipe)[W], [[1.5, 0, 2], [1, -1, 0]])
    assert topk_mask(t([[1, 5], [3, 2]]), 0.5).tolist() == [[False, True], [True, False]]
    # equal magnitudes at the cut: exactly k kept, the earlier (flat index) first
    assert topk_mask(t([2, -1, -2, 2]), 0.5).tolist() == [True, False, True, False]


def test_ties_rescale(tmp_path):
    base, fts = _tv_family(tmp_path, [TAU1])
    recipe = {
        "merge_method": "ties",
        "base_model": base,
        "parameters": {"density": 0.5, "rescale": True},
        "models": [{"model": fts[0]}],
    }
    # kept [[3,0,0],[2,-2,0]] (L1 7) rescaled to τ1's L1 9 → ×9/7
    close(reference_merge(recipe)[W], t([[3, 0, 0], [2, -2, 0]]) * 9 / 7)


def test_ties_global_scope(tmp_path):
    a, b = "model.layers.0.a", "model.layers.0.b"
    ids = {"model.ids": torch.tensor([1, 2, 3])}
    base = ckpt(tmp_path, "base", {a: torch.zeros(1, 2), b: torch.zeros(1, 2), **ids})
    ft = ckpt(tmp_path, "ft", {a: t([[1, 4]]), b: t([[0.5, 0.2]]), **ids})
    recipe = {"merge_method": "ties", "base_model": base, "models": [{"model": ft}],
              "parameters": {"density": 0.5, "scope": "global"}}  # fmt: skip
    # global: N = 4 float entries (the int tensor is not a parameter to rank), k = 2:
    # keep 4 and 1 → a = [1, 4], b = [0, 0]
    out = reference_merge(recipe)
    close(out[a], [[1, 4]])
    close(out[b], [[0, 0]])
    assert torch.equal(out["model.ids"], ids["model.ids"])
    # per tensor: k = 1 each → a = [0, 4], b = [0.5, 0]
    recipe["parameters"]["scope"] = "tensor"
    out = reference_merge(recipe)
    close(out[a], [[0, 4]])
    close(out[b], [[0.5, 0]])


def test_ties_global_scope_keeps_ties_at_the_kth_value(tmp_path):
    a, b = "model.layers.0.a", "model.layers.0.b"
    base = ckpt(tmp_path, "base", {a: torch.zeros(1, 2), b: torch.zeros(1, 2)})
    ft = ckpt(tmp_path, "ft", {a: t([[1, 4]]), b: t([[-1, 0.2]])})
    recipe = {"merge_method": "ties", "base_model": base, "models": [{"model": ft}],
              "parameters": {"density": 0.5, "scope": "global"}}  # fmt: skip
    # |τ| = 1 4 1 .2, k = 2: the 2nd largest value is 1 → keep |τ| ≥ 1: three entries
    out = reference_merge(recipe)
    close(out[a], [[1, 4]])
    close(out[b], [[-1, 0]])


def test_base_listed_in_models_is_the_base(tmp_path):
    base, fts = _tv_family(tmp_path, [TAU1, TAU2])
    plain = {"merge_method": "ties", "base_model": base, "parameters": {"density": 0.5},
             "models": [{"model": f} for f in fts]}  # fmt: skip
    listed = {**plain, "models": [{"model": base, "parameters": {"weight": 3.0}},
                                  *plain["models"]]}  # fmt: skip
    assert torch.equal(reference_merge(plain)[W], reference_merge(listed)[W])


# ---------------------------------------------------------------------------------------------
# DARE

DTAU = [[1, -2, 3], [-4, 5, -6]]


def test_dare(tmp_path):
    base, (ft,) = _tv_family(tmp_path, [DTAU], base_value=1.0)
    tau = t(DTAU)
    u = uniform(4, 0, W, torch.Size([2, 3]))
    keep = u < 0.5
    kept = tau * keep
    assert 0 < int(keep.sum()) < 6, "pick a seed that keeps some entries and drops some"
    recipe = {"merge_method": "dare_linear", "base_model": base, "seed": 4,
              "parameters": {"density": 0.5}, "models": [{"model": ft}]}  # fmt: skip
    # default: rescale to τ's L1 (1+2+3+4+5+6 = 21)
    close(reference_merge(recipe)[W], 1 + kept * 21 / kept.abs().sum())
    recipe["parameters"]["rescale_mode"] = "inverse_p"  # DARE paper: ÷ density
    close(reference_merge(recipe)[W], 1 + kept / 0.5)
    recipe["parameters"]["rescale"] = False
    close(reference_merge(recipe)[W], 1 + kept)
    # the seed argument overrides the recipe's
    other = uniform(6, 0, W, torch.Size([2, 3])) < 0.5
    assert not torch.equal(other, keep)
    close(reference_merge(recipe, seed=6)[W], 1 + tau * other)
    recipe["parameters"]["density"] = 1.0
    close(reference_merge(recipe)[W], 1 + tau)


def test_dare_model_index_skips_the_base(tmp_path):
    base, (f1, f2) = _tv_family(tmp_path, [DTAU, TAU1])
    recipe = {"merge_method": "dare_linear", "base_model": base, "seed": 3,
              "parameters": {"density": 0.5, "rescale": False},
              "models": [{"model": f1}, {"model": base}, {"model": f2}]}  # fmt: skip
    # indices: f1 → 0, f2 → 1 (the base, listed between them, is not counted)
    m1 = uniform(3, 0, W, torch.Size([2, 3])) < 0.5
    m2 = uniform(3, 1, W, torch.Size([2, 3])) < 0.5
    close(reference_merge(recipe)[W], t(DTAU) * m1 + t(TAU1) * m2)


def test_dare_ties(tmp_path):
    base, (f1, f2) = _tv_family(tmp_path, [DTAU, TAU2])
    recipe = {"merge_method": "dare_ties", "base_model": base, "seed": 11,
              "parameters": {"density": 0.7, "rescale": False},
              "models": [{"model": f1}, {"model": f2}]}  # fmt: skip
    k1 = t(DTAU) * (uniform(11, 0, W, torch.Size([2, 3])) < 0.7)
    k2 = t(TAU2) * (uniform(11, 1, W, torch.Size([2, 3])) < 0.7)
    s = torch.where(k1 + k2 >= 0, 1.0, -1.0)
    expected = k1 * (torch.sign(k1) == s) + k2 * (torch.sign(k2) == s)  # normalize: false
    close(reference_merge(recipe)[W], expected)


# ---------------------------------------------------------------------------------------------
# Breadcrumbs

BTAU = [[0.1, -0.5, 0.3], [0.05, -0.2, 0.4]]


def test_breadcrumbs_ranks(tmp_path):
    base, (ft,) = _tv_family(tmp_path, [BTAU])
    recipe = {"merge_method": "breadcrumbs", "base_model": base, "models": [{"model": ft}],
              "parameters": {"density": 0.5, "gamma": 0.2}}  # fmt: skip
    # |τ| ascending: .05 .1 .2 .3 .4 .5 (ranks 0..5). keep = int(3.0) = 3, top = int(1.2) = 1,
    # bottom = 6 − 3 − 1 = 2 → ranks 2, 3, 4: -0.2, 0.3, 0.4
    close(reference_merge(recipe)[W], [[0, 0, 0.3], [0, -0.2, 0.4]])
    # gamma·N = 0.6 < 1: top = 0, bottom = 3 → keep the three largest (never zero everything)
    recipe["parameters"]["gamma"] = 0.1
    close(reference_merge(recipe)[W], [[0, -0.5, 0.3], [0, 0, 0.4]])
    # defaults density 1, gamma 0.01: keep = 6, bottom = 0 → everything kept
    recipe["parameters"] = {}
    close(reference_merge(recipe)[W], BTAU)


def test_breadcrumbs_row_scope(tmp_path):
    base, (ft,) = _tv_family(tmp_path, [BTAU])
    recipe = {"merge_method": "breadcrumbs", "base_model": base, "models": [{"model": ft}],
              "parameters": {"density": 0.7, "gamma": 0.34, "scope": "row"}}  # fmt: skip
    # per row of 3: keep = int(2.1) = 2, top = int(1.02) = 1, bottom = 0 → the 2 smallest
    # row 0: .1, .3 kept (.5 dropped); row 1: .05, .2 kept (.4 dropped)
    close(reference_merge(recipe)[W], [[0.1, 0, 0.3], [0.05, -0.2, 0]])
    # flattened instead: keep = int(4.2) = 4, top = int(2.04) = 2, bottom = 0 → .05 .1 .2 .3
    recipe["parameters"]["scope"] = "tensor"
    close(reference_merge(recipe)[W], [[0.1, 0, 0.3], [0.05, -0.2, 0]])
    m = breadcrumbs_mask(t([[1, 2, 3, 4], [8, 7, 6, 5]]), 0.5, 0.25, row=True)
    assert m.tolist() == [[False, True, True, False], [False, True, True, False]]
    # equal magnitudes: stable ascending ranks (earlier = lower rank); keep ranks 1, 2
    assert breadcrumbs_mask(t([1, -1, 1, 1]), 0.5, 0.25, row=False).tolist() == [
        False, True, True, False]  # fmt: skip


def test_breadcrumbs_ties(tmp_path):
    tau2 = [[-0.2, 0.1, 0.1], [0.1, 0.1, 0.1]]
    base, fts = _tv_family(tmp_path, [BTAU, tau2])
    recipe = {"merge_method": "breadcrumbs_ties", "base_model": base,
              "models": [{"model": f} for f in fts]}  # fmt: skip
    # defaults keep everything; Σ = [[-.1,-.4,.4],[.15,-.1,.5]] → signs [[-,-,+],[+,-,+]]
    # agreeing entries summed (normalize false): (0,0) -.2; (0,1) -.5; (0,2) .3+.1;
    # (1,0) .05+.1; (1,1) -.2; (1,2) .4+.1
    close(reference_merge(recipe)[W], [[-0.2, -0.5, 0.4], [0.15, -0.2, 0.5]])


# ---------------------------------------------------------------------------------------------
# DELLA


def test_della_probabilities():
    # |τ| = .1 .4 .3 → ranks 0 2 1 → rn 0 1 .5 → p = 0.3 + 0.4·rn
    close(della_probabilities(t([[0.1, -0.4, 0.3]]), 0.5, 0.2), [[0.3, 0.7, 0.5]])
    close(della_probabilities(t([0.1, -0.4, 0.3]), 0.5, 0.2), [0.3, 0.7, 0.5])  # 1-D: one row
    # per row, not per tensor
    close(della_probabilities(t([[3, 1], [1, 3]]), 0.5, 0.1), [[0.6, 0.4], [0.4, 0.6]])
    close(della_probabilities(t([[5], [7]]), 0.5, 0.1), [[0.4], [0.4]])  # one column: rn = 0
    # equal magnitudes: stable ranks (earlier first)
    close(della_probabilities(t([[2, -2, 2]]), 0.5, 0.2), [[0.3, 0.5, 0.7]])


def test_della(tmp_path):
    base, (f1, f2) = _tv_family(tmp_path, [DTAU, TAU2], base_value=2.0)
    shape = torch.Size([2, 3])
    recipe = {"merge_method": "della_linear", "base_model": base, "seed": 5,
              "parameters": {"density": 0.6, "epsilon": 0.2},
              "models": [{"model": f1, "parameters": {"weight": 0.5}}, {"model": f2}]}  # fmt: skip
    ks = []
    for i, tau in enumerate([t(DTAU), t(TAU2)]):
        p = della_probabilities(tau, 0.6, 0.2)
        kept = tau * (uniform(5, i, W, shape) < p)
        ks.append(kept * tau.abs().sum() / kept.abs().sum())  # L1 rescale
    close(reference_merge(recipe)[W], 2 + 0.5 * ks[0] + ks[1])  # no consensus, no normalize
    recipe["merge_method"] = "della"  # consensus + normalize by the agreeing weights
    d1, d2 = 0.5 * ks[0], ks[1]
    s = torch.where(d1 + d2 >= 0, 1.0, -1.0)
    m1, m2 = (torch.sign(d1) == s).float(), (torch.sign(d2) == s).float()
    div = m1 * 0.5 + m2
    expected = 2 + (m1 * d1 + m2 * d2) / torch.where(div == 0, 1.0, div)
    close(reference_merge(recipe)[W], expected)


# ---------------------------------------------------------------------------------------------
# Model Stock


def test_model_stock(tmp_path):
    base, fts = _tv_family(tmp_path, [[[1, 1, 0], [0, 0, 0]], [[1, 0, 1], [0, 0, 0]]], 1.0)
    recipe = {"merge_method": "model_stock", "base_model": base,
              "models": [{"model": f} for f in fts]}  # fmt: skip
    # cos = 1/(√2·√2) = 0.5, k = 2: t = 2·0.5/(0.5 + 1) = 2/3; mean θ = 1 + [[1,.5,.5],[0,0,0]]
    close(reference_merge(recipe)[W], 1 + (2 / 3) * t([[1, 0.5, 0.5], [0, 0, 0]]))


def test_model_stock_filter_wise(tmp_path):
    base, fts = _tv_family(tmp_path, [[[1, 1, 0], [1, 0, 0]], [[1, 0, 1], [2, 0, 0]]], 1.0)
    recipe = {
        "merge_method": "model_stock",
        "base_model": base,
        "parameters": {"filter_wise": True},
        "models": [{"model": f} for f in fts],
    }
    # row 0: cos .5 → t = 2/3; row 1: cos 1 → t = 2/(1 + 1) = 1 → the mean row 1 + [1.5,0,0]
    close(reference_merge(recipe)[W], [[1 + 2 / 3, 1 + 1 / 3, 1 + 1 / 3], [2.5, 1, 1]])
    # whole tensor: τ1 = [1,1,0,1,0,0], τ2 = [1,0,1,2,0,0]: cos = 3/(√3·√6) = 1/√2,
    # t = 2c/(c + 1) = 2/(1 + √2) = 2(√2 − 1)
    recipe["parameters"]["filter_wise"] = False
    tt = 2 * (math.sqrt(2) - 1)
    close(reference_merge(recipe)[W], 1 + tt * t([[1, 0.5, 0.5], [1.5, 0, 0]]))


def test_model_stock_clamps_and_degenerate_cases(tmp_path):
    base, fts = _tv_family(
        tmp_path, [[[1, 0, 0], [0, 0, 0]], [[-1, 1, 0], [0, 0, 0]], [[-1, 0, 0], [0, 0, 0]]], 1.0
    )
    two = {"merge_method": "model_stock", "base_model": base}
    # cos = -1/√2: den = 1 − 0.707 > 0, t = -1.414/0.293 < 0 → clamped to 0 → the base
    close(reference_merge({**two, "models": [{"model": fts[0]}, {"model": fts[1]}]})[W],
          torch.ones(2, 3))  # fmt: skip
    # cos = -1: den = 0 (singular) → t = 0 → the base
    close(reference_merge({**two, "models": [{"model": fts[0]}, {"model": fts[2]}]})[W],
          torch.ones(2, 3))  # fmt: skip


def test_model_stock_zero_task_vector(tmp_path):
    taus = [[[1, 1, 0], [0, 0, 0]], [[1, 0, 1], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]]
    base, fts = _tv_family(tmp_path, taus, 1.0)
    recipe = {"merge_method": "model_stock", "base_model": base,
              "models": [{"model": f} for f in fts]}  # fmt: skip
    # cos pairs: .5, 0 (zero vector), 0 → mean 1/6; k = 3: t = (3/6)/(2/6 + 1) = 3/8
    # mean θ = 1 + [[2/3, 1/3, 1/3], 0] → out = 1 + 3/8·that = 1 + [[1/4, 1/8, 1/8], 0]
    close(reference_merge(recipe)[W], [[1.25, 1.125, 1.125], [1, 1, 1]])
    # all task vectors zero → t = 0
    base, fts = _tv_family(tmp_path / "z", [taus[2], taus[2]], 1.0)
    close(reference_merge({**recipe, "base_model": base, "models": [{"model": f} for f in fts]})[W],
          torch.ones(2, 3))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# SLERP


def test_slerp_orthogonal(tmp_path):
    base = ckpt(tmp_path, "base", {W: t([[1, 0, 0], [0, 0, 0]])})
    ft = ckpt(tmp_path, "ft", {W: t([[0, 3, 0], [0, 0, 0]])})
    recipe = {"merge_method": "slerp", "base_model": base, "models": [{"model": ft}]}
    # Ω = π/2, sin Ω = 1: out = sin((1−t)π/2)·v0 + sin(tπ/2)·v1
    for tt, expected in [(0.0, [[1, 0, 0], [0, 0, 0]]), (1.0, [[0, 3, 0], [0, 0, 0]]),
                         (0.5, [[R2, 3 * R2, 0], [0, 0, 0]])]:  # fmt: skip
        close(reference_merge({**recipe, "parameters": {"t": tt}})[W], expected)


def test_slerp_parallel_and_zero_and_gradient(tmp_path):
    names = ["model.layers.0.w", "model.layers.1.w", "model.layers.2.w"]
    v0 = t([[1, 2, 0], [0, 0, 0]])
    base = ckpt(tmp_path, "base", {**{n: v0 for n in names}, "model.zero": torch.zeros(2, 3)})
    ft = ckpt(tmp_path, "ft", {**{n: 2 * v0 for n in names}, "model.zero": t([[0, 2, 0], [0] * 3])})
    recipe = {"merge_method": "slerp", "base_model": base, "models": [{"model": ft}],
              "parameters": {"t": [0.0, 1.0]}}  # fmt: skip
    out = reference_merge(recipe)
    # parallel (cos 1 > 0.9995) → lerp: (1 − t)·v0 + t·2v0 = (1 + t)·v0, t = layer/2
    for n, tt in zip(names, [0.0, 0.5, 1.0], strict=True):
        close(out[n], (1 + tt) * v0)
    # a zero vector: cos counts as 0 → Ω = π/2; outside the layers t = 0 → the base (zeros)
    close(out["model.zero"], torch.zeros(2, 3))
    out = reference_merge({**recipe, "parameters": {"t": 0.5}})
    close(out["model.zero"], [[0, 2 * R2, 0], [0, 0, 0]])


# ---------------------------------------------------------------------------------------------
# PCB

T1 = [0.4, 0.1, 0.2, 0.8]
T2 = [0.2, 0.3, -0.1, 0.6]


def _pcb_family(tmp_path, split: bool):
    def tensors(v):
        if split:
            return {"model.x.a": t(v[:2]), "model.x.b": t(v[2:])}
        return {"model.x.w": t(v)}

    base = ckpt(tmp_path, "base", tensors([0.0] * 4))
    return base, [ckpt(tmp_path, f"ft{i}", tensors(v)) for i, v in enumerate([T1, T2])]


def test_pcb_two_by_four(tmp_path):
    base, fts = _pcb_family(tmp_path, split=False)
    recipe = {"merge_method": "pcb", "base_model": base, "models": [{"model": f} for f in fts],
              "parameters": {"density": 0.75, "clip_ratio": 0.2}}  # fmt: skip
    # n = 2, d = 4, c = 0.2: lo = sorted|T_i|[int(0.8) = 0], hi = sorted|T_i|[int(3.2) − 1 = 2]
    #   |T1| sorted .1 .2 .4 .8 → [.1, .4]: only the .8 is clipped → Tc1 = [.4, .1, .2, .4]
    #   |T2| sorted .1 .2 .3 .6 → [.1, .3]: only the .6 is clipped → Tc2 = [.2, .3, -.1, .3]
    # normalize(A1) = (A1 − .1)/.3 = [1, 0, 1/3, 1]; normalize(A2) = (A2 − .1)/.2 = [.5, 1, 0, 1]
    # intra ∝ exp(2x²): intra1 ∝ [1, e^-2, e^(-16/9), 1], intra2 ∝ [e^-1.5, 1, e^-2, 1]
    # ΣT = [.6, .4, .1, 1.4] → inter1 = tanh([.24, .04, .02, 1.12]),
    #                          inter2 = tanh([.12, .12, -.01, .84])
    # B1 ≈ [.2355, .0054, .0034, .8076]; B2 ≈ [.0266, .1194, -.0014, .6858]
    # r = .75: threshold = sorted(B)[int(4·.25) = 1]: B1 → .0054 (entry 1), B2 → .0266 (entry 0)
    # S1 = [s, 0, 0, 1] (entry 2 is below, entry 1 is the threshold), S2 = [0, s', 0, 1]
    # merged = Σ λ·Tc·S / ΣS: entry 0 → Tc1 = .4, entry 1 → Tc2 = .3, entry 2 → nobody → 0,
    #                         entry 3 → (.4 + .3)/2 = .35
    close(reference_merge(recipe)["model.x.w"], [0.4, 0.3, 0.0, 0.35])
    recipe["models"][0]["parameters"] = {"weight": 2.0}  # λ1 = 2: [.8, .3, 0, (.8 + .3)/2]
    close(reference_merge(recipe)["model.x.w"], [0.8, 0.3, 0.0, 0.55])
    recipe["parameters"]["scope"] = "tensor"  # one tensor: the same statistics
    close(reference_merge(recipe)["model.x.w"], [0.8, 0.3, 0.0, 0.55])


def test_pcb_global_vs_tensor_scope(tmp_path):
    base, fts = _pcb_family(tmp_path, split=True)
    recipe = {"merge_method": "pcb", "base_model": base, "models": [{"model": f} for f in fts],
              "parameters": {"density": 0.75, "clip_ratio": 0.2}}  # fmt: skip
    # global: "model.x.a" then "model.x.b" concatenated = the 2×4 example above
    out = reference_merge(recipe)
    close(out["model.x.a"], [0.4, 0.3])
    close(out["model.x.b"], [0.0, 0.35])
    # per tensor, d = 2: lo index int(0.4) = 0, hi index int(1.6) − 1 = 0 → hi = lo = min|T_i|
    # → A constant, Tc = sign·min, normalize(A) = 0 (guard). threshold index int(0.5) = 0
    # (the row min), so S is 1 at the row's larger B, 0 at the smaller (0 if they are equal).
    # a: Tc1 = [.1, .1], Tc2 = [.2, .2]; ΣT = [.6, .4]; B1 ∝ tanh([.24, .04]) → S1 = [1, 0];
    #    B2 ∝ tanh([.12, .12]) equal → threshold = max → S2 = [0, 0] → a = [.1, 0]
    # b: Tc1 = [.2, .2], Tc2 = [-.1, .1]; ΣT = [.1, 1.4]; B1 ∝ tanh([.02, 1.12]) → S1 = [0, 1];
    #    B2 ∝ tanh([-.01, .84]) → S2 = [0, 1] → b = [0, (.2 + .1)/2]
    recipe["parameters"]["scope"] = "tensor"
    out = reference_merge(recipe)
    close(out["model.x.a"], [0.1, 0.0])
    close(out["model.x.b"], [0.0, 0.15])


def test_pcb_defaults_on_one_model(tmp_path):
    # n = 1, default density 0.1 and clip 0.0001 on d = 20: lo index int(0.002) = 0,
    # hi index int(19.998) − 1 = 18 (the largest |τ| is clipped to the second largest);
    # threshold index int(18.0) = 18 → only the largest B (the largest |τ|, clipped) has S = 1:
    # B = exp(normalize(A)² − 1)·tanh(τ²) is increasing in |τ|.
    tau = torch.linspace(0.05, 1.0, 20)
    base = ckpt(tmp_path, "base", {"model.x.w": torch.zeros(20)})
    ft = ckpt(tmp_path, "ft", {"model.x.w": tau})
    out = reference_merge({"merge_method": "pcb", "base_model": base, "models": [{"model": ft}]})
    expected = torch.zeros(20)
    expected[-1] = tau[-2]
    close(out["model.x.w"], expected)


def test_load_checkpoint_sharded(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": 20},
        "weight_map": {"a": "model-00001-of-00002.safetensors",
                       "b": "model-00002-of-00002.safetensors"}}))  # fmt: skip
    sd = load_checkpoint(d)
    assert set(sd) == {"a", "b"} and sd["b"].shape == (3,)
