"""Recipes and checkpoint families the job tests share: two-model linear and TIES recipes,
a Llama-shaped family with many tensors (a merge of it runs for seconds), a fine-tune whose
merge overflows, and reading every tensor of a checkpoint back."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def linear(a: Path | str, b: Path | str, seed: int = 1) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 0.5}},
            {"model": str(b), "parameters": {"weight": 0.5}},
        ],
        "seed": seed,
    }


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, whatever its sharding."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def build_many_tensor_family(root: Path, layers: int) -> dict[str, Path]:
    """A Llama-shaped checkpoint with many tensors, so that a TIES merge takes seconds."""
    from transformers import LlamaForCausalLM

    from testbed.tiny_models import llama_config, save_tokenizer

    config = llama_config(num_hidden_layers=layers, hidden_size=128, intermediate_size=256)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).state_dict().items()}
    family = {}
    for seed, name in enumerate(("base", "ft1", "ft2")):
        g = torch.Generator().manual_seed(seed)
        target = root / name
        target.mkdir(parents=True)
        tensors = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(target))
        save_tokenizer(target)
        family[name] = target
    return family


def ties(family: dict[str, Path]) -> dict[str, Any]:
    return {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(family["ft2"]), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "seed": 3,
    }


def slow(family: dict[str, Path], iterations: int) -> dict[str, Any]:
    """A merge that runs for seconds by its settings, not by the machine's speed (which
    tests that act mid-merge need): the Karcher mean of ft1 and ft2, ``iterations``
    iterations for every tensor (a tolerance it never reaches). On this machine: 128 layers
    × 60 iterations ≈ 5 s, 32 × 200 ≈ 4 s."""
    return {
        "merge_method": "karcher",
        "models": [{"model": str(family[k])} for k in ("ft1", "ft2")],
        "parameters": {"max_iter": iterations, "tol": 1e-30},
        "seed": 3,
    }


def huge_finetune(source: Path, dest: Path, peak: float = 1e38) -> Path:
    """``source`` with every tensor scaled so its largest magnitude is ``peak`` (float32
    still holds it): a merge with ordinary weights then overflows in the data, which no
    check of the recipe alone can foresee."""
    dest.mkdir(parents=True)
    for f in source.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            scaled = {k: t / float(t.abs().max() or 1) * peak for k, t in tensors.items()}
            save_file(scaled, str(dest / f.name), metadata={"format": "pt"})
        else:
            shutil.copy(f, dest / f.name)
    return dest
