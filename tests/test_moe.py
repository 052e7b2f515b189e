"""``kind: moe`` (workers/moe): dense fine-tunes of a tiny real Llama assembled into a Mixtral
mixture of experts. The output is compared with its inputs tensor by tensor, its routers with
an independent float64 recomputation (tests/support/moe.py), and it is loaded and run by
transformers' MixtralForCausalLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, MixtralForCausalLM, Qwen2MoeForCausalLM

from schemas.moe_recipe import parse_moe_recipe
from schemas.recipe import RecipeError
from testbed.tiny_models import build_gpt2_base, build_llama_base
from tests.support.moe import (
    DOMAINS,
    WEIGHTS,
    build_experts,
    build_llama_variant,
    build_qwen2_base,
    domain_prompts,
    load_output,
    moe_recipe,
    reference_cheap_embed_gates,
    reference_hidden_gates,
    write_recipe,
)
from workers.errors import CancelledError, InputError
from workers.merge.progress import Progress
from workers.moe import MoeResult, run_moe

REPO = Path(__file__).resolve().parents[1]
LAYERS = 4
MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    tmp = tmp_path_factory.mktemp("moe-models")
    base = build_llama_base(tmp / "base", seed=7)
    return base, build_experts(base, tmp, 3)


@pytest.fixture(scope="module")
def hidden_moe(
    models: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, MoeResult]:
    base, experts = models
    out = tmp_path_factory.mktemp("moe-out") / "moe"
    return out, run_moe(parse_moe_recipe(moe_recipe(base, experts)), out)


def assemble(recipe: dict[str, Any], out: Path, **kw: Any) -> MoeResult:
    return run_moe(parse_moe_recipe(recipe), out, **kw)


# ---- the output ------------------------------------------------------------------------------


def test_the_moe_loads_as_mixtral_and_generates(
    models: tuple[Path, list[Path]], hidden_moe: tuple[Path, MoeResult]
) -> None:
    _, experts = models
    out, _ = hidden_moe
    model, info = MixtralForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    # transformers' own view of expert 1 of layer 2 is expert 1's MLP
    src = load_file(str(experts[1] / WEIGHTS))
    p = "model.layers.2.mlp."
    gate_up = model.model.layers[2].mlp.experts.gate_up_proj[1]
    want = torch.cat([src[p + "gate_proj.weight"], src[p + "up_proj.weight"]])
    assert torch.equal(gate_up, want)
    assert torch.equal(model.model.layers[2].mlp.experts.down_proj[1], src[p + "down_proj.weight"])
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([[tok.bos_token_id, *tok.encode("w10 w11 w12", add_special_tokens=False)]])
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert generated.shape == (1, ids.shape[1] + 5)
    assert torch.equal(generated[:, : ids.shape[1]], ids)


def test_experts_hold_the_source_mlps_and_every_other_tensor_is_the_base(
    models: tuple[Path, list[Path]], hidden_moe: tuple[Path, MoeResult]
) -> None:
    base, experts = models
    out, _ = hidden_moe
    got = load_output(out)
    base_t = load_file(str(base / WEIGHTS))
    sources = [load_file(str(e / WEIGHTS)) for e in experts]
    expected: dict[str, torch.Tensor] = {}
    for name, t in base_t.items():
        if ".mlp." not in name:
            expected[name] = t
    for layer in range(LAYERS):
        for e, src in enumerate(sources):
            for w, proj in MLP.items():
                key = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                expected[key] = src[f"model.layers.{layer}.mlp.{proj}.weight"]
    routers = {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(LAYERS)}
    assert set(got) == set(expected) | routers
    for name, want in expected.items():
        assert torch.equal(got[name], want), name
    # the experts really differ from the base (the fine-tunes changed their MLPs)
    assert not torch.equal(
        sources[0]["model.layers.0.mlp.up_proj.weight"], base_t["model.layers.0.mlp.up_proj.weight"]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert (out / "tokenizer.json").is_file()


def test_hidden_routers_are_the_normalised_mean_last_token_states_of_the_prompts(
    models: tuple[Path, list[Path]], hidden_moe: tuple[Path, MoeResult]
) -> None:
    base, experts = models
    out, result = hidden_moe
    got = load_output(out)
    want = reference_hidden_gates(base, moe_recipe(base, experts)["experts"])
    for layer in range(LAYERS):
        gate = got[f"model.layers.{layer}.block_sparse_moe.gate.weight"].double()
        assert gate.shape == (3, 64)
        assert torch.allclose(gate, want[layer], atol=1e-6, rtol=0), layer
    assert len(result.metrics["router_condition_numbers"]) == LAYERS
    assert result.manifest["kind"] == "moe"
    roles = [p["role"] for p in result.manifest["parents"]]
    assert roles == ["base", "expert", "expert", "expert"]


@pytest.mark.parametrize("mode", ["hidden_avg", "hidden_last"])
def test_hidden_avg_averages_each_prompt_and_hidden_last_is_hidden(
    models: tuple[Path, list[Path]], tmp_path: Path, mode: str
) -> None:
    base, experts = models
    recipe = moe_recipe(base, experts[:2], experts_per_token=1, gate_mode=mode)
    assemble(recipe, tmp_path / "moe")
    got = load_output(tmp_path / "moe")
    want = reference_hidden_gates(base, recipe["experts"], average=mode == "hidden_avg")
    other = reference_hidden_gates(base, recipe["experts"], average=mode != "hidden_avg")
    for layer in range(LAYERS):
        gate = got[f"model.layers.{layer}.block_sparse_moe.gate.weight"].double()
        assert torch.allclose(gate, want[layer], atol=1e-6, rtol=0), layer
        assert not torch.allclose(gate, other[layer], atol=1e-3, rtol=0), layer  # not the other


def test_negative_prompts_are_subtracted_before_normalising(
    models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = models
    recipe = moe_recipe(base, experts[:2], experts_per_token=1)
    recipe["experts"][0]["negative_prompts"] = domain_prompts(2, 2)
    assemble(recipe, tmp_path / "moe")
    got = load_output(tmp_path / "moe")
    want = reference_hidden_gates(base, recipe["experts"])
    for layer in range(LAYERS):
        gate = got[f"model.layers.{layer}.block_sparse_moe.gate.weight"].double()
        assert torch.allclose(gate, want[layer], atol=1e-6, rtol=0), layer


def test_a_prompt_of_one_domain_routes_mostly_to_its_expert(
    hidden_moe: tuple[Path, MoeResult],
) -> None:
    out, _ = hidden_moe
    model = MixtralForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    for domain, words in enumerate(DOMAINS):
        # the domain's words in an order no prompt had
        text = " ".join([*reversed(words), words[1], words[0], words[2]])
        ids = [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]
        with torch.no_grad():
            output = model(torch.tensor([ids]), output_router_logits=True)
        logits = torch.stack([r.reshape(len(ids), 3) for r in output.router_logits])
        top1 = logits[:, 1:].argmax(dim=-1)  # every layer, every token after BOS
        share = float((top1 == domain).float().mean())
        assert share >= 0.8, (domain, share, top1)


def test_cheap_embed_routers_are_the_prompts_token_embeddings_in_every_layer(
    models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = models
    recipe = moe_recipe(base, experts, gate_mode="cheap_embed")
    recipe["experts"][1]["negative_prompts"] = ["w200 w10"]
    assemble(recipe, tmp_path / "moe")
    got = load_output(tmp_path / "moe")
    want = reference_cheap_embed_gates(base, recipe["experts"])
    for layer in range(LAYERS):
        gate = got[f"model.layers.{layer}.block_sparse_moe.gate.weight"].double()
        assert torch.allclose(gate, want, atol=1e-6, rtol=0), layer


def test_random_routers_are_seeded_standard_normal(
    models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = models
    recipe = moe_recipe(base, experts, gate_mode="random", seed=5)
    for e in recipe["experts"]:
        del e["positive_prompts"]  # random needs no prompts
    gates = []
    for i, seed in enumerate((5, 5, 6)):
        assemble({**recipe, "seed": seed}, tmp_path / f"moe{i}")
        got = load_output(tmp_path / f"moe{i}")
        gates.append(
            torch.stack(
                [got[f"model.layers.{n}.block_sparse_moe.gate.weight"] for n in range(LAYERS)]
            )
        )
    assert torch.equal(gates[0], gates[1]) and not torch.equal(gates[0], gates[2])
    g = gates[0].double()
    assert g.shape == (LAYERS, 3, 64)
    assert abs(float(g.mean())) < 0.1 and abs(float(g.std()) - 1) < 0.1  # 768 draws


def test_dtype_sets_every_tensor_and_the_config(
    models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = models
    assemble(
        moe_recipe(base, experts[:2], dtype="bfloat16", gate_mode="cheap_embed"), tmp_path / "m"
    )
    got = load_output(tmp_path / "m")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    src = load_file(str(experts[1] / WEIGHTS))["model.layers.3.mlp.down_proj.weight"]
    assert torch.equal(got["model.layers.3.block_sparse_moe.experts.1.w2.weight"], src.bfloat16())
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"


# ---- Qwen2 → Qwen2-MoE --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    tmp = tmp_path_factory.mktemp("moe-qwen")
    base = build_qwen2_base(tmp / "base", seed=9)
    return base, build_experts(base, tmp, 3)  # two routed experts and the shared one


def qwen_recipe(base: Path, experts: list[Path], **extra: Any) -> dict[str, Any]:
    recipe = moe_recipe(base, experts[:2], **extra)
    shared = {"source_model": str(experts[2]), "positive_prompts": domain_prompts(2)}
    recipe["shared_experts"] = [shared]
    return recipe


def test_qwen2_experts_make_a_qwen2_moe_that_loads_and_generates(
    qwen_models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = qwen_models
    recipe = qwen_recipe(base, experts)
    result = assemble(recipe, tmp_path / "moe")
    assert result.metrics["architecture"] == "Qwen2-MoE" and result.metrics["shared_experts"] == 1
    got = load_output(tmp_path / "moe")
    base_t = load_file(str(base / WEIGHTS))
    sources = [load_file(str(e / WEIGHTS)) for e in experts]
    want_gates = reference_hidden_gates(base, [*recipe["experts"], *recipe["shared_experts"]])
    expected = {n: t for n, t in base_t.items() if ".mlp." not in n}
    assert any(n.endswith("q_proj.bias") for n in expected)  # Qwen2's biases, from the base
    for layer in range(LAYERS):
        p = f"model.layers.{layer}.mlp."
        for proj in MLP.values():
            for e in range(2):
                expected[f"{p}experts.{e}.{proj}.weight"] = sources[e][f"{p}{proj}.weight"]
            expected[f"{p}shared_expert.{proj}.weight"] = sources[2][f"{p}{proj}.weight"]
        gate, shared_gate = got[p + "gate.weight"].double(), got[p + "shared_expert_gate.weight"]
        assert torch.allclose(gate, want_gates[layer, :2], atol=1e-6, rtol=0), layer
        assert torch.allclose(shared_gate.double(), want_gates[layer, 2:], atol=1e-6, rtol=0)
    assert set(got) - set(expected) == {
        f"model.layers.{i}.mlp.{g}.weight"
        for i in range(LAYERS)
        for g in ("gate", "shared_expert_gate")
    }
    for name, want in expected.items():
        assert torch.equal(got[name], want), name

    model, info = Qwen2MoeForCausalLM.from_pretrained(
        str(tmp_path / "moe"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    c = model.config
    assert (c.num_experts, c.num_experts_per_tok, c.decoder_sparse_step) == (2, 2, 1)
    assert c.moe_intermediate_size == c.shared_expert_intermediate_size == 128
    mlp = model.model.layers[1].mlp
    p = "model.layers.1.mlp."
    assert torch.equal(
        mlp.experts.gate_up_proj[1],
        torch.cat([sources[1][p + "gate_proj.weight"], sources[1][p + "up_proj.weight"]]),
    )
    assert torch.equal(mlp.shared_expert.down_proj.weight, sources[2][p + "down_proj.weight"])
    ids = torch.tensor([[1, 14, 15, 16]])
    generated = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


def test_qwen2_needs_exactly_one_shared_expert(
    qwen_models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = qwen_models
    with pytest.raises(InputError) as err:
        assemble(moe_recipe(base, experts[:2]), tmp_path / "moe")
    assert err.value.field == "shared_experts"
    assert "qwen2 inputs make a Qwen2-MoE, which has exactly one shared expert" in str(err.value)
    assert not (tmp_path / "moe").exists()


# ---- progress and cancel ---------------------------------------------------------------------


def test_progress_covers_the_prompts_and_every_tensor_and_cancel_leaves_nothing(
    models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = models
    seen: list[Progress] = []
    assemble(moe_recipe(base, experts), tmp_path / "moe", progress=seen.append)
    phases = [p.phase for p in seen]
    assert phases[0] == "resolve" and phases[-1] == "publish"
    assert {"router", "assemble"} <= set(phases)
    last = seen[-1]
    # 12 prompts, then 67 output tensors (4 routers, 36 expert matrices, 27 of the base)
    assert last.tensors_done == last.tensors_total == 12 + 67
    assert last.bytes_done == last.bytes_total > 0

    count = 0

    def cancel_midway() -> bool:
        nonlocal count
        count += 1
        return count > 20

    with pytest.raises(CancelledError):
        assemble(moe_recipe(base, experts), tmp_path / "cancelled", cancelled=cancel_midway)
    assert not (tmp_path / "cancelled").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["moe"]  # no staging folder left


# ---- errors ----------------------------------------------------------------------------------


def test_bad_recipes_are_refused_naming_the_field(models: tuple[Path, list[Path]]) -> None:
    base, experts = models
    cases: list[tuple[dict[str, Any], str]] = [
        (moe_recipe(base, experts[:2], experts_per_token=3), "experts_per_token: 3 is more than"),
        (moe_recipe(base, experts, experts_per_token=0), "experts_per_token: Input should be"),
        (moe_recipe(base, experts, gate_mode="uniform_random"), "gate_mode: Input should be"),
        (
            moe_recipe(base, experts, shared_experts=[{"source_model": str(experts[0])}] * 2),
            "shared_experts: List should have at most 1 item",
        ),
        (
            moe_recipe(base, experts, shared_experts=[{"source_model": str(experts[0])}]),
            "shared_experts[0].positive_prompts: gate_mode hidden makes each",
        ),
        (moe_recipe(base, []), "experts: List should have at least 1 item"),
        (moe_recipe(base, experts, architecture="mixtral"), "architecture: unknown field"),
    ]
    no_prompts = moe_recipe(base, experts)
    del no_prompts["experts"][1]["positive_prompts"]
    cases.append((no_prompts, "experts[1].positive_prompts: gate_mode hidden makes each"))
    same = moe_recipe(base, experts)
    for e in same["experts"]:
        e["positive_prompts"] = ["w1 w2"]
    cases.append((same, "experts: every expert has the same prompts"))
    for recipe, message in cases:
        with pytest.raises(RecipeError) as err:
            parse_moe_recipe(recipe)
        assert message in str(err.value), (message, str(err.value))


def test_an_expert_with_other_mlp_shapes_is_named_with_its_tensor(
    models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = models
    wide = build_llama_variant(tmp_path / "wide", seed=3, intermediate_size=96)
    with pytest.raises(InputError) as err:
        assemble(moe_recipe(base, [experts[0], wide]), tmp_path / "moe")
    e = err.value
    assert (
        e.field == "experts[1].source_model" and e.tensor == "model.layers.0.mlp.down_proj.weight"
    )
    assert "shape (64, 96) differs from the base's (64, 128)" in str(e)
    assert not (tmp_path / "moe").exists()

    shallow = build_llama_variant(tmp_path / "shallow", seed=3, num_hidden_layers=2)
    with pytest.raises(InputError) as err:
        assemble(moe_recipe(base, [shallow, experts[0]]), tmp_path / "moe")
    assert err.value.field == "experts[0].source_model"
    assert err.value.tensor == "model.layers.2.mlp.down_proj.weight"  # checkpoint order


def test_an_unsupported_architecture_is_refused_listing_the_supported_ones(
    models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = models
    gpt2 = build_gpt2_base(tmp_path / "gpt2", seed=1)
    with pytest.raises(InputError) as err:
        assemble(moe_recipe(gpt2, experts[:2]), tmp_path / "moe")
    assert err.value.field == "base_model"
    assert "model_type 'gpt2' cannot be assembled" in str(err.value)
    assert "supported: llama (→ Mixtral), mistral (→ Mixtral), qwen2 (→ Qwen2-MoE)" in str(
        err.value
    )

    with pytest.raises(InputError) as err:
        assemble(moe_recipe(base, [experts[0], gpt2]), tmp_path / "moe")
    assert err.value.field == "experts[1].source_model"
    assert "differs from the base's 'llama'" in str(err.value)

    shared = [{"source_model": str(experts[2]), "positive_prompts": ["w1"]}]
    with pytest.raises(InputError) as err:
        assemble(moe_recipe(base, experts[:2], shared_experts=shared), tmp_path / "moe")
    assert err.value.field == "shared_experts"
    assert "llama inputs make a Mixtral, which has no shared expert" in str(err.value)
    assert not (tmp_path / "moe").exists()


def test_a_non_empty_output_directory_is_refused(
    models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = models
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "keep").write_text("x")
    with pytest.raises(InputError, match="already exists and is not empty"):
        assemble(moe_recipe(base, experts), tmp_path / "moe")
    assert [p.name for p in (tmp_path / "moe").iterdir()] == ["keep"]


# ---- the command line ------------------------------------------------------------------------


def test_cli_moe_assembles_and_names_a_bad_field(
    models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = models
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    recipe = write_recipe(tmp_path, moe_recipe(base, experts[:2], gate_mode="cheap_embed"))
    run = subprocess.run(
        [sys.executable, "-m", "weightsmith", "moe", str(recipe), "--out", "moe"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert "assembled a Mixtral MoE" in run.stdout and "2 experts, 2 per token" in run.stdout
    assert (tmp_path / "moe" / "manifest.json").is_file()

    bad = write_recipe(tmp_path, moe_recipe(base, experts[:2], experts_per_token=5), "bad.yaml")
    run = subprocess.run(
        [sys.executable, "-m", "weightsmith", "moe", str(bad), "--out", "x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 2 and "experts_per_token: 5 is more than the 2" in run.stderr
    assert not (tmp_path / "x").exists()


def test_unusable_prompts_tokenizers_and_biases_are_named(
    models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = models
    blank = moe_recipe(base, experts[:2])
    blank["experts"][1]["negative_prompts"] = ["   "]
    with pytest.raises(InputError) as err:
        assemble(blank, tmp_path / "moe")
    assert err.value.field == "experts[1].negative_prompts[0]" and "has no tokens" in str(err.value)

    long = moe_recipe(base, experts[:2])
    long["experts"][0]["positive_prompts"] = ["w5 " * 200]
    with pytest.raises(InputError) as err:
        assemble(long, tmp_path / "moe")
    assert err.value.field == "experts[0].positive_prompts[0]"
    assert "201 tokens, more than the base's max_position_embeddings (128)" in str(err.value)

    bare = tmp_path / "bare"  # the base without its tokenizer files
    bare.mkdir()
    for name in ("config.json", WEIGHTS):
        (bare / name).write_bytes((base / name).read_bytes())
    with pytest.raises(InputError) as err:
        assemble(moe_recipe(bare, experts[:2], gate_mode="cheap_embed"), tmp_path / "moe")
    assert err.value.field == "base_model" and "tokenizer cannot be loaded" in str(err.value)
    assemble(moe_recipe(bare, experts[:2], gate_mode="random"), tmp_path / "random")  # no need

    biased = build_llama_variant(tmp_path / "biased", seed=4, attention_bias=True)
    with pytest.raises(InputError) as err:
        assemble(moe_recipe(biased, experts[:2], gate_mode="random"), tmp_path / "moe")
    assert err.value.field == "base_model" and err.value.tensor.endswith("self_attn.k_proj.bias")
    assert "Mixtral has no bias terms here" in str(err.value)

    adapter_base = moe_recipe(base, experts[:2])
    adapter_base["base_model"] = f"{base}+{experts[0]}"
    with pytest.raises(RecipeError, match="base_model: a BASE\\+ADAPTER base cannot make hidden"):
        parse_moe_recipe(adapter_base)
    assert not (tmp_path / "moe").exists()


def test_a_base_layer_without_one_of_its_mlp_weights_is_named(
    models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = models
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((base / "config.json").read_bytes())
    weights = load_file(str(base / WEIGHTS))
    del weights["model.layers.2.mlp.gate_proj.weight"]
    save_file(weights, str(partial / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(InputError) as err:
        assemble(moe_recipe(partial, experts[:2], gate_mode="random"), tmp_path / "moe")
    assert err.value.field == "base_model"
    assert err.value.tensor == "model.layers.2.mlp.gate_proj.weight"
    assert not (tmp_path / "moe").exists()
