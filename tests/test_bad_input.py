"""Bad input, refused clearly: recipes, references, checkpoints, output directory, device.

Each refusal is checked three ways: the exception (``RecipeError`` from the schema, or an
``InputError`` from the engine naming the field / model / tensor / file), the CLI (exit 2 and
exactly one ``weightsmith: error: ...`` line on stderr), and the file system (nothing new
next to the output: no output directory, no hidden ``.<name>.partial-<pid>`` staging).

The checkpoints are tiny "Llama-like" state dicts built here, with values chosen so that
every expected merge result can be computed by hand (multiples of 1/64 are exact in float32).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from schemas.recipe import RecipeError, parse_recipe
from tests.support.handmade import (
    CONFIG,
    DOWN0,
    DOWN1,
    EMBED,
    FT1_DELTA,
    FT2_DELTA,
    HEAD,
    NORM,
    SHAPES,
    base_tensors,
    linear_recipe,
    refused,
    shifted,
    ta_recipe,
    tree,
    write_model,
    write_raw_safetensors,
)
from weightsmith.cli import main
from workers.errors import CheckpointError, InputError, SourceError
from workers.merge.engine import run_merge

# -- recipe errors -------------------------------------------------------------------------------


def test_unknown_method_is_refused_listing_the_valid_methods(zoo: Path, capsys) -> None:
    refused(
        zoo,
        {"merge_method": "average", "models": [{"model": "./models/ft1"}]},
        error=RecipeError,
        expect=("merge_method", "'average'", "linear", "task_arithmetic", "ties", "slerp"),
        capsys=capsys,
    )


def test_unknown_parameter_is_refused_listing_the_valid_parameters(zoo: Path, capsys) -> None:
    refused(
        zoo,
        ta_recipe(merge_method="ties", parameters={"lamda": 0.5}),
        error=RecipeError,
        expect=("parameters.lamda", "unknown parameter for 'ties'", "weight, density, lambda"),
        capsys=capsys,
    )


def test_unknown_per_model_parameter_names_the_model_entry(zoo: Path, capsys) -> None:
    recipe = ta_recipe()
    recipe["models"][1]["parameters"] = {"wieght": 2}
    refused(
        zoo,
        recipe,
        error=RecipeError,
        expect=("models[1].parameters.wieght", "valid: weight"),
        capsys=capsys,
    )


def test_method_needing_a_base_without_one_is_refused(zoo: Path, capsys) -> None:
    recipe = ta_recipe()
    del recipe["base_model"]
    refused(
        zoo,
        recipe,
        error=RecipeError,
        expect=("base_model", "'task_arithmetic' needs a base model"),
        capsys=capsys,
    )


def test_slerp_without_t_is_refused(zoo: Path, capsys) -> None:
    refused(
        zoo,
        {
            "merge_method": "slerp",
            "base_model": "./models/base",
            "models": [{"model": "./models/ft1"}],
        },
        error=RecipeError,
        expect=("parameters.t", "slerp needs the interpolation factor t"),
        capsys=capsys,
    )


@pytest.mark.parametrize("density", [1.5, -0.25])
def test_out_of_range_density_is_refused_naming_the_field(
    zoo: Path, capsys, density: float
) -> None:
    recipe = ta_recipe(merge_method="ties")
    recipe["models"][0]["parameters"] = {"density": density}
    refused(
        zoo,
        recipe,
        error=RecipeError,
        expect=("models[0].parameters.density", f"{density:g}"),
        capsys=capsys,
    )


def test_out_of_range_density_in_a_gradient_is_refused(zoo: Path, capsys) -> None:
    refused(
        zoo,
        ta_recipe(merge_method="ties", parameters={"density": [0.5, 1.2]}),
        error=RecipeError,
        expect=("parameters.density", "1.2"),
        capsys=capsys,
    )


@pytest.mark.parametrize(
    ("density", "epsilon"),
    [(0.9, 0.2), (0.1, 0.15)],  # density + ε > 1; density − ε ≤ 0 (ε defaults to 0.15)
)
def test_della_density_plus_minus_epsilon_out_of_range_is_refused(
    zoo: Path, capsys, density: float, epsilon: float
) -> None:
    recipe = ta_recipe(merge_method="della")
    recipe["models"][1]["parameters"] = {"density": density, "epsilon": epsilon}
    refused(
        zoo,
        recipe,
        error=RecipeError,
        expect=("models[1]", "density − epsilon", f"density {density:g}", f"epsilon {epsilon:g}"),
        capsys=capsys,
    )


def test_della_error_names_the_recipe_position_when_the_base_is_listed_in_models(
    zoo: Path, capsys
) -> None:
    # mergekit recipes often list the base among the models; the position reported must be
    # the entry's own (models[2] here), not its rank among the fine-tuned models.
    recipe = ta_recipe(merge_method="della")
    recipe["models"].insert(0, {"model": "./models/base"})
    recipe["models"][2]["parameters"] = {"density": 0.9, "epsilon": 0.2}
    exc = refused(zoo, recipe, error=RecipeError, expect=("models[2]",), capsys=capsys)
    assert "models[1]" not in str(exc)


def test_della_top_level_density_out_of_range_points_there_and_names_the_model(
    zoo: Path, capsys
) -> None:
    # density 0.1 set for every model: the first fine-tuned entry (models[1], after the base)
    # is named, the setting to change is the top-level one
    recipe = ta_recipe(merge_method="della", parameters={"density": 0.1})
    recipe["models"].insert(0, {"model": "./models/base"})
    refused(
        zoo,
        recipe,
        error=RecipeError,
        expect=("parameters.density: della needs", "density 0.1, epsilon 0.15 for models[1]"),
        capsys=capsys,
    )


def test_della_gradient_out_of_range_at_one_layer_is_refused_by_the_engine(
    zoo: Path, capsys
) -> None:
    # density 0.5 at layer 0 is fine; 0.1 at layer 1 gives density − ε = 0.1 − 0.15 < 0. A
    # gradient is only checkable per tensor, so the engine refuses it mid-merge (after other
    # tensors were written) and must still leave nothing behind.
    recipe = ta_recipe(merge_method="della")
    recipe["models"][0]["parameters"] = {"density": [0.5, 0.1]}
    refused(
        zoo,
        recipe,
        field="parameters.epsilon",
        tensor=DOWN1,
        expect=("density 0.1", "epsilon 0.15"),
        capsys=capsys,
    )


def test_linear_weights_summing_to_zero_with_normalize_are_refused(zoo: Path, capsys) -> None:
    recipe = linear_recipe("./models/ft1", "./models/ft2")
    recipe["models"][0]["parameters"] = {"weight": 1}
    recipe["models"][1]["parameters"] = {"weight": -1}
    refused(
        zoo,
        recipe,
        field="parameters.weight",
        tensor=HEAD,  # the first tensor written
        expect=("sum to 0", "normalize"),
        capsys=capsys,
    )


@pytest.mark.parametrize(
    ("where", "reference", "why"),
    [
        ("models[0].model", "not a model", "'org/name'"),
        ("models[0].model", "ftp://host/model", "unknown scheme 'ftp'"),
        ("base_model", "org/model+adapter", "its adapter 'adapter': a hub repository id"),
        ("models[0].model", "org/a+org/b+org/c", "at most one '+'"),
        ("models[1].model", "", "empty"),
    ],
)
def test_invalid_model_reference_is_refused_naming_the_field_and_the_valid_forms(
    zoo: Path, capsys, where: str, reference: str, why: str
) -> None:
    recipe = ta_recipe()
    if where == "base_model":
        recipe["base_model"] = reference
    else:
        recipe["models"][int(where[7])]["model"] = reference
    refused(
        zoo,
        recipe,
        error=RecipeError,
        expect=(where, "invalid model reference", why, "Valid forms"),
        capsys=capsys,
    )


def test_recipe_that_is_not_valid_yaml_is_refused(zoo: Path, capsys) -> None:
    refused(
        zoo,
        "merge_method: [linear\nmodels:\n  - model: ./models/ft1\n",
        error=RecipeError,
        expect=("not valid YAML",),
        capsys=capsys,
    )


def test_recipe_that_is_a_yaml_list_is_refused(zoo: Path, capsys) -> None:
    refused(
        zoo,
        "- merge_method: linear\n- models: [./models/ft1]\n",
        error=RecipeError,
        expect=("must be a mapping",),
        capsys=capsys,
    )


def test_unknown_top_level_field_is_refused(zoo: Path, capsys) -> None:
    refused(
        zoo,
        ta_recipe(base_modle="./models/base"),
        error=RecipeError,
        expect=("base_modle", "unknown field"),
        capsys=capsys,
    )


def test_missing_recipe_file_is_refused(tmp_path: Path, capsys) -> None:
    before = tree(tmp_path)
    code = main(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith("weightsmith: error: cannot read recipe")
    assert "nope.yaml" in err[0]
    assert tree(tmp_path) == before


# -- references and checkpoints ------------------------------------------------------------------


def test_missing_local_model_path_is_refused_naming_the_model(zoo: Path, capsys) -> None:
    recipe = ta_recipe()
    recipe["models"][1]["model"] = "./models/ft9"
    refused(
        zoo,
        recipe,
        error=SourceError,
        model="./models/ft9",
        expect=("no such file or directory", "ft9", "relative to the recipe directory"),
        capsys=capsys,
    )


def test_shape_mismatch_names_the_tensor_and_both_shapes(zoo: Path, capsys) -> None:
    tensors = shifted(FT1_DELTA)
    tensors[DOWN1] = torch.zeros(8, 12)
    write_model(zoo / "models" / "ft1", tensors)
    refused(
        zoo,
        ta_recipe(),
        model="./models/ft1",
        tensor=DOWN1,
        expect=("(8, 12)", "(8, 16)", "./models/base", DOWN1),
        capsys=capsys,
    )


def test_dtype_mismatch_names_the_tensor_and_both_dtypes(zoo: Path, capsys) -> None:
    tensors = shifted(FT2_DELTA)
    tensors[DOWN0] = tensors[DOWN0].to(torch.float16)
    write_model(zoo / "models" / "ft2", tensors)
    refused(
        zoo,
        ta_recipe(),
        model="./models/ft2",
        tensor=DOWN0,
        expect=("dtype F16", "F32", DOWN0),
        capsys=capsys,
    )


def test_tensor_missing_from_the_base_is_refused_for_a_method_that_needs_the_base(
    zoo: Path, capsys
) -> None:
    tensors = base_tensors()
    del tensors[NORM]
    write_model(zoo / "models" / "base", tensors)
    refused(
        zoo,
        ta_recipe(),
        model="./models/ft1",
        tensor=NORM,
        expect=("missing from the base model", "./models/base", "task_arithmetic"),
        capsys=capsys,
    )


def test_tensor_missing_from_one_finetune_is_merged_over_the_models_that_have_it(
    zoo: Path,
) -> None:
    ft2 = shifted(FT2_DELTA)
    del ft2[NORM]
    write_model(zoo / "models" / "ft2", ft2)
    recipe = ta_recipe()
    recipe["models"][1]["parameters"] = {"weight": 0.5}
    run_merge(parse_recipe(recipe), zoo / "merged", base_dir=zoo, seed=1)
    merged = _load_output(zoo / "merged")
    base = base_tensors()
    assert set(merged) == set(SHAPES)
    # base + 1·0.5 + 0.5·1.5 = base + 1.25 where both have the tensor; base + 0.5 where only
    # ft1 has it
    for name in SHAPES:
        expected = base[name] + (0.5 if name == NORM else 1.25)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=0)


def test_tensor_missing_from_one_linear_input_is_averaged_over_the_others(zoo: Path) -> None:
    ft2 = shifted(FT2_DELTA)
    del ft2[HEAD]
    write_model(zoo / "models" / "ft2", ft2)
    recipe = linear_recipe("./models/ft1", "./models/ft2")
    recipe["models"][0]["parameters"] = {"weight": 3}
    recipe["models"][1]["parameters"] = {"weight": 1}
    run_merge(parse_recipe(recipe), zoo / "merged", base_dir=zoo, seed=1)
    merged = _load_output(zoo / "merged")
    base = base_tensors()
    for name in SHAPES:
        # (3·(b + 0.5) + 1·(b + 1.5)) / 4 = b + 0.75; only ft1 has lm_head: b + 0.5
        expected = base[name] + (0.5 if name == HEAD else 0.75)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=0)


def test_vocab_size_mismatch_in_config_mentions_vocabulary_and_tokenizer(zoo: Path, capsys) -> None:
    tensors = shifted(FT1_DELTA)
    tensors[EMBED] = torch.zeros(40, 8)
    tensors[HEAD] = torch.zeros(40, 8)
    write_model(zoo / "models" / "ft1", tensors, config={**CONFIG, "vocab_size": 40})
    refused(
        zoo,
        ta_recipe(),
        model="./models/ft1",
        field="models[0].model",
        expect=("vocabulary size 40 differs from 32", "tokenizer"),
        capsys=capsys,
    )


def test_embedding_rows_mismatch_without_vocab_size_in_config_mentions_vocabularies(
    zoo: Path, capsys
) -> None:
    no_vocab = {k: v for k, v in CONFIG.items() if k != "vocab_size"}
    write_model(zoo / "models" / "base", base_tensors(), config=no_vocab)
    tensors = shifted(FT1_DELTA)
    tensors[EMBED] = torch.zeros(40, 8)
    write_model(zoo / "models" / "ft1", tensors, config=no_vocab)
    refused(
        zoo,
        ta_recipe(),
        model="./models/ft1",
        tensor=EMBED,
        expect=("(40, 8)", "(32, 8)", "vocabularies differ", "tokenizer"),
        capsys=capsys,
    )


def _wider(delta: float) -> dict[str, torch.Tensor]:
    """The zoo's tensors for a model of hidden size 12 instead of 8 (same vocabulary)."""
    wide = {EMBED: (32, 12), DOWN0: (12, 16), DOWN1: (12, 16), NORM: (12,), HEAD: (32, 12)}
    return {name: torch.full(shape, delta) for name, shape in wide.items()}


