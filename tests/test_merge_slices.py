"""Layer slices (mergekit's ``slices``): frankenmerges with passthrough, and every method over
slices with per-slice parameters, against tensors renamed by hand and the independent
sliced reference (tests/support/reference_slices.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from schemas.recipe import RecipeError, parse_recipe
from testbed.api import ApiHarness, merge_job
from tests.support.api import assert_problem
from tests.support.checkpoints import tensors
from tests.support.merge_cases import assert_matches_reference
from tests.support.reference_merge import load_checkpoint
from tests.support.reference_slices import reference_sliced_merge
from workers.errors import InputError
from workers.merge.engine import run_merge

SEED = 5


def merge(recipe: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    run_merge(parse_recipe(recipe), out, seed=SEED)
    return tensors(out)


def src(model: Path, start: int, end: int, **parameters: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": str(model), "layer_range": [start, end]}
    if parameters:
        entry["parameters"] = parameters
    return entry


def layer(name: str, i: int) -> str:
    return f"model.layers.{i}.{name}"


# ---- passthrough: layers stacked as they are ------------------------------------------------


def test_a_passthrough_frankenmerge_stacks_the_layers_renumbered_and_loads(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    base, ft1 = llama_family["base"], llama_family["ft1"]
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [src(base, 0, 3)]}, {"sources": [src(ft1, 1, 4)]}],
    }

    out = merge(recipe, tmp_path / "out")

    b, f = load_checkpoint(base), load_checkpoint(ft1)
    expected = {n: t for n, t in b.items() if ".layers." not in n and n[-11:] != "norm.weight"}
    for k in range(3):  # output layers 0-2: base layers 0-2; 3-5: ft1 layers 1-3
        for name in [n for n in b if n.startswith("model.layers.0.")]:
            rest = name.removeprefix("model.layers.0.")
            expected[layer(rest, k)] = b[layer(rest, k)]
            expected[layer(rest, 3 + k)] = f[layer(rest, 1 + k)]
    expected["model.embed_tokens.weight"] = b["model.embed_tokens.weight"]  # first slice's
    expected["model.norm.weight"] = f["model.norm.weight"]  # last slice's
    expected["lm_head.weight"] = f["lm_head.weight"]
    assert set(out) == set(expected)
    for name, t in expected.items():
        assert torch.equal(out[name], t), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.config.num_hidden_layers == 6
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, model.config.vocab_size)


def test_depth_up_scaling_repeats_a_models_layers_and_a_scale_filter_silences_projections(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    base = llama_family["base"]
    silence = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}]
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [src(base, 0, 3)]},
            {"sources": [src(base, 2, 4, scale=[*silence, {"value": 1.0}])]},
        ],
    }

    out = merge(recipe, tmp_path / "out")

    b = load_checkpoint(base)
    assert torch.equal(
        out[layer("self_attn.q_proj.weight", 3)], b[layer("self_attn.q_proj.weight", 2)]
    )
    assert torch.equal(
        out[layer("self_attn.q_proj.weight", 4)], b[layer("self_attn.q_proj.weight", 3)]
    )
    assert torch.count_nonzero(out[layer("self_attn.o_proj.weight", 3)]) == 0
    assert torch.count_nonzero(out[layer("mlp.down_proj.weight", 4)]) == 0
    assert torch.equal(out[layer("mlp.down_proj.weight", 2)], b[layer("mlp.down_proj.weight", 2)])


def test_a_scaled_source_is_its_tensors_times_the_scale(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    ft2 = llama_family["ft2"]
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [src(ft2, 1, 3, scale=0.5)]}]}

    out = merge(recipe, tmp_path / "out")

    f = load_checkpoint(ft2)
    name = "mlp.up_proj.weight"
    assert torch.equal(out[layer(name, 0)], f[layer(name, 1)] * 0.5)  # × 0.5 is exact
    assert torch.equal(out[layer(name, 1)], f[layer(name, 2)] * 0.5)
    assert torch.equal(out["model.embed_tokens.weight"], f["model.embed_tokens.weight"] * 0.5)


# ---- every method over slices ----------------------------------------------------------------

LAZY_SLERP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def sliced_cases(f: dict[str, Path]) -> dict[str, dict[str, Any]]:
    b, f1, f2, f3 = f["base"], f["ft1"], f["ft2"], f["ft3"]
    return {
        # the LazyMergekit slerp template, over the whole depth
        "slerp_lazymergekit": {
            "merge_method": "slerp",
            "base_model": str(b),
            "slices": [{"sources": [src(b, 0, 4), src(f1, 0, 4)]}],
            "parameters": {"t": LAZY_SLERP_T},
        },
        # two slices with their own t, one of a single layer (t = 1 there)
        "slerp_two_slices": {
            "merge_method": "slerp",
            "base_model": str(b),
            "slices": [
                {"sources": [src(b, 0, 3), src(f2, 0, 3)], "parameters": {"t": [0.2, 0.8]}},
                {"sources": [src(b, 3, 4), src(f2, 3, 4)], "parameters": {"t": [0.1, 0.9]}},
            ],
        },
        "ties_per_slice_parameters": {
            "merge_method": "ties",
            "base_model": str(b),
            "slices": [
                {
                    "sources": [src(b, 0, 2), src(f1, 0, 2, weight=0.7), src(f2, 0, 2)],
                    "parameters": {"density": 0.3},
                },
                {
                    "sources": [src(b, 2, 4), src(f1, 2, 4), src(f2, 2, 4, density=[0.2, 0.9])],
                    "parameters": {"density": 0.6, "normalize": False},
                },
            ],
            "parameters": {"weight": 0.5, "lambda": 0.9},
        },
        "task_arithmetic_shifted_layers": {
            "merge_method": "task_arithmetic",
            "base_model": str(b),
            "slices": [
                {"sources": [src(b, 1, 4), src(f1, 0, 3), src(f3, 1, 4, weight=[0.2, 1.0])]}
            ],
        },
        "linear_gradient_over_a_slice": {
            "merge_method": "linear",
            "slices": [
                {"sources": [src(f1, 0, 2, weight=[1.0, 0.0]), src(f2, 0, 2, weight=[0.0, 1.0])]},
                {"sources": [src(f3, 1, 4)]},
            ],
        },
        "breadcrumbs_over_slices": {
            "merge_method": "breadcrumbs",
            "base_model": str(b),
            "slices": [{"sources": [src(b, 0, 4), src(f1, 0, 4), src(f2, 0, 4)]}],
            "parameters": {"density": 0.8, "gamma": 0.05},
        },
        "model_stock_over_slices": {
            "merge_method": "model_stock",
            "base_model": str(b),
            "slices": [{"sources": [src(b, 0, 2), src(f1, 0, 2), src(f2, 0, 2)]},
                       {"sources": [src(b, 2, 4), src(f2, 2, 4), src(f3, 2, 4)]}],
        },
    }  # fmt: skip


CASES = [
    "slerp_lazymergekit",
    "slerp_two_slices",
    "ties_per_slice_parameters",
    "task_arithmetic_shifted_layers",
    "linear_gradient_over_a_slice",
    "breadcrumbs_over_slices",
    "model_stock_over_slices",
]


@pytest.mark.parametrize("case", CASES)
def test_a_sliced_merge_matches_the_sliced_reference(
    case: str, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = sliced_cases(llama_family)[case]

    out = merge(recipe, tmp_path / "out")

    assert_matches_reference(out, reference_sliced_merge(recipe, SEED), out_dir=tmp_path / "out")


def test_one_slice_over_every_layer_is_the_whole_model_merge(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    b, f1 = llama_family["base"], llama_family["ft1"]
    sliced = sliced_cases(llama_family)["slerp_lazymergekit"]
    whole = {**sliced, "models": [{"model": str(b)}, {"model": str(f1)}]}
    del whole["slices"]

    a, c = merge(sliced, tmp_path / "a"), merge(whole, tmp_path / "b")

    assert set(a) == set(c) and all(torch.equal(a[n], c[n]) for n in a)


def test_random_methods_over_slices_are_reproducible_with_the_inputs_shapes(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    b, f1, f2 = llama_family["base"], llama_family["ft1"], llama_family["ft2"]
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(b),
        "slices": [
            {"sources": [src(b, 0, 2), src(f1, 0, 2), src(f2, 0, 2)]},
            {"sources": [src(b, 1, 3), src(f1, 2, 4), src(f2, 2, 4)]},
        ],
        "parameters": {"density": 0.5},
    }

    one, two = merge(recipe, tmp_path / "a"), merge(recipe, tmp_path / "b")

    assert set(one) == set(two) and all(torch.equal(one[n], two[n]) for n in one)
    base = load_checkpoint(b)
    assert one[layer("mlp.up_proj.weight", 3)].shape == base[layer("mlp.up_proj.weight", 3)].shape
    assert len([n for n in one if ".layers." in n]) == 4 * len(
        [n for n in base if n.startswith("model.layers.0.")]
    )


def test_gpt2_layers_slice_and_the_config_counts_them(
    gpt2_family: dict[str, Path], tmp_path: Path
) -> None:
    b, f1 = gpt2_family["base"], gpt2_family["ft1"]
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [src(f1, 0, 2)]}, {"sources": [src(b, 1, 3)]}],
    }

    out = merge(recipe, tmp_path / "out")

    fb, ff = load_checkpoint(b), load_checkpoint(f1)
    h = next(n for n in fb if ".h.0." in n)
    prefix, rest = h.split(".h.0.")
    assert torch.equal(out[f"{prefix}.h.1.{rest}"], ff[f"{prefix}.h.1.{rest}"])
    assert torch.equal(out[f"{prefix}.h.2.{rest}"], fb[f"{prefix}.h.1.{rest}"])
    assert torch.equal(out[f"{prefix}.h.3.{rest}"], fb[f"{prefix}.h.2.{rest}"])
    wte = next(n for n in fb if "wte" in n)
    assert torch.equal(out[wte], ff[wte])  # the first slice's embeddings
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["n_layer"] == 4


def test_per_layer_config_lists_follow_the_slices(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    copies = {}
    for name in ("base", "ft1"):
        copy = tmp_path / name
        copy.mkdir()
        for f in llama_family[name].iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        config = json.loads((copy / "config.json").read_text())
        config["layer_types"] = [f"{name}-{i}" for i in range(4)]
        (copy / "config.json").write_text(json.dumps(config))
        copies[name] = copy
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [src(copies["ft1"], 2, 4)]},
            {"sources": [src(copies["base"], 0, 3)]},
        ],
    }

    merge(recipe, tmp_path / "out")

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert config["layer_types"] == ["ft1-2", "ft1-3", "base-0", "base-1", "base-2"]


# ---- bad slices --------------------------------------------------------------------------------


def refusal(recipe: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe)
    return str(info.value)


def test_bad_slices_are_refused_naming_the_field(llama_family: dict[str, Path]) -> None:
    b, f1 = llama_family["base"], llama_family["ft1"]

    assert refusal(
        {
            "merge_method": "slerp",
            "base_model": str(b),
            "parameters": {"t": 0.5},
            "slices": [{"sources": [src(b, 0, 4), src(f1, 0, 3)]}],
        }
    ).startswith("slices[0].sources[1].layer_range: spans 3 layers but the slice's first")
    assert refusal(
        {"merge_method": "passthrough", "slices": [{"sources": [src(b, 2, 2)]}]}
    ).startswith("slices[0].sources[0].layer_range: [2, 2] is empty")
    assert "slices[0].sources: 'passthrough' needs exactly 1 source(s), got 2" in refusal(
        {"merge_method": "passthrough", "slices": [{"sources": [src(b, 0, 2), src(f1, 0, 2)]}]}
    )
    assert "slices[0].sources: the base model" in refusal(
        {"merge_method": "ties", "base_model": str(b), "slices": [{"sources": [src(f1, 0, 2)]}]}
    )
    assert refusal(
        {"merge_method": "linear", "models": [{"model": str(b)}],
         "slices": [{"sources": [src(b, 0, 2)]}]}
    ).startswith("slices: a recipe lists either whole 'models' or layer 'slices'")  # fmt: skip
    assert refusal(
        {
            "merge_method": "pcb",
            "base_model": str(b),
            "slices": [{"sources": [src(b, 0, 2), src(f1, 0, 2)]}],
        }
    ).startswith("merge_method: 'pcb' with these settings computes statistics over whole")
    assert refusal(
        {"merge_method": "ties", "base_model": str(b), "parameters": {"scope": "global"},
         "slices": [{"sources": [src(b, 0, 2), src(f1, 0, 2)]}]}
    ).startswith("parameters.scope: 'ties' with these settings")  # fmt: skip
    assert refusal(
        {"merge_method": "ties", "base_model": str(b),
         "slices": [{"sources": [src(b, 0, 2), src(f1, 0, 2, lamda=1)]}]}
    ).startswith("slices[0].sources[1].parameters.lamda: unknown parameter for 'ties'")  # fmt: skip
    assert refusal(
        {"merge_method": "slerp", "base_model": str(b),
         "slices": [{"sources": [src(b, 0, 2), src(f1, 0, 2)], "parameters": {"t": 2}}]}
    ).startswith("slices[0].parameters.t: must be ≤ 1")  # fmt: skip


def test_a_layer_range_past_the_models_layers_is_refused_naming_source_and_model(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    b, f1 = llama_family["base"], llama_family["ft1"]
    recipe = {
        "merge_method": "ties",
        "base_model": str(b),
        "slices": [{"sources": [src(b, 2, 6), src(f1, 2, 6)]}],
    }

    with pytest.raises(InputError) as info:
        run_merge(parse_recipe(recipe), tmp_path / "out")

    e = info.value
    assert e.field == "slices[0].sources[0].layer_range" and e.model == str(b)
    assert "reaches past the model's 4 layers (0 to 3)" in str(e)
    assert not (tmp_path / "out").exists()


def test_a_tensor_outside_known_layouts_is_refused_naming_it(tmp_path: Path) -> None:
    model = tmp_path / "odd"
    model.mkdir()
    weights = {
        "encoder.layers.0.w": torch.ones(2, 2),
        "encoder.layers.1.w": torch.ones(2, 2),
        "projector.weight": torch.ones(2, 2),
    }
    save_file(weights, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [src(model, 0, 2)]}]}

    with pytest.raises(InputError) as info:
        run_merge(parse_recipe(recipe), tmp_path / "out")

    assert info.value.tensor == "projector.weight" and info.value.model == str(model)
    assert "cannot place this tensor in a sliced output" in str(info.value)
    assert load_file(str(model / "model.safetensors")).keys() == weights.keys()


# ---- through the API -------------------------------------------------------------------------


def test_the_api_pins_every_slice_source_and_points_at_a_refused_one(api: ApiHarness) -> None:
    api.publish("soup", {"model.safetensors": b"weights"})
    recipe = {
        "merge_method": "slerp",
        "base_model": "s3://models/base",
        "slices": [
            {"sources": [
                {"model": "s3://models/base", "layer_range": [0, 2]},
                {"model": "artifact://soup", "layer_range": [0, 2]},
            ]},
            {"sources": [
                {"model": "s3://models/base", "layer_range": [2, 4]},
                {"model": "s3://models/math", "layer_range": [2, 4]},
            ], "parameters": {"t": [0.1, 0.9]}},
        ],
        "parameters": {"t": 0.5},
    }  # fmt: skip

    accepted = api.submit(merge_job(recipe))

    assert accepted.status_code == 202, accepted.text
    pinned = accepted.json()["recipe"]
    assert pinned["slices"][0]["sources"][1]["model"] == "artifact://soup@1"
    assert pinned["slices"][1]["parameters"] == {"t": [0.1, 0.9]}
    ungranted = json.loads(json.dumps(recipe))
    ungranted["slices"][1]["sources"][1]["model"] = "s3://elsewhere/math"
    body = assert_problem(api.submit(merge_job(ungranted)), 422)
    assert body["errors"][0]["pointer"] == "/recipe/slices/1/sources/1/model"
    bad_range = json.loads(json.dumps(recipe))
    bad_range["slices"][0]["sources"][1]["layer_range"] = [0, 3]
    body = assert_problem(api.submit(merge_job(bad_range)), 422)
    assert body["errors"][0]["pointer"] == "/recipe/slices/0/sources/1/layer_range"


# ---- other decoder layouts ---------------------------------------------------------------------


def tiny(kind: str, target: Path, seed: int) -> Path:
    """A randomly initialised tiny Qwen2 (q/k/v biases, per-layer ``layer_types``) or Mistral."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common: dict[str, Any] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "qwen2":
            types = ["full_attention", "sliding_attention"] * 2
            config = Qwen2Config(**common, layer_types=types, use_sliding_window=True)
            model: Any = Qwen2ForCausalLM(config)
        else:
            model = MistralForCausalLM(MistralConfig(**common))
    model.eval().save_pretrained(str(target))
    return target


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_qwen2_and_mistral_frankenmerges_load_and_keep_each_layers_tensors(
    kind: str, tmp_path: Path
) -> None:
    a, b = tiny(kind, tmp_path / "a", 1), tiny(kind, tmp_path / "b", 2)
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [src(a, 0, 3)]},
            {"sources": [src(b, 1, 4)]},
            {"sources": [src(a, 3, 4)]},
        ],
    }

    out = merge(recipe, tmp_path / "out")

    ta, tb = load_checkpoint(a), load_checkpoint(b)
    names = [n.removeprefix("model.layers.0.") for n in ta if n.startswith("model.layers.0.")]
    sources = [(ta, 0), (ta, 1), (ta, 2), (tb, 1), (tb, 2), (tb, 3), (ta, 3)]
    for k, (sd, i) in enumerate(sources):
        for rest in names:
            assert torch.equal(out[layer(rest, k)], sd[layer(rest, i)]), (k, rest)
    assert torch.equal(out["model.norm.weight"], ta["model.norm.weight"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 7
    if kind == "qwen2":
        assert "model.layers.4.self_attn.q_proj.bias" in out
        assert config["layer_types"] == [
            "full_attention", "sliding_attention", "full_attention",  # a: 0-2
            "sliding_attention", "full_attention", "sliding_attention",  # b: 1-3
            "sliding_attention",  # a: 3
        ]  # fmt: skip
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_a_slice_source_may_be_a_lora_adapter_on_its_base(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    from testbed.tiny_models import build_lora_adapter
    from tests.support.lora import peft_merged

    base = llama_family["base"]
    adapter = build_lora_adapter(
        base, tmp_path / "adapter", 3, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]
    )
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [src(base, 0, 2)]},
            {"sources": [{"model": f"{base}+{adapter}", "layer_range": [1, 4]}]},
        ],
    }

    result = run_merge(parse_recipe(recipe), tmp_path / "out", seed=SEED)

    out, merged, b = tensors(tmp_path / "out"), peft_merged(base, adapter), load_checkpoint(base)
    for k, i in ((2, 1), (3, 2), (4, 3)):  # output layers 2-4: the adapted layers 1-3
        for rest in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"):
            torch.testing.assert_close(
                out[layer(rest, k)], merged[layer(rest, i)], rtol=1e-6, atol=1e-7
            )
    assert torch.equal(
        out[layer("self_attn.q_proj.weight", 1)], b[layer("self_attn.q_proj.weight", 1)]
    )
    parents = [(p["role"], p["reference"]) for p in result.manifest["parents"]]
    assert parents == [("model", str(base)), ("adapter", str(adapter))]


def test_a_sliced_merge_job_runs_on_a_worker_and_publishes_the_stacked_layers(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    from tests.support.jobs import run_local_job

    base, ft1 = llama_family["base"], llama_family["ft1"]
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [src(base, 0, 2)]}, {"sources": [src(ft1, 1, 4)]}],
    }

    job, folder = run_local_job(tmp_path, recipe, "stacked")

    assert folder is not None, job.error
    out, b, f = tensors(folder), load_checkpoint(base), load_checkpoint(ft1)
    name = "mlp.down_proj.weight"
    assert torch.equal(out[layer(name, 1)], b[layer(name, 1)])
    assert torch.equal(out[layer(name, 2)], f[layer(name, 1)])
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 5
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [p["reference"] for p in manifest["parents"]] == [str(base), str(ft1)]
