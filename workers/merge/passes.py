"""The engine's side of whole-model statistics: passes over every float tensor.

:class:`ModelPasses` is the :class:`merging.statistics.WholeModel` a method's statistic
(``scope: global`` TIES, PCB) reads the model through: one tensor at a time, streamed in
blocks, with progress reported and cancellation checked between tensors.

A merge split into parts (parts.py) runs the statistic's passes one at a time across its
parts: :class:`PassSchedule` says which pass this process reads (over which tensors) and
what each pass's reduce gives, so the statistic's own code runs unchanged in each part:
the passes before the one being read are replayed from their combined results (no reading),
the one being read stops the statistic with its partial (:class:`PassRead`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from merging.inputs import Block, TensorInputs
from merging.statistics import Partial
from workers.merge.parameters import ParameterResolver
from workers.merge.progress import ProgressTracker
from workers.merge.reading import InputReader


class PassRead(Exception):
    """The pass a part was to read is read: ``partial`` is what it gathered."""

    def __init__(self, index: int, partial: Partial) -> None:
        super().__init__(f"pass {index} read")
        self.index = index
        self.partial = partial


class PassSchedule:
    """Which statistics pass this process reads, and the combined results of the earlier
    ones. ``read``: the index (0-based) of the pass to read over ``tensors`` (the part's
    float tensors), or None to read nothing (all passes ``combined``: the statistic is
    rebuilt from them without reading anything)."""

    def __init__(
        self, combined: list[Partial], read: int | None = None, tensors: set[str] | None = None
    ) -> None:
        self.combined = combined
        self.read = read
        self.tensors = tensors or set()

    def reads(self, index: int, name: str) -> bool:
        return index == self.read and name in self.tensors

    def reduce(self, index: int, partial: Partial) -> Partial:
        if index < len(self.combined):
            return self.combined[index]
        raise PassRead(index, partial)


class ModelPasses:
    def __init__(
        self,
        reader: InputReader,
        params: ParameterResolver,
        progress: ProgressTracker,
        tensor_inputs: Callable[[str], TensorInputs],
        check_cancel: Callable[[], None],
        schedule: PassSchedule | None = None,
    ) -> None:
        self.reader = reader
        self.params = params
        self.progress = progress
        self.tensor_inputs = tensor_inputs  # a tensor's inputs, streamed, no statistics yet
        self.check_cancel = check_cancel
        self.first = next(iter(reader.plan))
        self.current_tensor: str | None = None  # the tensor a pass is on (for errors)
        self.schedule = schedule  # None: one process reads every pass over every tensor
        self._pass = -1

    def float_sizes(self) -> dict[int, int]:
        sizes: dict[int, int] = {m.index: 0 for m in self.reader.models if m.index is not None}
        for p in self.reader.plan.values():
            if p.is_float:
                for i in p.holders:
                    sizes[i] += p.numel
        return sizes

    def model_parameters(self) -> dict[int, dict[str, Any]]:
        return {
            m.index: self.params.for_model(m, self.first)
            for m in self.reader.models
            if m.index is not None
        }

    def shared_parameters(self) -> dict[str, Any]:
        return self.params.shared(self.first)

    def tensors(self, phase: str) -> Iterator[TensorInputs]:
        self._pass += 1
        for name in [n for n, p in self.reader.plan.items() if p.is_float]:
            if self.schedule is not None and not self.schedule.reads(self._pass, name):
                continue
            self.check_cancel()
            self.current_tensor = name
            yield self.tensor_inputs(name)
            self.progress.advance(phase, self.reader.input_bytes(name))

    def sample(self, elements: int, stretch: int = 512) -> Iterator[tuple[TensorInputs, Block]]:
        """About ``elements`` elements of each input, in stretches of ``stretch`` spread
        evenly over every float tensor in proportion to its size (tensors read aligned
        to an output vocabulary are left out). Read directly: no progress, no pass."""
        names = [n for n, p in self.reader.plan.items() if p.is_float and not self.reader.aligns(n)]
        total = sum(self.reader.plan[n].numel for n in names) or 1
        for name in names:
            numel = self.reader.plan[name].numel
            count = min(max(1, round(elements * numel / total / stretch)), -(-numel // stretch))
            x = self.tensor_inputs(name)
            for s in range(count):
                start = (s * numel // count) // stretch * stretch
                yield x, self.reader.block_at(name, start, min(start + stretch, numel))

    @property
    def in_parts(self) -> bool:
        return self.schedule is not None

    def skip_pass(self, phase: str) -> None:
        self._pass += 1
        names = [n for n, p in self.reader.plan.items() if p.is_float]
        self.progress.advance_many(phase, len(names), sum(map(self.reader.input_bytes, names)))

    def reduce(self, partial: Partial) -> Partial:
        if self.schedule is None:
            return partial
        return self.schedule.reduce(self._pass, partial)