def test_hidden_size_mismatch_in_config_is_named_as_such_not_as_vocabularies(
    zoo: Path, capsys
) -> None:
    write_model(zoo / "models" / "ft1", _wider(FT1_DELTA), config={**CONFIG, "hidden_size": 12})
    exc = refused(
        zoo,
        ta_recipe(),
        model="./models/ft1",
        field="models[0].model",
        expect=("hidden size 12 differs from 8", "different widths"),
        capsys=capsys,
    )
    assert "vocabular" not in str(exc)


def test_embedding_width_mismatch_without_config_is_named_as_hidden_sizes(
    zoo: Path, capsys
) -> None:
    # Same vocabulary (32 rows), other width: the first tensor that differs, in the file's
    # order, is the output head (vocabulary × hidden, like the embedding).
    no_sizes = {k: v for k, v in CONFIG.items() if k not in ("vocab_size", "hidden_size")}
    write_model(zoo / "models" / "base", base_tensors(), config=no_sizes)
    write_model(zoo / "models" / "ft1", _wider(FT1_DELTA), config=no_sizes)
    exc = refused(
        zoo,
        ta_recipe(),
        model="./models/ft1",
        tensor=HEAD,
        expect=("(32, 12)", "(32, 8)", "hidden sizes differ"),
        capsys=capsys,
    )
    assert "vocabular" not in str(exc)


