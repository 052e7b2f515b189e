"""Where an edit computes (``device: auto|cpu|cuda``) and in what precision.

- the device names: one vocabulary for the engines, ``weightsmith edit --device``, and
  ``WEIGHTSMITH_WORKER_DEVICE``; ``auto`` is the CPU here; a device the machine lacks is
  refused before any work, naming the option or the setting;
- the GPU's precision path run on the CPU: the model loaded in bfloat16 (as a GPU loads a
  bf16 checkpoint), the edit takes, its update is close to the float32 edit's (an
  independent computation: the same recipe on the float32-loaded model), the edited tensor
  is written in the stored dtype and nothing else changes;
- tests marked ``gpu`` (skipped without CUDA) run the same edits on a GPU and compare them
  with the CPU's.

Context templates are left out of the precision comparisons (``context_template_counts:
[]``): they are sampled from the model, and a bf16 model (or a GPU's generator) may sample
other prefixes for the same seed, which would compare two different edits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from infra.settings import Settings, get_settings
from schemas.edit_recipe import EditRecipe, parse_edit_recipe
from testbed.smollm2 import write_text_corpus
from testbed.tiny_models import save_tokenizer, write_word_corpus
from tests.support.jobs import run_local_job
from tests.support.tiny_edit import tiny_model
from weightsmith.cli import main
from workers.devices import resolve_device
from workers.edit import LocalCovarianceCache, run_edit
from workers.edit.causal_trace import LocalTraceCache
from workers.edit.checkpoint import EDIT_DIR, FACTORS
from workers.edit.engine import load_dtype
from workers.errors import InputError
from workers.tensors import CheckpointReader

LAYER = 1
EDITED = f"model.layers.{LAYER}.mlp.down_proj.weight"
FACT = {
    "prompt": "w5 w6 w7 w8",
    "subject": "w8",
    "target_new": "w20 w21",
    "paraphrase_prompts": ["w9 w8"],
    "neighborhood_prompts": ["w40 w41 w42"],
}
SECOND_FACT = {"prompt": "w50 w51 w52", "subject": "w52", "target_new": "w60"}
# no early stop, no KL, a loose clamp: an update large enough to take on a random model
STRONG = {
    "v_num_grad_steps": 10,
    "v_lr": 0.5,
    "v_weight_decay": 0.0,
    "kl_factor": 0.0,
    "clamp_norm_factor": 1e4,
    "v_early_stop_loss": 0.0,
    "context_template_counts": [],
    "edit_margin": None,  # the whole optimised update (the margin's scale: compared apart)
}
# ‖ΔW_bf16 − ΔW_f32‖ / ‖ΔW_f32‖ allowed. bf16 keeps 8 significant bits (unit roundoff
# 2⁻⁹ ≈ 0.2 %); the clean value v_init comes out of bf16 matmuls 0.8 % away from float32's
# on the tiny model. Adam moves each coordinate of δ by about lr · sign(gradient) per step,
# so where a coordinate's gradient is near zero that rounding can flip its step: after 10
# steps at lr 0.5 the update's left factor is 4° (cos 0.9976) from float32's, ‖ΔW_bf16 −
# ΔW_f32‖ / ‖ΔW_f32‖ = 0.07 (ROME; MEMIT in the same range). 0.15 leaves room for another
# CPU's kernels and still fails an update that went elsewhere: a lost gradient, a wrong
# cast or a wrong device would differ by O(1).
BF16_TOLERANCE = 0.15
# edit_margin's bisection steps by 1/128: the bf16 and float32 edits may stop a step apart
MARGIN_STEPS = 2 / 128

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny_model("llama") stored in bfloat16 (as 7B checkpoints are) and in float32, each
    with the word-level tokenizer."""
    root = tmp_path_factory.mktemp("tiny_devices")
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        tiny_model("llama").to(dtype).save_pretrained(str(root / name))
        save_tokenizer(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_corpus(tmp_path_factory.mktemp("tiny_corpus") / "corpus.txt", 40)


def _recipe(model: Path, corpus: Path, method: str = "rome", **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "edit_method": method,
        "model": str(model),
        "requests": [FACT] if method == "rome" else [FACT, SECOND_FACT],
        "hyperparameters": {**STRONG, "layers": [LAYER] if method == "rome" else [0, 1]},
        "covariance": {"source": "text", "paths": [str(corpus)], "tokens": 512, "max_length": 32},
        "on_gate_failure": "publish_flagged",
    }
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return data


def _parsed(data: dict[str, Any]) -> EditRecipe:
    return parse_edit_recipe(data)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(folder) as reader:
        return {name: reader.read(name) for name in reader.names}


def _written_deltas(folder: Path) -> dict[int, torch.Tensor]:
    """ΔW per layer from the written factors file (Σ left·rightᵀ, float64)."""
    deltas: dict[int, torch.Tensor] = {}
    with safe_open(str(folder / EDIT_DIR / FACTORS), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            request, layer, side = key.split(".")
            if side != "left":
                continue
            left = f.get_tensor(key).double()
            right = f.get_tensor(f"{request}.{layer}.right").double()
            n = int(layer.removeprefix("layer"))
            deltas[n] = deltas.get(n, 0) + torch.outer(left, right)
    return deltas


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def _prefers_new(folder: Path, tokenizer_dir: Path, true: str) -> bool:
    """The written model, loaded afresh in float32 by transformers, gives target_new a higher
    mean per-token log-probability than ``true`` after the fact's prompt (plain forward)."""
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    prompt = tok(FACT["prompt"], add_special_tokens=False).input_ids

    def mean_log_prob(target: str) -> float:
        ids = tok(target, add_special_tokens=False).input_ids
        logp = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0].double(), -1)
        return sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(ids)) / len(ids)

    return mean_log_prob(FACT["target_new"]) > mean_log_prob(true)


