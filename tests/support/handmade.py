"""Tiny "Llama-like" checkpoints built by hand, with values chosen so that every expected
merge result can be computed by hand (multiples of 1/64 are exact in float32), and the
three-way refusal check of bad input (library, CLI, file system)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from schemas.recipe import parse_recipe
from weightsmith.cli import main
from workers.errors import InputError
from workers.merge.engine import run_merge

EMBED = "model.embed_tokens.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"
SHAPES: dict[str, tuple[int, ...]] = {
    EMBED: (32, 8),
    DOWN0: (8, 16),
    DOWN1: (8, 16),
    NORM: (8,),
    HEAD: (32, 8),
}
CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "vocab_size": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
# Offsets of the fine-tunes from the base (every tensor moves by the same constant).
FT1_DELTA = 0.5
FT2_DELTA = 1.5


# -- building checkpoints ----------------------------------------------------------------------


def base_tensors() -> dict[str, torch.Tensor]:
    """Distinct, exactly representable values: k/64 for k = 0, 1, 2, ... per tensor."""
    return {
        name: torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) / 64
        for name, shape in SHAPES.items()
    }


def shifted(delta: float) -> dict[str, torch.Tensor]:
    return {name: t + delta for name, t in base_tensors().items()}


def write_model(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    *,
    config: dict[str, Any] | None = None,
    pickle: bool = False,
) -> Path:
    """A checkpoint directory: model.safetensors (or pytorch_model.bin) and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if pickle:
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config if config is not None else CONFIG))
    return folder


def write_raw_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], *, shift: dict[str, int] | None = None
) -> None:
    """A safetensors file written byte by byte; ``shift`` moves a tensor's data_offsets."""
    header: dict[str, Any] = {}
    data = b""
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        extra = (shift or {}).get(name, 0)
        header[name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [len(data) + extra, len(data) + len(raw) + extra],
        }
        data += raw
    body = json.dumps(header).encode()
    body += b" " * (-(8 + len(body)) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def ta_recipe(**extra: Any) -> dict[str, Any]:
    """task_arithmetic over ./models/{ft1, ft2} with ./models/base (paths from tmp_path)."""
    recipe: dict[str, Any] = {
        "merge_method": "task_arithmetic",
        "base_model": "./models/base",
        "models": [{"model": "./models/ft1"}, {"model": "./models/ft2"}],
    }
    recipe.update(extra)
    return recipe


def linear_recipe(*models: str) -> dict[str, Any]:
    return {"merge_method": "linear", "models": [{"model": m} for m in models]}


# -- the three-way refusal check ---------------------------------------------------------------


def tree(root: Path) -> dict[str, int]:
    """Every path under root (hidden ones included) with its size (-1 for directories)."""
    return {
        str(p.relative_to(root)): (-1 if p.is_dir() else p.stat().st_size)
        for p in sorted(root.rglob("*"))
    }


def refused(
    tmp_path: Path,
    recipe: dict[str, Any] | str,
    *,
    expect: tuple[str, ...],
    error: type[Exception] = InputError,
    field: str | None = None,
    model: str | None = None,
    tensor: str | None = None,
    file: str | None = None,
    cli_args: tuple[str, ...] = (),
    engine_kwargs: dict[str, Any] | None = None,
    capsys: pytest.CaptureFixture[str],
) -> Exception:
    """Check the refusal through the library and the CLI; returns the library's exception.

    ``expect``: substrings of the message (checked in the exception and the CLI line).
    ``field``/``model``/``tensor``/``file``: the engine error's location attributes.
    """
    out = tmp_path / "merged"
    recipe_file = tmp_path / "recipe.yaml"
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    recipe_file.write_text(text)
    before = tree(tmp_path)

    with pytest.raises(error) as info:
        parsed = parse_recipe(recipe)
        run_merge(parsed, out, base_dir=tmp_path, **(engine_kwargs or {}))
    exc = info.value
    message = str(exc)
    for part in expect:
        assert part in message, f"{part!r} not in {message!r}"
    if isinstance(exc, InputError):
        assert (exc.field, exc.model, exc.tensor, exc.file) == (field, model, tensor, file), (
            f"location of {message!r}"
        )
    assert tree(tmp_path) == before, "the engine left something behind"

    capsys.readouterr()
    code = main(["merge", str(recipe_file), "--out", str(out), *cli_args])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("weightsmith: error: ")
    for part in expect:
        assert " ".join(part.split()) in lines[0]
    assert tree(tmp_path) == before, "the CLI left something behind"
    return exc