@pytest.mark.parametrize(
    ("which", "name", "bad"),
    [
        ("ft1", DOWN1, float("nan")),
        ("ft2", HEAD, float("inf")),
        ("base", NORM, float("-inf")),
    ],
)
def test_nan_or_inf_in_an_input_names_the_model_and_the_tensor(
    zoo: Path, capsys, which: str, name: str, bad: float
) -> None:
    tensors = base_tensors() if which == "base" else shifted(FT1_DELTA)
    tensors[name].view(-1)[3] = bad
    write_model(zoo / "models" / which, tensors)
    refused(
        zoo,
        ta_recipe(),
        model=f"./models/{which}",
        tensor=name,
        expect=("NaN or infinite",),
        capsys=capsys,
    )


def test_config_that_is_not_json_is_refused_naming_the_file(zoo: Path, capsys) -> None:
    config = zoo / "models" / "ft2" / "config.json"
    config.write_text('{"vocab_size": 32,')
    refused(
        zoo,
        ta_recipe(),
        file=str(config),
        expect=("config.json is not valid JSON",),
        capsys=capsys,
    )


def test_truncated_safetensors_file_is_refused(zoo: Path, capsys) -> None:
    path = zoo / "models" / "ft1" / "model.safetensors"
    last = _last_tensor_in(path)
    path.write_bytes(path.read_bytes()[:-4])  # cuts into the last tensor only
    exc = refused(
        zoo,
        ta_recipe(),
        error=CheckpointError,
        model="./models/ft1",
        file="model.safetensors",
        tensor=last,
        expect=("truncated",),
        capsys=capsys,
    )
    assert isinstance(exc, CheckpointError)


