"""The merge engine against the reference merge (tests/reference_merge.py), method by method.

Every case runs the engine on tiny real checkpoints (tests/models.py), reads every output
tensor back through model.safetensors.index.json with the safetensors library, and compares
it with the dense in-memory reference. Tolerances are float32 rounding: the reference mixes
in float64, the engine in float32. Random methods use the same seeded protocol in both, so
they must agree exactly in which entries are kept.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from schemas.recipe import parse_recipe
from tests.reference_merge import layer_of, load_checkpoint, reference_merge
from workers.merge.engine import run_merge

RTOL, ATOL = 1e-5, 1e-6
SEED = 20240611
EMBED = "model.embed_tokens.weight"  # 256×64, changed completely by every fine-tune


# ---------------------------------------------------------------------------------------------
# Helpers


def load_output(out_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an engine output, read through its index json."""
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out_dir / shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                assert name not in tensors, f"{name} is in two shards"
                assert index["weight_map"].get(name) == shard, f"{name}: index says otherwise"
                tensors[name] = f.get_tensor(name)
    assert set(tensors) == set(index["weight_map"]), "index and shards disagree"
    return tensors


def engine(recipe: dict[str, Any], out_dir: Path, seed: int | None = None):
    result = run_merge(parse_recipe(recipe), out_dir, seed=seed)
    return result, load_output(out_dir)