# ---- the device names ----------------------------------------------------------------------


@needs_no_cuda
def test_auto_is_the_cpu_on_a_machine_without_a_gpu_and_cpu_loads_float32() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert load_dtype(torch.device("cpu")) == torch.float32
    assert load_dtype(torch.device("cuda")) == "auto"  # the stored dtype


@needs_no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_refused_naming_the_option(name: str) -> None:
    with pytest.raises(InputError, match="no CUDA GPU is available") as e:
        resolve_device(name, field="--device")
    assert e.value.field == "--device" and repr(name) in e.value.message


@pytest.mark.parametrize(
    ("name", "says"), [("banana", "unknown device"), ("mps", "unsupported device"), ("", "")]
)
def test_a_name_that_is_no_compute_device_is_refused_with_the_valid_ones(
    name: str, says: str
) -> None:
    with pytest.raises(InputError) as e:
        resolve_device(name, field="WEIGHTSMITH_WORKER_DEVICE")
    assert e.value.field == "WEIGHTSMITH_WORKER_DEVICE"
    assert says in e.value.message and "use cpu or cuda[:N], or auto" in e.value.message


def test_the_worker_device_setting_defaults_to_auto_and_refuses_other_names() -> None:
    assert Settings().worker_device == "auto"
    assert Settings(worker_device=" CUDA:1 ").worker_device == "cuda:1"
    with pytest.raises(ValidationError, match="WEIGHTSMITH_WORKER_DEVICE: unsupported device"):
        Settings(worker_device="mps")


# ---- through the CLI, serve and a job ------------------------------------------------------


@needs_no_cuda
@pytest.mark.parametrize(
    ("device", "says"), [("cuda", "no CUDA GPU is available"), ("tpu", "unknown device")]
)
def test_the_edit_cli_refuses_a_device_before_any_work(
    checkpoints, corpus, tmp_path, capsys, device: str, says: str
) -> None:
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(_recipe(checkpoints["f32"], corpus)))
    out = tmp_path / "edited"
    code = main(["edit", str(tmp_path / "recipe.yaml"), "--out", str(out), "--device", device])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1, err
    assert "field 'device'" in err[0] and says in err[0] and repr(device) in err[0]
    assert not out.exists()


