"""LoRA adapters as merge inputs: ``model: BASE+ADAPTER``.

The expectation is always PEFT's own ``merge_and_unload`` of a real adapter made with
``peft.get_peft_model`` (tests/support/lora.py); weightsmith applies ΔW per tensor as it
reads, without loading the model or writing a merged copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from schemas.edit_recipe import EditRecipe
from schemas.recipe import RecipeError, parse_recipe
from schemas.references import ReferenceError_, parse_reference
from testbed.tiny_models import build_gpt2_base, build_llama_base, build_lora_adapter
from tests.support.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    edit_adapter_config,
    peft_merged,
    rename_adapter_tensors,
    replace_adapter_tensor,
)
from tests.support.merge_cases import engine
from workers.errors import CheckpointError
from workers.merge.blocks import block_ranges
from workers.tensors.lora import LoraCheckpointReader
from workers.tensors.reader import CheckpointReader

LLAMA_LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
    modules_to_save=["lm_head"],
    rank_pattern={"layers.1.self_attn.q_proj": 2},
    alpha_pattern={"down_proj": 3},
)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama_base(tmp_path_factory.mktemp("lora") / "base", seed=11)


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2_base(tmp_path_factory.mktemp("lora") / "gpt2", seed=12)


def adapter_for(base: Path, tmp_path: Path, seed: int = 5, **config: object) -> Path:
    return build_lora_adapter(base, tmp_path / f"adapter-{seed}", seed, **(LLAMA_LORA | config))


def open_composed(base: Path, adapter: Path) -> LoraCheckpointReader:
    return LoraCheckpointReader(CheckpointReader(base), adapter, label=f"{base}+{adapter}")


def read_all(reader: LoraCheckpointReader) -> dict[str, torch.Tensor]:
    return {name: reader.read(name) for name in reader.names}


def read_streamed(reader: LoraCheckpointReader, block: int) -> dict[str, torch.Tensor]:
    """Every tensor read in flat blocks of ``block`` elements (blocks cross rows)."""
    out = {}
    for name in reader.names:
        info = reader.info(name)
        flat = torch.empty(info.numel, dtype=info.torch_dtype)
        for start, stop in block_ranges(info.numel, block):
            reader.read_into(name, start, flat[start:stop])
        out[name] = flat.reshape(info.shape)
    return out


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7, msg=name)


# ---- the math, against PEFT's merge_and_unload ------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_llama_adapter_read_equals_peft_merge_and_unload(
    llama_base: Path, tmp_path: Path, use_rslora: bool
) -> None:
    adapter = adapter_for(llama_base, tmp_path, use_rslora=use_rslora)
    want = peft_merged(llama_base, adapter)
    base = CheckpointReader(llama_base)
    with open_composed(llama_base, adapter) as reader:
        got = read_all(reader)
        # the adapter changed what it targets (and nothing else): the test is not vacuous
        changed = {n for n in got if not torch.equal(got[n], base.read(n))}
        assert set(reader.modules) <= changed <= set(reader.modules) | set(reader.replaced)
        assert "lm_head.weight" in reader.replaced
        assert "model.layers.1.mlp.down_proj.weight" in reader.modules
    base.close()
    assert_same_tensors(got, want)


def test_rank_and_alpha_patterns_and_rslora_set_each_modules_scale(
    llama_base: Path, tmp_path: Path
) -> None:
    adapter = adapter_for(llama_base, tmp_path, use_rslora=True)
    with open_composed(llama_base, adapter) as reader:
        q1 = reader.modules["model.layers.1.self_attn.q_proj.weight"]
        q0 = reader.modules["model.layers.0.self_attn.q_proj.weight"]
        down = reader.modules["model.layers.0.mlp.down_proj.weight"]
    assert (q1.rank, q1.scale) == (2, pytest.approx(8 / 2**0.5))  # rank_pattern, α/√r
    assert (q0.rank, q0.scale) == (4, pytest.approx(8 / 2))
    assert (down.rank, down.scale) == (4, pytest.approx(3 / 2))  # alpha_pattern


def test_streamed_blocks_equal_whole_reads(llama_base: Path, tmp_path: Path) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    with open_composed(llama_base, adapter) as reader:
        whole = read_all(reader)
        for block in (1000, 4096):  # 1000 does not divide any row length: blocks cross rows
            assert_same_tensors(read_streamed(reader, block), whole)


def test_fan_in_fan_out_gpt2_conv1d_equals_peft(gpt2_base: Path, tmp_path: Path) -> None:
    adapter = build_lora_adapter(
        gpt2_base,
        tmp_path / "gpt2-lora",
        seed=3,
        r=4,
        lora_alpha=16,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
    )
    assert json.loads((adapter / ADAPTER_CONFIG).read_text())["fan_in_fan_out"] is True
    want = peft_merged(gpt2_base, adapter)
    with open_composed(gpt2_base, adapter) as reader:
        assert reader.modules["transformer.h.0.attn.c_attn.weight"].transpose
        assert_same_tensors(read_all(reader), want)
        assert_same_tensors(read_streamed(reader, 1000), want)


def test_bfloat16_base_gets_float32_math_rounded_once(tmp_path: Path) -> None:
    base = build_llama_base(tmp_path / "bf16", seed=2, dtype=torch.bfloat16)
    adapter = build_lora_adapter(
        base, tmp_path / "a", 4, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    name = "model.layers.0.self_attn.q_proj.weight"
    with open_composed(base, adapter) as reader, CheckpointReader(adapter / ADAPTER_WEIGHTS) as a:
        got = reader.read(name)
        key = "base_model.model.model.layers.0.self_attn.q_proj."
        delta = (a.read(key + "lora_B.weight").float() @ a.read(key + "lora_A.weight").float()) * 2
        want = (reader.base.read(name).float() + delta).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


# ---- bad adapters: each error names the adapter, the tensor or field, and what is valid ----------


def refusal(base: Path, adapter: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        open_composed(base, adapter).close()
    assert info.value.model == f"{base}+{adapter}"
    return info.value


def test_missing_adapter_config_is_refused(llama_base: Path, tmp_path: Path) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    (adapter / ADAPTER_CONFIG).unlink()
    e = refusal(llama_base, adapter)
    assert e.file == ADAPTER_CONFIG and "has no adapter_config.json" in e.message


def test_invalid_adapter_config_fields_are_named(llama_base: Path, tmp_path: Path) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    cases = [
        ({"r": 0}, "r: must be a positive integer"),
        ({"lora_alpha": "big"}, "lora_alpha: must be a number"),
        ({"use_rslora": "yes"}, "use_rslora: must be true or false"),
        ({"peft_type": "IA3"}, "peft_type: 'IA3' adapters cannot be applied"),
        ({"use_dora": True}, "use_dora: DoRA is not supported"),
        ({"rank_pattern": {"q_proj": -1}}, "rank_pattern.q_proj: must be a positive integer"),
        ({"target_modules": "q_proj("}, "target_modules: 'q_proj(' is not a valid regular"),
    ]
    original = (adapter / ADAPTER_CONFIG).read_text()
    for change, message in cases:
        (adapter / ADAPTER_CONFIG).write_text(original)
        edit_adapter_config(adapter, **change)
        assert message in refusal(llama_base, adapter).message, change
    (adapter / ADAPTER_CONFIG).write_text("{not json")
    assert "cannot be read as JSON" in refusal(llama_base, adapter).message


def test_missing_adapter_weights_are_refused(llama_base: Path, tmp_path: Path) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    (adapter / ADAPTER_WEIGHTS).unlink()
    assert "has no adapter_model.safetensors" in refusal(llama_base, adapter).message


def test_shape_mismatch_names_the_module_and_both_shapes(llama_base: Path, tmp_path: Path) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    key = replace_adapter_tensor(adapter, "layers.0.self_attn.v_proj.lora_B", torch.ones(48, 4))
    e = refusal(llama_base, adapter)
    assert e.tensor == key
    assert "'model.layers.0.self_attn.v_proj'" in e.message
    assert "(48, 64)" in e.message and "(32, 64)" in e.message


def test_rank_that_disagrees_with_the_config_is_refused(llama_base: Path, tmp_path: Path) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    edit_adapter_config(adapter, r=8)
    e = refusal(llama_base, adapter)
    assert "its rank is 8" in e.message and "lora_A" in e.message


def test_module_missing_from_the_base_is_named(llama_base: Path, tmp_path: Path) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    rename_adapter_tensors(adapter, {"layers.3.self_attn.q_proj": "layers.9.self_attn.q_proj"})
    e = refusal(llama_base, adapter)
    assert e.tensor == "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"
    assert "which the base model does not have" in e.message
    assert "model.layers.3.self_attn.q_proj.weight" in e.message  # the close match


def test_module_outside_target_modules_is_refused(llama_base: Path, tmp_path: Path) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    edit_adapter_config(adapter, target_modules=["q_proj", "down_proj", "embed_tokens"])
    e = refusal(llama_base, adapter)
    assert "v_proj" in e.message and "is not one of the adapter's target_modules" in e.message


def test_target_module_the_base_lacks_is_refused(llama_base: Path, tmp_path: Path) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    edit_adapter_config(adapter, target_modules=["q_proj", "v_proj", "down_proj", "c_attn"])
    rename_adapter_tensors(adapter, {"embed_tokens.lora": None})
    e = refusal(llama_base, adapter)
    assert e.file == ADAPTER_CONFIG and "'c_attn', which matches no module" in e.message


def test_keys_not_in_peft_form_and_unsupported_variants_are_refused(
    llama_base: Path, tmp_path: Path
) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    rename_adapter_tensors(adapter, {"base_model.model.lm_head": "lm_head"})
    e = refusal(llama_base, adapter)
    assert e.tensor == "lm_head.weight" and "is not a PEFT adapter key" in e.message
    adapter = adapter_for(llama_base, tmp_path, seed=6)
    rename_adapter_tensors(adapter, {"layers.0.self_attn.q_proj.lora_B.weight": None})
    e = refusal(llama_base, adapter)
    assert "has lora_A but no lora_B" in e.message


def test_replaced_tensor_of_the_wrong_shape_is_refused(llama_base: Path, tmp_path: Path) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    replace_adapter_tensor(adapter, "base_model.model.lm_head.weight", torch.zeros(10, 64))
    e = refusal(llama_base, adapter)
    assert e.tensor == "base_model.model.lm_head.weight"
    assert "replaces 'lm_head.weight' of shape (256, 64)" in e.message


# ---- the reference syntax ---------------------------------------------------------------------


def test_base_plus_adapter_parses_into_two_checked_references() -> None:
    ref = parse_reference("org/base@main+artifact://my-lora@2")
    assert str(ref) == "org/base@main+artifact://my-lora@2"
    assert (ref.kind.value, ref.location, ref.revision) == ("hub", "org/base", "main")
    assert ref.adapter is not None and str(ref.adapter) == "artifact://my-lora@2"
    assert not ref.is_immutable  # a branch
    assert parse_reference("org/base@" + "a" * 40 + "+artifact://l@2").is_immutable
    for raw, message in [
        ("org/base+lora", "its adapter 'lora': a hub repository id is 'org/name'"),
        ("s3://Bad+org/l", "its base 's3://Bad': 'Bad' is not a valid bucket name"),
        ("org/a+org/b+org/c", "at most one '+'"),
        ("org/a+", "the adapter part of BASE+ADAPTER is empty"),
    ]:
        with pytest.raises(ReferenceError_, match=message.replace("+", r"\+")):
            parse_reference(raw)


def test_recipe_references_list_both_parts_where_they_stand() -> None:
    recipe = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "org/base",
            "models": [{"model": "org/base+s3://bucket/lora"}, {"model": "org/ft"}],
        }
    )
    assert [(loc, str(ref)) for loc, ref in recipe.references()] == [
        (("base_model",), "org/base"),
        (("models", 0, "model", "base"), "org/base"),
        (("models", 0, "model", "adapter"), "s3://bucket/lora"),
        (("models", 1, "model"), "org/ft"),
    ]
    assert recipe.model_dump(mode="json")["models"][0]["model"] == "org/base+s3://bucket/lora"


def test_adapters_are_refused_where_they_mean_nothing() -> None:
    with pytest.raises(RecipeError, match="tokenizer_source: a LoRA adapter has no tokenizer"):
        parse_recipe(
            {
                "merge_method": "linear",
                "models": [{"model": "org/a"}, {"model": "org/b"}],
                "tokenizer_source": "org/a+org/l",
            }
        )
    with pytest.raises(ValidationError, match=r"a LoRA adapter .* is a merge input only"):
        EditRecipe.model_validate(
            {
                "edit_method": "rome",
                "model": "org/a+org/l",
                "requests": [{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}],
            }
        )


# ---- through the merge engine -------------------------------------------------------------------


def test_task_arithmetic_of_a_lora_input_is_the_peft_merge(
    llama_base: Path, tmp_path: Path
) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    want = peft_merged(llama_base, adapter)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama_base),
        "models": [{"model": f"{llama_base}+{adapter}", "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }
    result, out = engine(recipe, tmp_path / "out")
    for name in want:  # base + ((W + ΔW) - base): equal up to float32 rounding
        torch.testing.assert_close(out[name], want[name], rtol=1e-6, atol=1e-6, msg=name)
    parents = result.manifest["parents"]
    assert [(p["role"], p["reference"]) for p in parents] == [
        ("base", str(llama_base)),
        ("model", str(llama_base)),
        ("adapter", str(adapter)),
    ]
    assert parents[2]["applied_to"] == str(llama_base)


def test_linear_merge_of_two_adapters_on_one_base(llama_base: Path, tmp_path: Path) -> None:
    a1, a2 = adapter_for(llama_base, tmp_path, seed=1), adapter_for(llama_base, tmp_path, seed=2)
    m1, m2 = peft_merged(llama_base, a1), peft_merged(llama_base, a2)
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": f"{llama_base}+{a1}", "parameters": {"weight": 0.25}},
            {"model": f"{llama_base}+{a2}", "parameters": {"weight": 0.75}},
        ],
        "dtype": "float32",
    }
    _, out = engine(recipe, tmp_path / "out")
    for name in m1:
        want = 0.25 * m1[name] + 0.75 * m2[name]
        torch.testing.assert_close(out[name], want, rtol=1e-6, atol=1e-6, msg=name)


def test_a_bad_adapter_fails_the_merge_naming_it(llama_base: Path, tmp_path: Path) -> None:
    adapter = adapter_for(llama_base, tmp_path)
    (adapter / ADAPTER_CONFIG).unlink()
    recipe = {
        "merge_method": "linear",
        "models": [{"model": f"{llama_base}+{adapter}"}, {"model": str(llama_base)}],
    }
    with pytest.raises(CheckpointError) as info:
        engine(recipe, tmp_path / "out")
    assert info.value.model == f"{llama_base}+{adapter}"
    assert "adapter_config.json" in str(info.value)


# ---- through the API: each part checked and pinned as any reference -----------------------------


def lora_job(*refs: str) -> dict[str, object]:
    return {
        "kind": "merge",
        "artifact_name": "lora-soup",
        "recipe": {"merge_method": "linear", "models": [{"model": r} for r in refs], "seed": 1},
    }


def test_submission_pins_both_parts_and_refuses_an_ungranted_s3_adapter(api) -> None:
    api.publish("my-lora", {"adapter_model.safetensors": b"x", "adapter_config.json": b"{}"})
    # an adapter on s3:// outside the tenant's grants (s3://models/): 422 at the adapter part
    r = api.submit(lora_job("s3://models/base+s3://elsewhere/lora", "s3://models/a"))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["errors"][0]["pointer"] == "/recipe/models/0/model/adapter"
    assert "s3://elsewhere/lora" in body["detail"] and "models/0/model/adapter" in body["detail"]
    # a base that is not granted is named as the base part
    r = api.submit(lora_job("s3://elsewhere/base+artifact://my-lora", "s3://models/a"))
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["pointer"] == "/recipe/models/0/model/base"
    # another tenant's artifact as the adapter: not found for this one
    _, other = api.new_tenant()
    r = api.submit(lora_job("s3://models/base+artifact://my-lora", "s3://models/a"), headers=other)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["pointer"] == "/recipe/models/0/model/adapter"
    # granted base, own artifact adapter: accepted, the artifact pinned to its version
    r = api.submit(lora_job("s3://models/base+artifact://my-lora", "s3://models/a"))
    assert r.status_code == 202, r.text
    assert r.json()["recipe"]["models"][0]["model"] == "s3://models/base+artifact://my-lora@1"


# ---- a job on a worker ------------------------------------------------------------------------


def test_a_merge_job_with_a_lora_input_runs_on_a_worker_and_lists_the_adapter(
    llama_base: Path, tmp_path: Path
) -> None:
    """The worker's path: the job store, input fetching (each part of BASE+ADAPTER
    resolved), the merge and the published artifact, whose weights are PEFT's merge."""
    from tests.support.checkpoints import tensors
    from tests.support.jobs import run_local_job

    adapter = adapter_for(llama_base, tmp_path)
    want = peft_merged(llama_base, adapter)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": f"{llama_base}+{adapter}"}],
        "dtype": "float32",
    }

    job, folder = run_local_job(tmp_path, recipe, "adapted")

    assert folder is not None, job.error
    out = tensors(folder)
    for name in want:
        torch.testing.assert_close(out[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    manifest = json.loads((folder / "manifest.json").read_text())
    roles = [(p["role"], p["reference"]) for p in manifest["parents"]]
    assert roles == [("model", str(llama_base)), ("adapter", str(adapter))]
