"""Fine-tunes whose difference from their base is known exactly: the independent expectation
of LoRA extraction (workers/extract).

``build_low_rank_finetune`` adds to every decoder linear weight a ΔW = L·R of a chosen rank
(or a hand-made spectrum U·diag(σ)·Vᵀ, U and V orthonormal from a float64 QR), and returns
the ΔW it added, as stored (float32 of the sum minus the base, so rounding of the fine-tune's
own weights is part of the expectation).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
DECODER_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_of(tensor: str) -> str:
    return tensor.removesuffix(".weight")


def is_decoder_linear(name: str) -> bool:
    return ".layers." in name and module_of(name).rsplit(".", 1)[-1] in DECODER_LINEAR


def low_rank(shape: Sequence[int], rank: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    m, n = shape
    return (torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)) * scale


def spectrum(shape: Sequence[int], sigma: Sequence[float], gen: torch.Generator) -> torch.Tensor:
    """A matrix with exactly the singular values ``sigma`` (float64 construction)."""
    m, n = shape
    k = len(sigma)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return ((u * torch.tensor(sigma, dtype=torch.float64)) @ v.T).float()


def build_low_rank_finetune(
    base: Path,
    target: Path,
    delta_for: Callable[[str, torch.Size, torch.Generator], torch.Tensor | None],
    *,
    seed: int = 0,
    extra: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Copy ``base`` to ``target`` with W + delta_for(name, shape, gen) on every tensor it
    returns a matrix for, and ``extra[name](W)`` replacing other tensors (norms,
    embeddings). Returns {tensor: ΔW as stored} of the changed decoder weights."""
    shutil.copytree(base, target)
    tensors = load_file(str(base / WEIGHTS))
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name in sorted(tensors):
        w = tensors[name]
        d = delta_for(name, w.shape, gen)
        if d is not None:
            tensors[name] = (w.float() + d).to(w.dtype)
            deltas[name] = tensors[name].float() - w.float()
        elif extra and name in extra:
            tensors[name] = extra[name](w).contiguous()
    save_file(tensors, str(target / WEIGHTS), metadata={"format": "pt"})
    return deltas


def write_recipe(folder: Path, recipe: dict[str, Any], name: str = "extract.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def adapter_products(adapter: Path) -> dict[str, torch.Tensor]:
    """{module: lora_B @ lora_A} (float32) of an adapter folder."""
    t = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key in t:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = t[key.replace("lora_A", "lora_B")].float()
            out[module] = b @ t[key].float()
    return out
