"""Which files of a checkpoint folder or repository a merge needs.

Only top-level files count: weights (safetensors, or pickle ``.bin`` as an opt-in fallback),
their index, the model config and the tokenizer. Subfolders (``original/``, ``onnx/``, ...) and
training leftovers (``training_args.bin``, ``optimizer.pt``, ...) are never fetched.

When ``model.safetensors.index.json`` exists only the shards it names are taken: some repos ship
the same weights twice (e.g. a ``consolidated.safetensors`` beside the sharded
``model-0000x-of-0000n.safetensors``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

# adapter_config.json: a PEFT LoRA adapter named as the ADAPTER of BASE+ADAPTER
CONFIG_FILES = frozenset({"config.json", "generation_config.json", "adapter_config.json"})
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
    }
)
TOKENIZER_PATTERNS = ("*.tiktoken",)
PICKLE_PATTERN = "pytorch_model*.bin"


class NoWeightsError(ValueError):
    """The file list has no usable weights; the message says why and what to do."""


@dataclass(frozen=True)
class Selection:
    weights: tuple[str, ...]  # weight files, plus their index if any
    aux: tuple[str, ...]  # config and tokenizer files
    pickle: bool  # the weights are pickle ``.bin`` files

    @property
    def files(self) -> tuple[str, ...]:
        return self.weights + self.aux


def is_aux_file(name: str) -> bool:
    return (
        name in CONFIG_FILES
        or name in TOKENIZER_FILES
        or any(fnmatch.fnmatchcase(name, p) for p in TOKENIZER_PATTERNS)
    )


def shards_from_index(index: Any, index_name: str) -> set[str]:
    """The shard file names an ``*.index.json`` document maps tensors to."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise NoWeightsError(f"{index_name} has no 'weight_map': the index file is not valid")
    values = list(weight_map.values())
    if not all(isinstance(v, str) and v for v in values):
        raise NoWeightsError(f"{index_name} maps tensors to values that are not file names")
    return set(values)


def _weights(
    names: set[str],
    *,
    index: str,
    single: str,
    others: list[str],
    load_index: Callable[[str], Any],
) -> list[str]:
    if index in names:
        shards = shards_from_index(load_index(index), index)
        missing = sorted(shards - names)
        if missing:
            raise NoWeightsError(
                f"{index} names shard(s) that are not in the checkpoint: {', '.join(missing[:5])}"
            )
        return [index, *sorted(shards)]
    if single in names:
        return [single]
    return sorted(others)


def select_files(
    names: Iterable[str],
    *,
    allow_pickle: bool,
    load_index: Callable[[str], Any],
) -> Selection:
    """Pick the files to fetch from a listing (relative names, ``/``-separated).

    ``load_index(name)`` returns the parsed JSON of an index file; it is called only when the
    listing has one. Raises ``NoWeightsError`` when no usable weights are present.
    """
    top = {n for n in names if "/" not in n}
    aux = sorted(n for n in top if is_aux_file(n))
    safetensors = [n for n in top if n.endswith(".safetensors")]
    if safetensors:
        weights = _weights(
            top,
            index=SAFETENSORS_INDEX,
            single=SAFETENSORS_SINGLE,
            others=safetensors,
            load_index=load_index,
        )
        return Selection(tuple(weights), tuple(aux), pickle=False)
    pickles = [n for n in top if fnmatch.fnmatchcase(n, PICKLE_PATTERN)]
    if pickles:
        if not allow_pickle:
            raise NoWeightsError(
                "the checkpoint has only pickle weights (pytorch_model*.bin), which can run "
                "arbitrary code when loaded and are refused on this server; use a revision with "
                "safetensors weights (convert them, e.g. with the Hub's convert space) or enable "
                "allow_pickle in the worker settings"
            )
        weights = _weights(
            top, index=PICKLE_INDEX, single=PICKLE_SINGLE, others=pickles, load_index=load_index
        )
        return Selection(tuple(weights), tuple(aux), pickle=True)
    sample = ", ".join(sorted(top)[:8]) or "no files"
    raise NoWeightsError(
        "no model weights found: expected *.safetensors files (or model.safetensors.index.json "
        f"with its shards) at the top level, found {sample}"
    )
