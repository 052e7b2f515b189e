"""The merge engine against the reference merge (tests/support/reference_merge.py), per method.

Every case runs the engine on tiny real checkpoints (testbed/tiny_models.py), reads every output
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

import pytest
import torch
from safetensors import safe_open

from schemas.recipe import parse_recipe
from tests.support.merge_cases import (
    ATOL,
    BF16_CASES,
    EMBED,
    LLAMA_CASES,
    RTOL,
    SEED,
    SMALL_CASES,
    assert_matches_reference,
    engine,
    models,
    recipe,
)
from tests.support.reference_merge import layer_of, load_checkpoint, reference_merge
from workers.merge.engine import run_merge

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
    # as in mergekit, a tokenizer source moves the embedding rows to its vocabulary
    # (tests/test_merge_tokenizers.py); the other tensors do not depend on it
    ref = reference_merge(r)
    vocab_tensors = {"model.embed_tokens.weight", "lm_head.weight"}
    assert_matches_reference(
        {k: v for k, v in out.items() if k not in vocab_tensors},
        {k: v for k, v in ref.items() if k not in vocab_tensors},
    )