def test_bad_header_length_is_refused(zoo: Path, capsys) -> None:
    path = zoo / "models" / "ft2" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    refused(
        zoo,
        ta_recipe(),
        error=CheckpointError,
        model="./models/ft2",
        file="model.safetensors",
        expect=("header length 1000000000000", "past the end of the file"),
        capsys=capsys,
    )


def test_data_offsets_past_the_end_of_the_file_are_refused(zoo: Path, capsys) -> None:
    target = zoo / "models" / "ft1" / "model.safetensors"
    write_raw_safetensors(target, shifted(FT1_DELTA), shift={NORM: 4096})
    refused(
        zoo,
        ta_recipe(),
        error=CheckpointError,
        model="./models/ft1",
        file="model.safetensors",
        tensor=NORM,
        expect=(NORM, "ends at byte"),
        capsys=capsys,
    )


def test_file_too_short_for_a_header_length_is_refused(zoo: Path, capsys) -> None:
    (zoo / "models" / "base" / "model.safetensors").write_bytes(b"\x01\x02\x03")
    refused(
        zoo,
        ta_recipe(),
        error=CheckpointError,
        model="./models/base",
        file="model.safetensors",
        expect=("not a safetensors file", "3 bytes"),
        capsys=capsys,
    )


def test_pickle_only_checkpoint_is_refused_by_default_mentioning_allow_pickle(
    zoo: Path, capsys
) -> None:
    (zoo / "models" / "ft1" / "model.safetensors").unlink()
    write_model(zoo / "models" / "ft1", shifted(FT1_DELTA), pickle=True)
    refused(
        zoo,
        ta_recipe(),
        error=SourceError,
        model="./models/ft1",
        expect=("pickle", "allow_pickle"),
        capsys=capsys,
    )


