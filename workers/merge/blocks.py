"""Streaming one tensor's inputs in blocks of its flattened elements.

A large tensor (a 32000×2048 embedding is 262 MB in float32) never has to be held whole by
an element-wise method: its inputs are read block by block straight from the files into a
few reused buffers, each block is merged while the next one is being read on a background
thread, and the merged block goes to the writer. Memory is then a few blocks per input,
whatever the tensor or model size, and a block's float32 working set stays in the CPU cache.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

# elements per block: 256 Ki float32 (1 MiB) keeps a block's temporaries in L2/L3 cache
BLOCK_ELEMENTS = 1 << 18

# blocks read ahead on a thread (0: read in the consumer's thread)
READ_AHEAD_BLOCKS = 0

# reads elements [start, start + out.numel()) of one input's flattened tensor into ``out``
ReadInto = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Block:
    """Elements [start, stop) of the flattened tensor of every input, as stored (e.g. fp16).

    The raw tensors are views of buffers that are reused for a later block: use them only
    until the next block is asked for, and never hand them out (``theta``/``tau``/``base32``
    return fresh float32 tensors).
    """

    start: int
    stop: int
    base_raw: torch.Tensor | None
    raws: list[torch.Tensor]
    _base32: torch.Tensor | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return self.stop - self.start

    def base32(self) -> torch.Tensor:
        """θ0 of this block in float32, computed once per block (a method that modifies it
        must not use it again)."""
        assert self.base_raw is not None
        if self._base32 is None:
            self._base32 = self.base_raw.to(torch.float32, copy=True)
        return self._base32

    def theta(self, j: int) -> torch.Tensor:
        """A fresh float32 copy of θj on this block."""
        return self.raws[j].to(torch.float32, copy=True)

    def tau(self, j: int) -> torch.Tensor:
        """τj = θj − θ0 on this block, fresh float32."""
        return self.theta(j).sub_(self.base32())


def block_ranges(numel: int, block: int | None = None) -> list[tuple[int, int]]:
    size = block or BLOCK_ELEMENTS
    return [(s, min(s + size, numel)) for s in range(0, numel, size)] or [(0, 0)]


def stream_blocks(
    numel: int,
    dtype: torch.dtype,
    base: ReadInto | None,
    models: list[ReadInto],
    *,
    depth: int | None = None,
) -> Iterator[Block]:
    """Blocks of every input's flattened tensor, in order, read ``depth`` blocks ahead.

    Each input has ``depth + 1`` reused buffers of one block, so memory is a few blocks per
    input. A tensor of a single block is read synchronously (no thread).
    """
    sources = ([base] if base is not None else []) + models
    ranges = block_ranges(numel)
    depth = READ_AHEAD_BLOCKS if depth is None else depth
    if len(ranges) == 1 or depth == 0:
        size = ranges[0][1] - ranges[0][0]
        bufs = [torch.empty(size, dtype=dtype) for _ in sources]
        for start, end in ranges:
            views = [read(start, b[: end - start]) for read, b in zip(sources, bufs, strict=True)]
            yield _block((start, end), views, base is not None)
        return
    size = ranges[0][1] - ranges[0][0]
    free: queue.Queue[list[torch.Tensor]] = queue.Queue()
    for _ in range(depth + 1):
        free.put([torch.empty(size, dtype=dtype) for _ in sources])
    # (buffers, their views holding the block, error)
    ready: queue.Queue[tuple[list[torch.Tensor], list[torch.Tensor], BaseException | None]] = (
        queue.Queue()
    )
    stop = threading.Event()

    def run() -> None:
        for start, end in ranges:
            bufs = free.get()
            if stop.is_set():
                return
            try:
                views = [
                    read(start, b[: end - start]) for read, b in zip(sources, bufs, strict=True)
                ]
                ready.put((bufs, views, None))
            except BaseException as e:  # raised by the consumer, in context
                ready.put(([], [], e))
                return

    thread = threading.Thread(target=run, name="block-read", daemon=True)
    thread.start()
    try:
        for r in ranges:
            bufs, views, error = ready.get()
            if error is not None:
                raise error
            yield _block(r, views, base is not None)
            # the consumer is done with this block: its buffers can take a later one
            free.put(bufs)
    finally:
        stop.set()
        free.put([])  # wake the reader if it waits for a buffer
        thread.join()


def _block(r: tuple[int, int], views: list[torch.Tensor], has_base: bool) -> Block:
    if has_base:
        return Block(r[0], r[1], views[0], views[1:])
    return Block(r[0], r[1], None, views)
