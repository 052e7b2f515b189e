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
from typing import Generic, TypeVar

import torch

# elements per block: 256 Ki float32 (1 MiB) keeps a block's temporaries in L2/L3 cache
BLOCK_ELEMENTS = 1 << 18

# blocks read ahead on a thread (0: read in the consumer's thread)
READ_AHEAD_BLOCKS = 0

# what a block reader hands back for its buffer: the view itself, or (on a GPU) the view's
# copy on its way to the device (workers/merge/transfer.py)
V = TypeVar("V")

# reads elements [start, start + out.numel()) of one input's flattened tensor into ``out``
ReadInto = Callable[[int, torch.Tensor], V]
# elements [start, stop) of every input (the base first, if any), as views of reused buffers
Stretch = tuple[int, int, list[V]]


class _Ready(Generic[V]):
    """A block read by the thread: its buffers, what the readers made of them, or the error."""

    def __init__(
        self, bufs: list[torch.Tensor], views: list[V], error: BaseException | None
    ) -> None:
        self.bufs, self.views, self.error = bufs, views, error


def block_ranges(numel: int, block: int | None = None) -> list[tuple[int, int]]:
    size = block or BLOCK_ELEMENTS
    return [(s, min(s + size, numel)) for s in range(0, numel, size)] or [(0, 0)]


def stream_blocks(
    numel: int,
    dtype: torch.dtype,
    base: ReadInto[V] | None,
    models: list[ReadInto[V]],
    *,
    depth: int | None = None,
    block: int | None = None,
    empty: Callable[[int, torch.dtype], torch.Tensor] | None = None,
) -> Iterator[Stretch[V]]:
    """Blocks of every input's flattened tensor, in order, read ``depth`` blocks ahead.

    Each input has ``depth + 1`` reused buffers of one block (``block`` elements, default
    ``BLOCK_ELEMENTS``; made by ``empty``, default ``torch.empty``: pinned ones for a GPU),
    so memory is a few blocks per input: a block's views are valid until the next one is
    asked for. A tensor of a single block is read synchronously (no thread).
    """
    sources = ([base] if base is not None else []) + models
    ranges = block_ranges(numel, block)
    depth = READ_AHEAD_BLOCKS if depth is None else depth
    new = empty or (lambda n, dt: torch.empty(n, dtype=dt))
    if len(ranges) == 1 or depth == 0:
        size = ranges[0][1] - ranges[0][0]
        bufs = [new(size, dtype) for _ in sources]
        for start, end in ranges:
            views = [read(start, b[: end - start]) for read, b in zip(sources, bufs, strict=True)]
            yield start, end, views
        return
    size = ranges[0][1] - ranges[0][0]
    free: queue.Queue[list[torch.Tensor]] = queue.Queue()
    for _ in range(depth + 1):
        free.put([new(size, dtype) for _ in sources])
    ready: queue.Queue[_Ready[V]] = queue.Queue()
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
                ready.put(_Ready(bufs, views, None))
            except BaseException as e:  # raised by the consumer, in context
                ready.put(_Ready([], [], e))
                return

    thread = threading.Thread(target=run, name="block-read", daemon=True)
    thread.start()
    try:
        for r in ranges:
            got = ready.get()
            if got.error is not None:
                raise got.error
            yield r[0], r[1], got.views
            # the consumer is done with this block: its buffers can take a later one (a copy
            # still reading them is waited for by the reader before it refills them)
            free.put(got.bufs)
    finally:
        stop.set()
        free.put([])  # wake the reader if it waits for a buffer
        thread.join()