def test_pickle_checkpoint_is_accepted_with_allow_pickle(zoo: Path, capsys) -> None:
    (zoo / "models" / "ft1" / "model.safetensors").unlink()
    write_model(zoo / "models" / "ft1", shifted(FT1_DELTA), pickle=True)
    recipe = ta_recipe(allow_pickle=True)
    run_merge(parse_recipe(recipe), zoo / "merged", base_dir=zoo, seed=3)
    merged = _load_output(zoo / "merged")
    for name, b in base_tensors().items():
        # base + 0.5 (pickle ft1) + 1.5 (safetensors ft2)
        torch.testing.assert_close(merged[name], b + 2.0, rtol=0, atol=0)

    # the CLI too
    (zoo / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code = main(["merge", str(zoo / "recipe.yaml"), "--out", str(zoo / "merged2"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    for name, t in _load_output(zoo / "merged2").items():
        torch.testing.assert_close(t, merged[name], rtol=0, atol=0)


def test_pickle_single_file_reference_is_refused_by_default(zoo: Path, capsys) -> None:
    torch.save(shifted(FT1_DELTA), zoo / "models" / "ft1.bin")
    recipe = ta_recipe()
    recipe["models"][0]["model"] = "./models/ft1.bin"
    refused(
        zoo,
        recipe,
        error=SourceError,
        model="./models/ft1.bin",
        file="ft1.bin",
        expect=("pickle", "allow_pickle"),
        capsys=capsys,
    )


# -- output directory and device -----------------------------------------------------------------


def test_existing_non_empty_output_directory_is_refused_and_left_untouched(
    zoo: Path, capsys
) -> None:
    out = zoo / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "model.safetensors").write_bytes(b"not mine")
    refused(
        zoo,
        ta_recipe(),
        field="out",
        expect=("already exists and is not empty", "merged"),
        capsys=capsys,
    )
    assert (out / "keep.txt").read_text() == "precious"
    assert (out / "sub" / "model.safetensors").read_bytes() == b"not mine"
    assert sorted(p.name for p in out.rglob("*")) == ["keep.txt", "model.safetensors", "sub"]


def test_output_path_that_is_a_file_is_refused_and_left_untouched(zoo: Path, capsys) -> None:
    (zoo / "merged").write_text("a file")
    refused(zoo, ta_recipe(), field="out", expect=("already exists",), capsys=capsys)
    assert (zoo / "merged").read_text() == "a file"


def test_failed_merge_removes_the_parent_directories_it_created(zoo: Path, capsys) -> None:
    # the NaN is found mid-merge, after the staging directory (and its parents) were made
    tensors = shifted(FT1_DELTA)
    tensors[NORM][0] = float("nan")
    write_model(zoo / "models" / "ft1", tensors)
    out = zoo / "new" / "deeper" / "merged"
    (zoo / "recipe.yaml").write_text(yaml.safe_dump(ta_recipe()))
    before = tree(zoo)
    with pytest.raises(InputError, match="NaN"):
        run_merge(parse_recipe(ta_recipe()), out, base_dir=zoo)
    assert tree(zoo) == before
    assert main(["merge", str(zoo / "recipe.yaml"), "--out", str(out)]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert tree(zoo) == before


def test_merge_into_a_new_nested_output_directory_creates_its_parents(zoo: Path) -> None:
    out = zoo / "new" / "deeper" / "merged"
    run_merge(parse_recipe(ta_recipe()), out, base_dir=zoo, seed=0)
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_device_without_a_gpu_is_refused(zoo: Path, capsys) -> None:
    refused(
        zoo,
        ta_recipe(),
        field="device",
        expect=("cuda", "no CUDA GPU is available"),
        cli_args=("--device", "cuda"),
        engine_kwargs={"device": "cuda"},
        capsys=capsys,
    )


@pytest.mark.parametrize("device", ["banana", "mps"])
def test_unknown_or_unsupported_device_is_refused(zoo: Path, capsys, device: str) -> None:
    refused(
        zoo,
        ta_recipe(),
        field="device",
        expect=(repr(device), "use cpu or cuda"),
        cli_args=("--device", device),
        engine_kwargs={"device": device},
        capsys=capsys,
    )


# -- helpers used above --------------------------------------------------------------------------


def _load_output(out: Path) -> dict[str, torch.Tensor]:
    """All tensors of a merge output, read with the safetensors library (independent reader)."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(out / shard)))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def _last_tensor_in(path: Path) -> str:
    """The name of the tensor whose bytes end the file (the one a truncation cuts)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return max(header, key=lambda k: header[k]["data_offsets"][1])
