"""Read-ahead of input tensors on a background thread.

A pass over the model reads tensors in an order known in advance (for each output tensor:
the base, then each fine-tuned model). A reader thread follows that order a few tensors
ahead of the merge, so file reads (which release the GIL) overlap with the math. Memory is
bounded by ``depth`` raw tensors; a read that does not match the plan (a method that visits
a model twice) is served directly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any


class ReadAhead:
    def __init__(self, order: Sequence[Hashable], read: Callable[[Any], Any], depth: int = 2):
        self._order = list(order)
        self._read = read
        self._depth = depth
        self._ready: dict[int, tuple[Any, BaseException | None]] = {}
        self._next_to_serve = 0  # position in the order the consumer is expected to ask for
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i, key in enumerate(self._order):
            with self._cond:
                while not self._stopped and i >= self._next_to_serve + self._depth:
                    self._cond.wait()
                if self._stopped:
                    return
                if i < self._next_to_serve:  # the consumer already went past it
                    continue
            try:
                item: tuple[Any, BaseException | None] = (self._read(key), None)
            except BaseException as e:  # handed to the consumer, who raises it in context
                item = (None, e)
            with self._cond:
                if i >= self._next_to_serve:  # else the consumer went past it while it was read
                    self._ready[i] = item
                self._cond.notify_all()

    def get(self, key: Hashable) -> Any:
        """The tensor for ``key``: from the read-ahead when it is next in the order."""
        with self._cond:
            i = self._find(key)
            if i is None:
                return self._read(key)
            # entries the consumer skipped are dropped
            for skipped in range(self._next_to_serve, i):
                self._ready.pop(skipped, None)
            self._next_to_serve = i
            self._cond.notify_all()
            while i not in self._ready and not self._stopped:
                self._cond.wait()
            value, error = self._ready.pop(i)
            self._next_to_serve = i + 1
            self._cond.notify_all()
        if error is not None:
            raise error
        return value

    def _find(self, key: Hashable) -> int | None:
        end = min(len(self._order), self._next_to_serve + self._depth + 8)
        for i in range(self._next_to_serve, end):
            if self._order[i] == key:
                return i
        return None

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
