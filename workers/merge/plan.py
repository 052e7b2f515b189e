"""What a merge will write, checked from the inputs' headers and configs before any math.

Each output tensor gets its shape, dtype and the fine-tuned models that have it; inputs
that cannot be merged (different vocabularies or widths, a shape or dtype that differs, a
tensor the base lacks) are refused here, naming the model and tensor, before a byte of
tensor data is read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from schemas.recipe import MergeRecipe
from workers.errors import InputError
from workers.merge.inputs import InputModel, read_config
from workers.merge.vocabulary import is_vocabulary_tensor
from workers.tensors.safetensors_format import DTYPES

_LAYER = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")


@dataclass(frozen=True)
class PlannedTensor:
    shape: tuple[int, ...]
    dtype_code: str  # of the base (or the first model having it)
    holders: tuple[int, ...]  # indices into the fine-tuned list of models having the tensor
    in_base: bool

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_code]

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def plan_tensors(
    recipe: MergeRecipe,
    base: InputModel | None,
    models: list[InputModel],
    vocab_rows: int | None = None,
) -> dict[str, PlannedTensor]:
    """Output tensors with shapes and holders, checked from headers only (no data read).
    ``vocab_rows``: the output vocabulary's row count under a tokenizer plan (the tensors
    with a vocabulary axis then have it, and the inputs' vocabularies may differ)."""
    reference = base or models[0]
    _check_configs(reference, models, vocabulary_plan=vocab_rows is not None)
    if base is not None:
        names = list(base.reader.names)
    else:
        seen: dict[str, None] = {}
        for m in models:
            for n in m.reader.names:
                seen.setdefault(n, None)
        names = sorted(seen)
    plan: dict[str, PlannedTensor] = {}
    for name in names:
        ref_in = (
            base
            if base is not None and name in base.reader
            else next(m for m in models if name in m.reader)
        )
        info = ref_in.reader.info(name)
        aligned = vocab_rows is not None and is_vocabulary_tensor(name) and len(info.shape) >= 1
        holders = []
        for m in models:
            if name not in m.reader:
                continue
            mi = m.reader.info(name)
            if aligned and tuple(mi.shape[1:]) != tuple(info.shape[1:]):
                raise InputError(
                    f"shape {tuple(mi.shape)} differs from {tuple(info.shape)} in "
                    f"{ref_in.label!r} beyond the vocabulary axis — the hidden sizes differ; "
                    "models of different widths cannot be merged",
                    model=m.label,
                    tensor=name,
                )
            if not aligned and tuple(mi.shape) != tuple(info.shape):
                raise InputError(
                    f"shape {tuple(mi.shape)} differs from {tuple(info.shape)} in "
                    f"{ref_in.label!r}{_mismatch_hint(name, tuple(mi.shape), tuple(info.shape))}",
                    model=m.label,
                    tensor=name,
                )
            if mi.dtype != info.dtype:
                raise InputError(
                    f"dtype {mi.dtype} differs from {info.dtype} in {ref_in.label!r}; convert "
                    "the inputs to one dtype first",
                    model=m.label,
                    tensor=name,
                )
            assert m.index is not None
            holders.append(m.index)
        shape = tuple(info.shape)
        if aligned:
            assert vocab_rows is not None
            shape = (vocab_rows, *shape[1:])
        plan[name] = PlannedTensor(shape, info.dtype, tuple(holders), base is not None)
    if base is not None:
        for m in models:
            extra = [n for n in m.reader.names if n not in base.reader]
            if extra:
                more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
                raise InputError(
                    f"tensor is missing from the base model {base.label!r}{more}; the method "
                    f"{recipe.merge_method!r} computes differences from the base, so every "
                    "tensor must exist there",
                    model=m.label,
                    tensor=extra[0],
                )
    if not plan:
        raise InputError("the inputs contain no tensors", model=reference.label)
    return plan


def _check_configs(
    reference: InputModel, models: list[InputModel], *, vocabulary_plan: bool
) -> None:
    """Vocabulary size (unless a tokenizer plan aligns the vocabularies) and hidden size
    from config.json, where the configs say them."""
    ref_cfg = read_config(reference.resolved.path)
    ref_vocab, ref_width = _config_int(ref_cfg, _VOCAB_KEYS), _config_int(ref_cfg, _WIDTH_KEYS)
    for m in models:
        cfg = read_config(m.resolved.path)
        vocab, width = _config_int(cfg, _VOCAB_KEYS), _config_int(cfg, _WIDTH_KEYS)
        if (
            not vocabulary_plan
            and ref_vocab is not None
            and vocab is not None
            and vocab != ref_vocab
        ):
            raise InputError(
                f"vocabulary size {vocab} differs from {ref_vocab} of {reference.label!r}; "
                "merging models with different vocabularies needs a tokenizer plan: set "
                "'tokenizer_source' (base, union or a model) or 'tokenizer'",
                model=m.label,
                field=f"{m.role}.model",
            )
        if ref_width is not None and width is not None and width != ref_width:
            raise InputError(
                f"hidden size {width} differs from {ref_width} of {reference.label!r}: models "
                "of different widths are different architectures and cannot be merged",
                model=m.label,
                field=f"{m.role}.model",
            )


_VOCAB_KEYS = ("vocab_size", "n_vocab")
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")


def _config_int(cfg: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    text = cfg.get("text_config")  # multimodal configs nest the language model's
    if isinstance(text, dict):
        return _config_int(text, keys)
    return None


def _mismatch_hint(name: str, shape: tuple[int, ...], ref: tuple[int, ...]) -> str:
    """What a shape mismatch of an embedding or output head means: (vocabulary, hidden)."""
    if not _is_embedding(name) or len(shape) != 2 or len(ref) != 2:
        return ""
    if shape[1] != ref[1]:
        return " — the hidden sizes differ; models of different widths cannot be merged"
    return (
        " — the vocabularies differ; merging them needs a tokenizer plan ('tokenizer_source' "
        "or 'tokenizer')"
    )


def _is_embedding(name: str) -> bool:
    return any(k in name for k in ("embed", "lm_head", "wte", "word_embeddings", "output.weight"))


def num_layers(first: InputModel, plan: dict[str, PlannedTensor]) -> int:
    """The number of layers, for parameter gradients: from config.json, else the names."""
    cfg = read_config(first.resolved.path)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return int(cfg[key])
    layers = [int(m.group(1)) for n in plan if (m := _LAYER.search(n))]
    return max(layers) + 1 if layers else 1


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None