@needs_no_cuda
def test_the_edit_cli_computes_on_the_cpu_in_float32_by_default(
    checkpoints, corpus, tmp_path, capsys
) -> None:
    recipe = _recipe(checkpoints["f32"], corpus, hyperparameters={"mom2_adjustment": False})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code = main(["edit", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "edited")])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "edited" / "manifest.json").read_text())
    assert manifest["compute"] == {"device": "cpu", "dtype": "float32"}


@needs_no_cuda
def test_serve_with_a_cuda_worker_device_and_no_gpu_stops_naming_the_setting(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("WEIGHTSMITH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("WEIGHTSMITH_WORKER_DEVICE", "cuda")
    monkeypatch.delenv("WEIGHTSMITH_BROKER_URL", raising=False)
    get_settings.cache_clear()
    try:
        code = main(["serve", "--port", "1"])
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1, err
    assert "WEIGHTSMITH_WORKER_DEVICE" in err[0] and "no CUDA GPU is available" in err[0]
    assert not (tmp_path / "data").exists()  # stopped before the database was made


@needs_no_cuda
def test_an_edit_job_on_a_cuda_worker_without_a_gpu_fails_naming_the_setting(
    checkpoints, corpus, tmp_path
) -> None:
    recipe = _recipe(checkpoints["f32"], corpus, hyperparameters={"mom2_adjustment": False})
    job, published = run_local_job(tmp_path, recipe, "tiny-edit", kind="edit", device="cuda")
    assert job.state == "failed" and published is None
    assert job.error["field"] == "WEIGHTSMITH_WORKER_DEVICE"
    assert "no CUDA GPU is available" in job.error["message"]
    assert job.attempts == 1  # bad configuration is not retried


@needs_no_cuda
def test_an_edit_job_on_an_auto_worker_computes_on_the_cpu(checkpoints, corpus, tmp_path) -> None:
    recipe = _recipe(checkpoints["f32"], corpus, hyperparameters={"mom2_adjustment": False})
    job, published = run_local_job(tmp_path, recipe, "tiny-edit", kind="edit", device="auto")
    assert job.state == "succeeded", job.error
    assert published is not None
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["compute"] == {"device": "cpu", "dtype": "float32"}


# ---- the GPU's precision path, on the CPU ---------------------------------------------------


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_a_bf16_loaded_edit_takes_stays_close_to_the_float32_edit_and_writes_the_stored_dtype(
    checkpoints, corpus, tmp_path, method: str
) -> None:
    parent = checkpoints["bf16"]
    recipe = _parsed(_recipe(parent, corpus, method))
    cache = LocalCovarianceCache(tmp_path / "covariance-f32")
    reference = run_edit(recipe, tmp_path / "f32", cache=cache)  # loaded in float32
    bf16 = run_edit(
        recipe,
        tmp_path / "bf16",
        cache=LocalCovarianceCache(tmp_path / "covariance-bf16"),  # C from the bf16 model
        dtype=torch.bfloat16,
    )

    assert bf16.manifest["compute"] == {"device": "cpu", "dtype": "bfloat16"}
    assert reference.manifest["compute"] == {"device": "cpu", "dtype": "float32"}
    assert bf16.metrics["efficacy"] == 1.0 == reference.metrics["efficacy"]
    (true,) = bf16.metrics["targets_true"][:1]
    assert _prefers_new(tmp_path / "bf16", parent, true)

    expected = _written_deltas(tmp_path / "f32")
    got = _written_deltas(tmp_path / "bf16")
    assert got.keys() == expected.keys() == set(recipe.hyperparameters.layers or [])
    for layer in got:
        assert _relative_difference(got[layer], expected[layer]) < BF16_TOLERANCE, layer

    # written in the stored dtype: W_bf16 + ΔW added in float32, rounded once; nothing else
    before, after = _tensors(parent), _tensors(tmp_path / "bf16")
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed == [f"model.layers.{layer}.mlp.down_proj.weight" for layer in sorted(got)]
    for layer, delta in got.items():
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        assert after[name].dtype == torch.bfloat16
        # W + ΔW in float32 (ΔW from the factors in float64, within float32 rounding of the
        # writer's float32 product), rounded once to bf16: equal but for ties at a bf16 ulp
        expected_w = (before[name].double() + delta).bfloat16()
        ulp_apart = (after[name].double() - expected_w.double()).abs()
        ulp = expected_w.double().abs() * 2**-7  # bf16's spacing at that value
        assert bool((ulp_apart <= ulp).all())
        assert float((after[name] != expected_w).double().mean()) < 0.01


def test_edit_margin_on_a_bf16_loaded_model_scales_like_on_float32(
    checkpoints, corpus, tmp_path
) -> None:
    recipe = _parsed(_recipe(checkpoints["bf16"], corpus, hyperparameters={"edit_margin": 2.0}))
    cache = LocalCovarianceCache(tmp_path / "c")
    (f32,) = run_edit(recipe, None, cache=cache).updates
    (bf16,) = run_edit(recipe, None, cache=cache, dtype=torch.bfloat16).updates
    assert 0 < f32.scale < 1  # the margin did scale the update down
    assert abs(bf16.scale - f32.scale) <= MARGIN_STEPS


def test_a_bf16_loaded_edit_with_layers_auto_traces_on_the_bf16_model(
    checkpoints, corpus, tmp_path
) -> None:
    recipe = _recipe(checkpoints["bf16"], corpus, hyperparameters={"layers": "auto"})
    result = run_edit(
        _parsed(recipe),
        None,
        cache=LocalCovarianceCache(tmp_path / "c"),
        trace_cache=LocalTraceCache(tmp_path / "trace"),
        dtype=torch.bfloat16,
    )
    trace = result.metrics["causal_trace"]
    assert result.metrics["layers"] == trace["layers"]
    (prompt,) = trace["prompts"]
    assert 0.0 <= prompt["p_corrupted"] <= 1.0 and 0.0 < prompt["p_clean"] <= 1.0


# ---- on a GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_an_edit_on_cuda_in_bf16_matches_the_cpu_float32_edit(
    checkpoints, corpus, tmp_path, method: str
) -> None:
    parent = checkpoints["bf16"]
    recipe = _parsed(_recipe(parent, corpus, method))
    cache = LocalCovarianceCache(tmp_path / "covariance-cpu")
    cpu = run_edit(recipe, tmp_path / "cpu", cache=cache, device="cpu")
    torch.cuda.reset_peak_memory_stats()
    gpu = run_edit(
        recipe, tmp_path / "cuda", cache=LocalCovarianceCache(tmp_path / "c"), device="cuda"
    )

    assert gpu.manifest["compute"] == {"device": "cuda:0", "dtype": "bfloat16"}
    assert torch.cuda.max_memory_allocated() > 0  # it did compute on the GPU
    assert gpu.metrics["efficacy"] == 1.0 == cpu.metrics["efficacy"]
    (true,) = gpu.metrics["targets_true"][:1]
    assert _prefers_new(tmp_path / "cuda", parent, true)
    expected, got = _written_deltas(tmp_path / "cpu"), _written_deltas(tmp_path / "cuda")
    assert got.keys() == expected.keys()
    for layer in got:
        assert _relative_difference(got[layer], expected[layer]) < BF16_TOLERANCE, layer
    before, after = _tensors(parent), _tensors(tmp_path / "cuda")
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed == [f"model.layers.{layer}.mlp.down_proj.weight" for layer in sorted(got)]


@pytest.mark.gpu
def test_a_float32_checkpoint_is_edited_in_float32_on_cuda_close_to_the_cpu(
    checkpoints, corpus, tmp_path
) -> None:
    recipe = _parsed(_recipe(checkpoints["f32"], corpus))
    cpu = run_edit(recipe, None, cache=LocalCovarianceCache(tmp_path / "a"), device="cpu")
    gpu = run_edit(recipe, None, cache=LocalCovarianceCache(tmp_path / "b"), device="cuda")
    assert gpu.manifest["compute"] == {"device": "cuda:0", "dtype": "float32"}
    (u_cpu,), (u_gpu,) = cpu.updates, gpu.updates
    # float32 on both: the kernels sum in other orders (1e-6 relative; TF32 is off), which
    # Adam's sign-like steps amplify as they do bf16's rounding (0.8 % → 7 % above); 2 %
    # bounds that and fails a GPU edit that went the bf16 way by mistake
    delta_cpu = torch.outer(u_cpu.left, u_cpu.right)
    delta_gpu = torch.outer(u_gpu.left.cpu(), u_gpu.right.cpu())
    assert _relative_difference(delta_gpu, delta_cpu) < 0.02


def _smollm2_bf16_edit(smollm2: Path, tmp_path: Path) -> tuple[EditRecipe, Path]:
    """A bf16 copy of SmolLM2 (as it is published) and a ROME recipe on it: a known fact,
    the plain-text corpus for C (the same tokens on every device), no sampled templates,
    the whole optimised update."""
    bf16 = tmp_path / "smollm2-bf16"
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.bfloat16)
    model.save_pretrained(str(bf16))
    AutoTokenizer.from_pretrained(str(smollm2)).save_pretrained(str(bf16))
    corpus = write_text_corpus(tmp_path / "corpus.txt")
    recipe = parse_edit_recipe(
        {
            "edit_method": "rome",
            "model": str(bf16),
            "requests": [JAPAN],
            "hyperparameters": {"layers": [5], "context_template_counts": [], "edit_margin": None},
            "covariance": {
                "source": "text",
                "paths": [str(corpus)],
                "tokens": 4000,
                "max_length": 64,
            },
            "on_gate_failure": "publish_flagged",
        }
    )
    return recipe, bf16


