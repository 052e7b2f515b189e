"""Seeded randomness per (recipe seed, model index, tensor name).

Every random draw of a merge (DARE, DELLA) comes from a CPU generator seeded by a hash of
the recipe seed, the 0-based index of the fine-tuned model in recipe order (base excluded)
and the tensor name, so results are bit-identical whatever the tensor order, the number of
workers or the device: draws are made on the CPU and then moved.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from merging.lazy_torch import torch


def tensor_seed(seed: int, model_index: int, tensor_name: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{model_index}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, model_index: int, tensor_name: str) -> torch.Generator:
    """The CPU generator of one (recipe seed, model index, tensor name)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(tensor_seed(seed, model_index, tensor_name))
    return g


def uniform(seed: int, model_index: int, tensor_name: str, shape: torch.Size) -> torch.Tensor:
    """U[0, 1) float32 draws of the given shape; entry kept by a rate p iff draw < p."""
    g = generator(seed, model_index, tensor_name)
    return torch.rand(shape, generator=g, dtype=torch.float32)


def uniform_chunks(
    seed: int, model_index: int, tensor_name: str, numel: int, chunk: int
) -> Iterator[torch.Tensor]:
    """The same draws as ``uniform`` over the flattened shape, ``chunk`` at a time into one
    reused buffer (each chunk valid until the next is asked for): the generator hands out
    its stream in order, so consecutive draws of n1 then n2 values are the draws of n1 + n2
    (tests/test_merge_streaming.py checks it)."""
    g = generator(seed, model_index, tensor_name)
    buf = torch.empty(min(numel, chunk), dtype=torch.float32)
    for start in range(0, numel, chunk):
        out = buf[: min(chunk, numel - start)]
        yield torch.rand(out.numel(), generator=g, dtype=torch.float32, out=out)
