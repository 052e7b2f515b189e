"""What a method sees of one tensor: its inputs, block by block, and its parameters.

Notation (docs/merge-methods.md): θ0 the base, θj the fine-tuned models, τj = θj − θ0 their
task vectors. A :class:`Block` holds the same stretch of the tensor in every input, as
stored (e.g. bf16); its float32 views are made on demand, so that a method holds only what
it is working on. The engine makes the blocks (workers/merge): the whole tensor, shaped like
it, or its flattened elements a block at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from merging.lazy_torch import torch
from merging.randomness import DrawsAhead, DrawStream, draw_stream

# Elements per chunk of element-wise work inside a block: the chunk's float32 temporaries
# stay in the CPU cache.
WORK_CHUNK = 1 << 20


class Block:
    """Elements [start, stop) of one tensor in every input.

    For a tensor merged whole, the block is the whole tensor with its shape, and each
    input is read when first asked for (``raw(j)`` reads again on every call, from the page
    cache). For a streamed tensor, the block is a stretch of the flattened tensor whose raw
    views live in buffers the engine reuses for the next block (``reused``): use them until
    the next block is asked for, and never hand them out (``theta``/``tau``/``base32``
    return float32 tensors of their own).
    """

    def __init__(
        self,
        start: int,
        stop: int,
        shape: tuple[int, ...],
        read_base: Callable[[], torch.Tensor] | None,
        read: Callable[[int], torch.Tensor],
        *,
        reused: bool,
    ) -> None:
        self.start, self.stop, self.shape = start, stop, shape
        self._read_base, self._read, self._reused = read_base, read, reused
        self._base32: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def has_base(self) -> bool:
        return self._read_base is not None

    def base_raw(self) -> torch.Tensor:
        """θ0 as stored (like ``raw``, read again on every call of a whole-tensor block)."""
        assert self._read_base is not None, "the method has no base model"
        return self._read_base()

    def raw(self, j: int) -> torch.Tensor:
        """θj as stored: element-wise methods accumulate it into float32 directly."""
        return self._read(j)

    def base32(self) -> torch.Tensor:
        """θ0 in float32, made once per block: a method must not modify it."""
        if self._base32 is None:
            self._base32 = self.base_raw().to(torch.float32, copy=self._reused)
        return self._base32

    def theta(self, j: int) -> torch.Tensor:
        """θj in float32, a tensor of its own."""
        return self.raw(j).to(torch.float32, copy=self._reused)

    def tau(self, j: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """τj = θj − θ0 in float32, a tensor of its own, or made in ``out`` (float32, the
        block's size: a buffer the caller reuses)."""
        base = self.base32()  # first: the engine reads ahead in the order θ0, θ1, θ2, ...
        if out is not None:
            # cast, then a float32 subtraction: the same values as one mixed-dtype sub
            # (the cast is exact), which torch computes several times slower (on a whole
            # embedding matrix, ~2.3 ns an element against ~0.5)
            return out.view(base.shape).copy_(self.raw(j)).sub_(base)
        return self.theta(j).sub_(base)


class Scratch:
    """Work buffers reused from one tensor to the next of a merge, one per ``slot``: a fresh
    tensor-sized allocation is page-faulted in on its first touch, which costs about as much
    as the work done in it. A buffer is replaced by a larger one when a tensor needs more."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, slot: str, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """A flat buffer of ``numel`` elements (contents undefined), valid until the next
        ``get`` of the same slot."""
        buf = self._buffers.get(slot)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != dtype
            or buf.device != torch.device(device)
        ):
            self._buffers.pop(slot, None)  # (freed before the larger one is made)
            buf = self._buffers[slot] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


@dataclass
class TensorInputs:
    """One tensor's merge: its inputs, as blocks, and the parameters resolved for it."""

    name: str
    shape: tuple[int, ...]
    count: int  # fine-tuned models that have this tensor
    model_indices: list[int]  # their 0-based positions among the recipe's fine-tuned models
    params: list[dict[str, Any]]  # per-model parameters, resolved for this tensor
    shared: dict[str, Any]  # shared parameters, resolved for this tensor
    seed: int
    # True: ``blocks()`` yields one block, the whole tensor shaped like it; False: the
    # flattened tensor a block at a time (one block when the tensor is small)
    whole: bool
    # one pass over the inputs; ``check=False`` skips the NaN/Inf check of the inputs, for
    # passes whose output is non-finite wherever an input is (the engine checks the output).
    # The inputs are checked on the first pass that asks for it. ``models=False`` (streamed
    # tensors): the base alone, for a method that holds the models' τ from a pass before.
    blocks: Callable[..., Iterator[Block]]
    # whole-model statistics from the extra streaming passes (MergeMethod.whole_model_statistic)
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings for the manifest
    scratch: Scratch = field(default_factory=Scratch)  # the merge's reused work buffers
    draws_ahead: DrawsAhead | None = None  # random draws made ahead on a thread, if any

    def draws(self, j: int) -> DrawStream:
        """Model j's random draws for this tensor, in order (merging/randomness.py)."""
        return draw_stream(self.seed, self.model_indices[j], self.name, self.draws_ahead)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Float32Scratch:
    """Casts blocks to float32 into one reused buffer: a half-precision operand makes add_
    take a slow mixed-dtype path (several times slower than a cast and a float32 add on a
    cache-sized block)."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def __call__(self, raw: torch.Tensor, *, copy: bool = False) -> torch.Tensor:
        if raw.dtype == torch.float32 and not copy:
            return raw
        if self._buf is None or self._buf.numel() < raw.numel():
            self._buf = torch.empty(raw.numel(), dtype=torch.float32, device=raw.device)
        return self._buf[: raw.numel()].view(raw.shape).copy_(raw)


def scale_(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x·factor in place, skipped for a factor of 1 (x·1 is x exactly, −0.0, ±inf and NaN
    included): a recipe's weights and λ are often 1."""
    return x if factor == 1 else x.mul_(factor)