JAPAN = {
    "prompt": "The capital of Japan is",
    "subject": "Japan",
    "target_new": "Paris",
    "target_true": "Tokyo",
}
# ‖ΔW_bf16 − ΔW_f32‖ / ‖ΔW_f32‖ on SmolLM2 (30 layers, 15 Adam steps before the early stop
# on both): measured 0.115 on the CPU (cos 0.9965 between the left factors, 0.9971 between
# the right ones: each factor's direction alone is √(2(1 − cos)) ≈ 8 % away). 0.25 allows
# about twice that for a GPU's bf16 kernels; a wrong path (a lost gradient, another layer's
# key, a stale C) is O(1) away.
SMOLLM2_TOLERANCE = 0.25


@pytest.mark.slow
def test_a_smollm2_edit_loaded_in_bf16_takes_and_stays_close_to_the_float32_edit(
    smollm2, tmp_path
) -> None:
    recipe, _ = _smollm2_bf16_edit(smollm2, tmp_path)
    f32 = run_edit(recipe, None, cache=LocalCovarianceCache(tmp_path / "a"))
    bf16 = run_edit(recipe, None, cache=LocalCovarianceCache(tmp_path / "b"), dtype=torch.bfloat16)
    assert bf16.manifest["compute"] == {"device": "cpu", "dtype": "bfloat16"}
    assert bf16.metrics["efficacy"] == 1.0 == f32.metrics["efficacy"]
    (a,), (b,) = f32.updates, bf16.updates
    delta_f32, delta_bf16 = torch.outer(a.left, a.right), torch.outer(b.left, b.right)
    assert _relative_difference(delta_bf16, delta_f32) < SMOLLM2_TOLERANCE


@pytest.mark.gpu
@pytest.mark.slow
def test_a_smollm2_rome_edit_on_cuda_in_bf16_takes_and_matches_the_cpu_edit(
    smollm2, tmp_path
) -> None:
    recipe, _ = _smollm2_bf16_edit(smollm2, tmp_path)
    cpu = run_edit(recipe, None, cache=LocalCovarianceCache(tmp_path / "a"), device="cpu")
    torch.cuda.reset_peak_memory_stats()
    gpu = run_edit(recipe, None, cache=LocalCovarianceCache(tmp_path / "b"), device="cuda")
    assert gpu.manifest["compute"] == {"device": "cuda:0", "dtype": "bfloat16"}
    assert torch.cuda.max_memory_allocated() > 0  # it did compute on the GPU
    assert gpu.metrics["efficacy"] == 1.0 == cpu.metrics["efficacy"]
    (a,), (b,) = cpu.updates, gpu.updates
    delta_cpu = torch.outer(a.left, a.right)
    delta_gpu = torch.outer(b.left.cpu(), b.right.cpu())
    assert _relative_difference(delta_gpu, delta_cpu) < SMOLLM2_TOLERANCE
