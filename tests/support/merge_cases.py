"""The merge cases the engine is checked with against the reference merge
(tests/support/reference_merge.py), and the helpers that run the engine and compare.

Each case maps a family of tiny checkpoints ({"base": Path, "ft1": Path, ...}) to a recipe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from schemas.recipe import parse_recipe
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
    with_base = extra.pop("with_base", False)
    without_base = extra.pop("without_base", False)
    if (method != "linear" and not without_base) or with_base:
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
    "nearswap": lambda f: recipe("nearswap", f, models(f, "ft1"), {"t": [0.0005, 0.005]}),
    "nuslerp": lambda f: recipe("nuslerp", f, models(
        f, "ft1", "ft2", params=[{"weight": 0.3}, {"weight": [0.2, 0.9]}])),
    "nuslerp_without_base": lambda f: recipe("nuslerp", f, models(
        f, "ft1", "ft3", params=[{"weight": 0.6}, {"weight": 0.4}]), without_base=True),
    "nuslerp_rows": lambda f: recipe("nuslerp", f, models(f, "ft2", "ft3"), {
        "nuslerp_flatten": False, "weight": 0.5}),
    "nuslerp_columns_base_listed": lambda f: recipe("nuslerp", f, models(
        f, "base", "ft1", "ft2", params=[None, {"weight": 2.0}, {"weight": 1.0}]), {
        "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "multislerp": lambda f: recipe("multislerp", f, models(
        f, *FT3, params=[{"weight": 0.5}, {"weight": 0.3}, {"weight": [0.1, 0.6]}])),
    "multislerp_without_base": lambda f: recipe("multislerp", f, models(
        f, "ft1", "ft2", params=[{"weight": 0.7}, {"weight": 0.2}]),
        {"normalize_weights": False}, without_base=True),
    "karcher": lambda f: recipe("karcher", f, models(f, *FT3), without_base=True),
    "karcher_with_base": lambda f: recipe("karcher", f, models(f, "ft1", "ft2"), {
        "max_iter": 3, "tol": 1e-6}),
    "sce": lambda f: recipe("sce", f, models(f, *FT3), {"select_topk": 0.3}),
    "sce_all": lambda f: recipe("sce", f, models(f, "ft1", "ft2")),
    "arcee_fusion": lambda f: recipe("arcee_fusion", f, models(f, "ft1")),
    "ram": lambda f: recipe("ram", f, models(f, *FT3), {"epsilon": 0.0005}),
    "ram_default": lambda f: recipe("ram", f, models(f, "ft1", "ft2")),
    "ramplus_tl": lambda f: recipe("ramplus_tl", f, models(f, *FT3), {
        "epsilon": 0.0005, "r": 0.5, "alpha": 0.3}),
}  # fmt: skip

SMALL_CASES = {
    "ties": lambda f: recipe("ties", f, models(
        f, "ft1", "ft2", params=[{"density": 0.3}, {"weight": 0.6}]), {"density": 0.5}),
    "task_arithmetic": lambda f: recipe("task_arithmetic", f, models(
        f, "ft1", "ft2", params=[{"weight": [1.0, 0.2]}, {"weight": 0.5}]), {"lambda": 0.7}),
    "slerp": lambda f: recipe("slerp", f, models(f, "ft1"), {"t": [0.2, 0.6]}),
    "nearswap": lambda f: recipe("nearswap", f, models(f, "ft1"), {"t": 0.001}),
    "ramplus_tl": lambda f: recipe("ramplus_tl", f, models(f, "ft1", "ft2"), {
        "epsilon": 0.0005}),
    "nuslerp": lambda f: recipe("nuslerp", f, models(f, "ft1", "ft2"), {
        "nuslerp_flatten": False}),
}  # fmt: skip

# bf16 inputs, float32 output (so the comparison stays tight): the task vectors are coarse,
# nearly every top-k cut falls between equal magnitudes, and ranks have many ties, so these
# cases pin down the tie-breaking conventions (see tests/support/reference_merge.py).
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
    "nearswap": lambda f: recipe("nearswap", f, models(f, "ft1"), {"t": 0.002}, **F32_OUT),
    "nuslerp": lambda f: recipe("nuslerp", f, models(f, "ft1", "ft2"), **F32_OUT),
    "multislerp": lambda f: recipe("multislerp", f, models(f, "ft1", "ft2"), **F32_OUT),
    "karcher": lambda f: recipe("karcher", f, models(f, "ft1", "ft2"), **F32_OUT),
    "sce": lambda f: recipe("sce", f, models(f, "ft1", "ft2"), {"select_topk": 0.5},
                        **F32_OUT),
    "arcee_fusion": lambda f: recipe("arcee_fusion", f, models(f, "ft1"), **F32_OUT),
    "ram": lambda f: recipe("ram", f, models(f, "ft1", "ft2"), **F32_OUT),
    "ramplus_tl": lambda f: recipe("ramplus_tl", f, models(f, "ft1", "ft2"), {
        "epsilon": 0.001}, **F32_OUT),
}  # fmt: skip