def assert_matches_reference(
    out: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    *,
    out_dir: Path | None = None,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> None:
    extra = set(out) - set(ref)
    if extra == {"lm_head.weight"} and out_dir is not None:
        # A tied model may be written untied; then config.json must say so and the head
        # must be the merged embedding.
        cfg = json.loads((out_dir / "config.json").read_text())
        assert cfg.get("tie_word_embeddings") is False
        emb = next(n for n in ref if n.endswith(("wte.weight", "embed_tokens.weight")))
        torch.testing.assert_close(out["lm_head.weight"], ref[emb], rtol=rtol, atol=atol)
        extra = set()
    assert not extra, f"tensors the reference does not have: {sorted(extra)}"
    missing = set(ref) - set(out)
    assert not missing, f"tensors missing from the output: {sorted(missing)}"
    for name in sorted(ref):
        assert out[name].dtype == ref[name].dtype, name
        assert out[name].shape == ref[name].shape, name
        torch.testing.assert_close(
            out[name], ref[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


def models(f: dict[str, Path], *names: str, params: list[dict | None] | None = None):
    out = []
    for i, n in enumerate(names):
        entry: dict[str, Any] = {"model": str(f[n])}
        if params and params[i]:
            entry["parameters"] = params[i]
        out.append(entry)
    return out


def recipe(method: str, f: dict[str, Path], entries, parameters=None, **extra):
    r: dict[str, Any] = {"merge_method": method, "models": entries}
    if method != "linear" or extra.pop("with_base", False):
        r["base_model"] = str(f["base"])
    if parameters:
        r["parameters"] = parameters
    r.update(extra)
    return r


# ---------------------------------------------------------------------------------------------
# Every method, engine vs reference

FT3 = ("ft1", "ft2", "ft3")

LLAMA_CASES = {
    "linear": lambda f: recipe("linear", f, models(
        f, *FT3, params=[{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}])),
    "linear_unnormalized_gradient": lambda f: recipe("linear", f, models(
        f, "ft1", "ft2", params=[{"weight": [0.2, 0.6]}, {"weight": 0.4}]),
        {"normalize": False}),
    "task_arithmetic": lambda f: recipe("task_arithmetic", f, models(
        f, *FT3, params=[{"weight": 0.6}, {"weight": [0.2, 0.8]},
                         {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.1}]}]),
        {"lambda": 0.9}),
    "task_arithmetic_normalize": lambda f: recipe("task_arithmetic", f, models(
        f, "ft1", "ft2", params=[{"weight": 2.0}, None]), {"normalize": True, "weight": 0.5}),
    "ties": lambda f: recipe("ties", f, models(
        f, *FT3, params=[{"density": 0.3, "weight": 0.7}, {"weight": 0.5},
                         {"density": [0.3, 0.7]}]), {"density": 0.5}),
    "ties_base_listed_rescale": lambda f: recipe("ties", f, models(
        f, "base", "ft1", "ft2", params=[{"weight": 5.0}, None, None]),
        {"density": 0.4, "rescale": True, "normalize": False, "lambda": 0.8}),
    "ties_global": lambda f: recipe("ties", f, models(f, *FT3), {"density": 0.4,
                                                                 "scope": "global"}),
    "dare_linear": lambda f: recipe("dare_linear", f, models(
        f, *FT3, params=[{"weight": 0.5}, {"weight": 0.3, "density": 0.4}, None]),
        {"density": 0.6}),
    "dare_ties": lambda f: recipe("dare_ties", f, models(
        f, *FT3, params=[None, {"density": [0.4, 0.8]}, {"weight": 0.6}]), {"density": 0.7}),
    "dare_ties_inverse_p": lambda f: recipe("dare_ties", f, models(f, "ft1", "ft2"), {
        "density": 0.6, "rescale_mode": "inverse_p", "normalize": True}),
    "dare_linear_no_rescale": lambda f: recipe("dare_linear", f, models(f, "ft1", "ft2"), {
        "density": 0.3, "rescale": False}),
    "breadcrumbs": lambda f: recipe("breadcrumbs", f, models(f, *FT3), {
        "density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties_row": lambda f: recipe("breadcrumbs_ties", f, models(
        f, *FT3, params=[{"gamma": 0.1}, None, {"density": 0.6}]),
        {"density": 0.7, "gamma": 0.05, "scope": "row"}),
    "della": lambda f: recipe("della", f, models(
        f, *FT3, params=[{"weight": 0.8}, {"epsilon": 0.1}, None]),
        {"density": 0.6, "epsilon": 0.15}),
    "della_linear": lambda f: recipe("della_linear", f, models(f, "ft1", "ft2"), {
        "density": 0.5, "epsilon": 0.2, "lambda": 1.1}),
    "pcb": lambda f: recipe("pcb", f, models(f, *FT3, params=[{"weight": 1.2}, None, None]),
                            {"density": 0.2}),
    "pcb_defaults": lambda f: recipe("pcb", f, models(f, "ft1", "ft2")),
    "pcb_tensor": lambda f: recipe("pcb", f, models(f, *FT3), {
        "density": 0.3, "clip_ratio": 0.001, "scope": "tensor"}),
    "model_stock": lambda f: recipe("model_stock", f, models(f, *FT3)),
    "model_stock_filter_wise": lambda f: recipe("model_stock", f, models(f, *FT3), {
        "filter_wise": True}),
    "slerp": lambda f: recipe("slerp", f, models(f, "ft1"), {"t": 0.3}),
    "slerp_gradient": lambda f: recipe("slerp", f, models(f, "base", "ft2"), {
        "t": [0.0, 0.3, 0.7, 1.0]}),
}  # fmt: skip

SMALL_CASES = {
    "ties": lambda f: recipe("ties", f, models(
        f, "ft1", "ft2", params=[{"density": 0.3}, {"weight": 0.6}]), {"density": 0.5}),
    "task_arithmetic": lambda f: recipe("task_arithmetic", f, models(
        f, "ft1", "ft2", params=[{"weight": [1.0, 0.2]}, {"weight": 0.5}]), {"lambda": 0.7}),
    "slerp": lambda f: recipe("slerp", f, models(f, "ft1"), {"t": [0.2, 0.6]}),
}  # fmt: skip

# bf16 inputs, float32 output (so the comparison stays tight): the task vectors are coarse,
# nearly every top-k cut falls between equal magnitudes, and ranks have many ties, so these
# cases pin down the tie-breaking conventions (see tests/reference_merge.py).
F32_OUT = {"out_dtype": "float32"}
BF16_CASES = {
    "linear": lambda f: recipe("linear", f, models(f, "ft1", "ft2"), **F32_OUT),
    "task_arithmetic": lambda f: recipe("task_arithmetic", f, models(f, "ft1", "ft2"),
                                        {"weight": 0.7}, **F32_OUT),
    "ties": lambda f: recipe("ties", f, models(f, "ft1", "ft2"), {"density": 0.3}, **F32_OUT),
    "ties_global": lambda f: recipe("ties", f, models(f, "ft1", "ft2"), {
        "density": 0.3, "scope": "global"}, **F32_OUT),
    "dare_ties": lambda f: recipe("dare_ties", f, models(f, "ft1", "ft2"), {"density": 0.5},
                                  **F32_OUT),
    "breadcrumbs": lambda f: recipe("breadcrumbs", f, models(f, "ft1", "ft2"), {
        "density": 0.7, "gamma": 0.05}, **F32_OUT),
    "breadcrumbs_ties_row": lambda f: recipe("breadcrumbs_ties", f, models(f, "ft1", "ft2"), {
        "density": 0.6, "gamma": 0.1, "scope": "row"}, **F32_OUT),
    "della": lambda f: recipe("della", f, models(f, "ft1", "ft2"), {"density": 0.5},
                              **F32_OUT),
    "pcb": lambda f: recipe("pcb", f, models(f, "ft1", "ft2"), {"density": 0.2}, **F32_OUT),
    "model_stock": lambda f: recipe("model_stock", f, models(f, "ft1", "ft2"), **F32_OUT),
    "slerp": lambda f: recipe("slerp", f, models(f, "ft1"), {"t": 0.4}, **F32_OUT),
}  # fmt: skip

CASES = [
    *[pytest.param("llama_family", c, id=f"llama-{c}") for c in LLAMA_CASES],
    *[pytest.param("gpt2_family", c, id=f"gpt2-{c}") for c in SMALL_CASES],
    *[pytest.param("sharded_llama_family", c, id=f"sharded-{c}") for c in SMALL_CASES],
    *[pytest.param("bf16_llama_family", c, id=f"bf16-{c}") for c in BF16_CASES],
]
BUILDERS = {
    "llama_family": LLAMA_CASES,
    "gpt2_family": SMALL_CASES,
    "sharded_llama_family": SMALL_CASES,
    "bf16_llama_family": BF16_CASES,
}


@pytest.mark.parametrize(("family", "case"), CASES)
def test_engine_matches_reference(family, case, request, tmp_path):
    f = request.getfixturevalue(family)
    r = BUILDERS[family][case](f)
    out_dir = tmp_path / "out"
    result, out = engine(r, out_dir, seed=SEED)
    assert result.seed == SEED
    assert Path(result.out_dir) == out_dir
    assert_matches_reference(out, reference_merge(r, SEED), out_dir=out_dir)


def test_output_dtype_bfloat16(llama_family, tmp_path):
    r = recipe("ties", llama_family, models(llama_family, "ft1", "ft2"),
               {"density": 0.5}, out_dtype="bfloat16")  # fmt: skip
    out_dir = tmp_path / "out"
    _, out = engine(r, out_dir)
    ref = reference_merge(r, 0)
    assert all(v.dtype == torch.bfloat16 for v in ref.values())
    # One bf16 rounding step of a float32 vs a float64 value may differ by one bf16 ulp.
    assert_matches_reference(out, ref, out_dir=out_dir, rtol=2**-7, atol=1e-5)
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_bf16_inputs_give_bf16_output(bf16_llama_family, tmp_path):
    f = bf16_llama_family
    r = recipe("ties", f, models(f, "ft1", "ft2"), {"density": 0.3})
    _, out = engine(r, tmp_path / "out")
    ref = reference_merge(r)
    assert all(v.dtype == torch.bfloat16 for v in ref.values())
    # One bf16 rounding step of a float32 vs a float64 value may differ by one bf16 ulp.
    assert_matches_reference(out, ref, out_dir=tmp_path / "out", rtol=2**-7, atol=1e-5)
    # task vectors are computed in float32: a bf16 delta would lose the small entries
    base = load_checkpoint(f["base"])
    ft1 = load_checkpoint(f["ft1"])
    small = (ft1[EMBED].float() - base[EMBED].float()).abs() < 1e-3
    assert small.any()


# ---------------------------------------------------------------------------------------------
# Randomness: reproducibility and keep rates


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_same_seed_same_bytes_other_seed_differs(method, llama_family, tmp_path):
    r = recipe(method, llama_family, models(llama_family, "ft1", "ft2"), {"density": 0.5})
    _, a = engine(r, tmp_path / "a", seed=1234)
    _, b = engine(r, tmp_path / "b", seed=1234)
    _, c = engine(r, tmp_path / "c", seed=1235)
    assert set(a) == set(b) == set(c)
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert a[name].contiguous().view(torch.uint8).equal(b[name].contiguous().view(torch.uint8))
    assert any(not torch.equal(a[n], c[n]) for n in a), "a different seed changed nothing"
    assert not torch.equal(a[EMBED], c[EMBED])


def test_recipe_seed_is_used_and_recorded(llama_family, tmp_path):
    r = recipe("dare_linear", llama_family, models(llama_family, "ft1"), {"density": 0.5},
               seed=77)  # fmt: skip
    result, out = engine(r, tmp_path / "a")
    assert result.seed == 77
    assert_matches_reference(out, reference_merge(r, 77))
    # the argument overrides the recipe's seed
    result, out = engine(r, tmp_path / "b", seed=78)
    assert result.seed == 78
    assert_matches_reference(out, reference_merge(r, 78))


def test_seed_drawn_when_none_given(llama_family, tmp_path):
    r = recipe("della_linear", llama_family, models(llama_family, "ft1"), {"density": 0.5})
    result, out = engine(r, tmp_path / "a")
    assert isinstance(result.seed, int) and 0 <= result.seed < 2**63
    # the drawn seed reproduces the merge
    assert_matches_reference(out, reference_merge(r, result.seed))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert str(result.seed) in json.dumps(manifest)


def _binomial_bound(n: int, p: float) -> float:
    return 5 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("density", [0.1, 0.3, 0.9])
def test_dare_keep_rate_matches_density(density, llama_family, tmp_path):
    f = llama_family
    r = recipe("dare_linear", f, models(f, "ft1"), {"density": density})
    _, out = engine(r, tmp_path / "out", seed=SEED)
    base, ft = load_checkpoint(f["base"]), load_checkpoint(f["ft1"])
    kept = total = 0
    for name in base:
        tau = ft[name] - base[name]
        changed = out[name] != base[name]
        assert not changed[tau == 0].any(), f"{name}: an entry with τ = 0 changed"
        kept += int(changed[tau != 0].sum())
        total += int((tau != 0).sum())
    assert total > 100_000
    assert abs(kept - density * total) <= _binomial_bound(total, density), (kept, total)


def test_della_keep_rate_matches_density(llama_family, tmp_path):
    f = llama_family
    density, eps = 0.5, 0.3
    r = recipe("della_linear", f, models(f, "ft1"), {"density": density, "epsilon": eps,
                                                     "rescale": False})  # fmt: skip
    _, out = engine(r, tmp_path / "out", seed=SEED)
    base, ft = load_checkpoint(f["base"]), load_checkpoint(f["ft1"])
    tau = ft[EMBED] - base[EMBED]
    assert (tau != 0).all()
    kept = out[EMBED] != base[EMBED]
    n = kept.numel()
    # p runs linearly from density − ε to density + ε along each row's ranks: mean = density
    assert abs(int(kept.sum()) - density * n) <= 5 * math.sqrt(n / 4)
    # and larger |τ| is kept more often: mean p over the upper half of ranks ≈ density + ε/2
    upper = tau.abs() >= tau.abs().median(dim=1, keepdim=True).values
    rate_hi = float(kept[upper].float().mean())
    rate_lo = float(kept[~upper].float().mean())
    assert rate_hi - rate_lo > eps / 2, (rate_hi, rate_lo)
    # without rescale the kept entries are exactly the fine-tune's (λ = 1, weight 1)
    torch.testing.assert_close(out[EMBED][kept], ft[EMBED][kept], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Global scope


def test_ties_global_scope_keeps_a_global_fraction(llama_family, tmp_path):
    f = llama_family
    r_global = recipe("ties", f, models(f, "ft1"), {"density": 0.2, "scope": "global"})
    r_tensor = recipe("ties", f, models(f, "ft1"), {"density": 0.2})
    _, g = engine(r_global, tmp_path / "g")
    _, t = engine(r_tensor, tmp_path / "t")
    assert_matches_reference(g, reference_merge(r_global))
    base, ft = load_checkpoint(f["base"]), load_checkpoint(f["ft1"])
    all_abs = torch.cat([(ft[n] - base[n]).abs().flatten() for n in sorted(base)])
    k = int(0.2 * all_abs.numel())
    kth = all_abs.sort(descending=True).values[k - 1]
    changed = {n: int((g[n] != base[n]).sum()) for n in base}
    # the entries with |τ| ≥ the global k-th value change (k of them, more on ties) …
    assert kth > 0
    assert sum(changed.values()) == int((all_abs >= kth).sum()) >= k
    # … unevenly spread over tensors: the norms' task vectors are large (noise relative to
    # weights of 1), so some tensor keeps more than half of its entries, which per tensor
    # scope (at most int(0.2·n) per tensor) cannot do
    assert max(changed[n] / base[n].numel() for n in base) > 0.5
    assert all(int((t[n] != base[n]).sum()) <= int(0.2 * base[n].numel()) for n in base)
    assert any(not torch.equal(g[n], t[n]) for n in base)


def test_pcb_global_differs_from_tensor_scope(llama_family, tmp_path):
    f = llama_family
    r = recipe("pcb", f, models(f, "ft1", "ft2"), {"density": 0.3})
    _, g = engine(r, tmp_path / "g")
    r_t = recipe("pcb", f, models(f, "ft1", "ft2"), {"density": 0.3, "scope": "tensor"})
    _, t = engine(r_t, tmp_path / "t")
    assert_matches_reference(g, reference_merge(r))
    assert_matches_reference(t, reference_merge(r_t))
    assert any(not torch.equal(g[n], t[n]) for n in g)


# ---------------------------------------------------------------------------------------------
# Parameter resolution, checked by hand rather than through the reference


def _expected_sum(base, fts, weights) -> dict[str, torch.Tensor]:
    return {
        n: (base[n].double() + sum(w(n) * (ft[n] - base[n]).double() for ft, w in
                                   zip(fts, weights, strict=True))).float()
        for n in base
    }  # fmt: skip


def test_gradient_weights_per_layer_llama(llama_family, tmp_path):
    f = llama_family
    r = recipe("task_arithmetic", f, models(f, "ft1", params=[{"weight": [0.0, 1.0]}]))
    _, out = engine(r, tmp_path / "out")
    base, ft = load_checkpoint(f["base"]), load_checkpoint(f["ft1"])

    def w(name: str) -> float:  # 4 layers: t = layer/3; outside the layers t = 0
        layer = layer_of(name)
        return 0.0 if layer is None else layer / 3

    assert {w(n) for n in base} == {0.0, 1 / 3, 2 / 3, 1.0}
    exp = _expected_sum(base, [ft], [w])
    for n in base:
        torch.testing.assert_close(out[n], exp[n], rtol=RTOL, atol=ATOL, msg=n)
    assert torch.equal(out[EMBED], base[EMBED]) and torch.equal(
        out["lm_head.weight"], base["lm_head.weight"]
    )


def test_filters_and_precedence_llama(llama_family, tmp_path):
    f = llama_family
    own = {"weight": [{"filter": "mlp", "value": 0.5},
                      {"filter": "self_attn", "value": [0.0, 1.0]}]}  # fmt: skip
    r = recipe("task_arithmetic", f, models(f, "ft1", "ft2", params=[own, None]),
               {"weight": 0.25})  # fmt: skip
    _, out = engine(r, tmp_path / "out")
    base, ft1, ft2 = (load_checkpoint(f[k]) for k in ("base", "ft1", "ft2"))

    def w1(name: str) -> float:  # first matching filter; unmatched → the top level's 0.25
        if "mlp" in name:
            return 0.5
        if "self_attn" in name:
            return layer_of(name) / 3
        return 0.25

    exp = _expected_sum(base, [ft1, ft2], [w1, lambda n: 0.25])
    for n in base:
        torch.testing.assert_close(out[n], exp[n], rtol=RTOL, atol=ATOL, msg=n)


def test_gradient_weights_per_layer_gpt2(gpt2_family, tmp_path):
    f = gpt2_family
    r = recipe("task_arithmetic", f, models(f, "ft1", params=[{"weight": [1.0, 0.0, 2.0]}]))
    _, out = engine(r, tmp_path / "out")
    base, ft = load_checkpoint(f["base"]), load_checkpoint(f["ft1"])
    # 3 layers: t = layer/2 → layer 0: 1, layer 1: position 1 → 0, layer 2: 2; outside: 1
    weights = {None: 1.0, 0: 1.0, 1: 0.0, 2: 2.0}
    exp = _expected_sum(base, [ft], [lambda n: weights[layer_of(n)]])
    for n in base:
        torch.testing.assert_close(out[n], exp[n], rtol=RTOL, atol=ATOL, msg=n)


# ---------------------------------------------------------------------------------------------
# Output layout and tokenizer


SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def _check_layout(out_dir: Path, shard_size: int | None = None) -> list[str]:
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    on_disk = sorted(p.name for p in out_dir.glob("*.safetensors"))
    assert shards == on_disk
    n = len(shards)
    for i, s in enumerate(shards, 1):
        m = SHARD.match(s)
        assert m and int(m.group(1)) == i and int(m.group(2)) == n, s
    total = 0
    for s in shards:
        with safe_open(str(out_dir / s), framework="pt") as fh:
            assert (fh.metadata() or {}).get("format") == "pt", s
            size = sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size()
                       for k in fh.keys())  # noqa: SIM118  # fmt: skip
        if shard_size is not None:
            assert size <= shard_size, (s, size)
        total += size
    assert index["metadata"]["total_size"] == total
    for name in ("config.json", "README.md", "manifest.json", "tokenizer.json"):
        assert (out_dir / name).is_file(), name
    assert isinstance(json.loads((out_dir / "manifest.json").read_text()), dict)
    return shards


def test_output_layout_single_and_sharded(sharded_llama_family, tmp_path):
    f = sharded_llama_family
    r = recipe("ties", f, models(f, "ft1", "ft2"), {"density": 0.5})
    result, out = engine(r, tmp_path / "one")
    assert _check_layout(tmp_path / "one") == ["model-00001-of-00001.safetensors"]
    assert isinstance(result.manifest, dict)
    r["output"] = {"shard_size": "100KB"}
    _, out2 = engine(r, tmp_path / "many")
    assert len(_check_layout(tmp_path / "many", shard_size=100_000)) > 3
    assert set(out) == set(out2) and all(torch.equal(out[n], out2[n]) for n in out)


def test_out_dir_must_not_exist(llama_family, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    r = recipe("linear", llama_family, models(llama_family, "ft1", "ft2"))
    with pytest.raises(Exception):  # noqa: B017 - any clear error; the folder is not touched
        run_merge(parse_recipe(r), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["something"]


def _vocab(model_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(str(model_dir)).get_vocab())


def test_tokenizer_source(llama_family, llama_alt_tokenizer, tmp_path):
    f = {**llama_family, "alt": llama_alt_tokenizer}
    base_vocab, alt_vocab = _vocab(f["base"]), _vocab(f["alt"])
    assert base_vocab != alt_vocab and len(base_vocab) == len(alt_vocab)
    r = recipe("task_arithmetic", f, models(f, "ft1", "alt"), {"weight": 0.5})
    engine(r, tmp_path / "default")
    assert _vocab(tmp_path / "default") == base_vocab
    engine({**r, "tokenizer_source": "base"}, tmp_path / "base")
    assert _vocab(tmp_path / "base") == base_vocab
    _, out = engine({**r, "tokenizer_source": str(f["alt"])}, tmp_path / "alt")
    assert _vocab(tmp_path / "alt") == alt_vocab
    assert_matches_reference(out, reference_merge(r))  # the weights do not depend on it
