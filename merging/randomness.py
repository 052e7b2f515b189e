"""Seeded randomness per (recipe seed, model index, tensor name).

Every random draw of a merge (DARE, DELLA) comes from a CPU generator seeded by a hash of
the recipe seed, the 0-based index of the fine-tuned model in recipe order (base excluded)
and the tensor name, so results are bit-identical whatever the tensor order, the number of
workers or the device: draws are made on the CPU and then moved.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque

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


def draw_stream(
    seed: int, model_index: int, tensor_name: str, ahead: DrawsAhead | None = None
) -> DrawStream:
    """The draws of one (recipe seed, model index, tensor name): from ``ahead`` when it
    makes them, else by the generator here."""
    if ahead is not None and ahead.seed == seed:
        return ahead.stream(model_index, tensor_name)
    return DrawStream(seed, model_index, tensor_name, None)


class DrawStream:
    """One (recipe seed, model index, tensor name)'s draws in order, ``take(n)`` at a time:
    consecutive takes of n1 then n2 values are the draws of n1 + n2: the generator hands
    out its stream in order (tests/test_randomness.py checks it).
    Made by the generator here, or handed over by :class:`DrawsAhead`'s thread."""

    def __init__(self, seed: int, model_index: int, tensor_name: str, ahead: DrawsAhead | None):
        self._key = (model_index, tensor_name)
        self._ahead = ahead
        self._g: torch.Generator | None = None
        if ahead is None:
            self._g = generator(seed, model_index, tensor_name)
        self._chunk: torch.Tensor | None = None  # the chunk handed over last …
        self._used = 0  # … and how many of its draws were taken
        self._spill: torch.Tensor | None = None  # for takes across chunks

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` draws (float32, U[0, 1)), valid until this stream's next take
        (the buffers are reused)."""
        if self._g is not None:
            return torch.rand(n, generator=self._g, dtype=torch.float32)
        if n == 0:
            return torch.empty(0, dtype=torch.float32)
        if self._chunk is None or self._used == self._chunk.numel():
            self._next_chunk()
        assert self._chunk is not None
        if self._chunk.numel() - self._used >= n:
            self._used += n  # within the current chunk: a view of it
            return self._chunk[self._used - n : self._used]
        if self._spill is None or self._spill.numel() < n:
            self._spill = torch.empty(n, dtype=torch.float32)
        out, filled = self._spill[:n], 0
        while filled < n:
            if self._chunk is None or self._used == self._chunk.numel():
                self._next_chunk()
            assert self._chunk is not None
            got = min(n - filled, self._chunk.numel() - self._used)
            out[filled : filled + got] = self._chunk[self._used : self._used + got]
            filled, self._used = filled + got, self._used + got
        return out

    def _next_chunk(self) -> None:
        assert self._ahead is not None
        if self._chunk is not None:
            self._ahead.give_back(self._chunk)
        self._chunk, self._used = self._ahead.next_chunk(self._key), 0


class DrawsAhead:
    """Every draw a merge will make, made ahead on a background thread in the order the
    merge asks for them: (model index, tensor name, element count) in ``order``, each from
    its own generator, ``chunk`` draws at a time, at most ``ahead_bytes`` of them waiting.

    Draws are the merge's largest single cost for DARE and DELLA on the CPU (mt19937 makes
    about one float32 per 2 ns) and need nothing from the merge but the order, so a second
    core makes them while the first computes; the values are those of ``generator``'s stream
    whatever the chunking. A stream asked for out of order, or after ``close``, is drawn by
    its caller instead (``stream``); chunks of streams the merge skips are dropped."""

    def __init__(
        self,
        seed: int,
        order: list[tuple[int, str, int]],
        *,
        chunk: int = 1 << 20,
        ahead_bytes: int = 64 << 20,
    ) -> None:
        self.seed = seed
        self._order = list(order)
        self._position = {(m, n): i for i, (m, n, _) in enumerate(self._order)}
        self._chunk = chunk
        self._ahead_elements = max(chunk, ahead_bytes // 4)
        self._ready: deque[tuple[tuple[int, str], torch.Tensor | None]] = deque()
        self._waiting = 0  # elements in _ready
        self._current = 0  # the position in ``order`` of the stream being consumed
        self._handed = -1  # the last position handed out (each stream is handed out once)
        self._cond = threading.Condition()
        self._closed = self._done = False
        self._free: list[torch.Tensor] = []  # buffers of used chunks
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="draws-ahead", daemon=True)
        self._thread.start()

    def stream(self, model_index: int, tensor_name: str) -> DrawStream:
        key = (model_index, tensor_name)
        with self._cond:
            at = self._position.get(key)
            ours = not self._closed and at is not None and at > self._handed
            if ours:
                assert at is not None
                # the streams before it are skipped: their chunks are dropped
                self._current = self._handed = at
                self._cond.notify_all()
        return DrawStream(self.seed, model_index, tensor_name, self if ours else None)

    def next_chunk(self, key: tuple[int, str]) -> torch.Tensor:
        """The next chunk of ``key``'s draws (dropping the chunks of skipped streams)."""
        with self._cond:
            while True:
                while not self._ready and self._error is None and not self._done:
                    self._cond.wait()
                if self._error is not None:
                    raise self._error
                if not self._ready:  # (the stream was handed out, so it is made: never)
                    raise RuntimeError(f"no draws of {key} were made")
                got, chunk = self._ready.popleft()
                if chunk is not None:
                    self._waiting -= chunk.numel()
                self._cond.notify_all()
                if got == key and chunk is not None:
                    return chunk
                if got == key:  # the end marker: the stream was asked for more than it has
                    raise ValueError(f"draws of {key} asked for beyond their count")

    def give_back(self, chunk: torch.Tensor) -> None:
        """A chunk whose draws are all used: its buffer makes a later chunk (a fresh
        allocation is page-faulted in, which costs about as much as the draws)."""
        with self._cond:
            if len(self._free) < 4:
                self._free.append(chunk)

    def _buffer(self, n: int) -> torch.Tensor:
        with self._cond:
            while self._free:
                buf = self._free.pop()
                if buf.numel() >= n:
                    return buf[:n]
        return torch.empty(n, dtype=torch.float32)

    def _run(self) -> None:
        try:
            for i, (model_index, name, numel) in enumerate(self._order):
                g = generator(self.seed, model_index, name)
                for start in range(0, numel, self._chunk):
                    n = min(self._chunk, numel - start)
                    with self._cond:
                        while (
                            not self._closed
                            and self._waiting + n > self._ahead_elements
                            and self._waiting > 0
                        ):
                            self._cond.wait()
                        if self._closed:
                            return
                        skipped = i < self._current
                    if skipped:
                        break  # the merge went past this stream: draw none of the rest
                    chunk = torch.rand(n, generator=g, dtype=torch.float32, out=self._buffer(n))
                    with self._cond:
                        self._ready.append(((model_index, name), chunk))
                        self._waiting += n
                        self._cond.notify_all()
                with self._cond:
                    self._ready.append(((model_index, name), None))
                    self._cond.notify_all()
        except BaseException as e:  # handed to the merge by next_chunk
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
