"""The engine's side of whole-model statistics: passes over every float tensor.

:class:`ModelPasses` is the :class:`merging.statistics.WholeModel` a method's statistic
(``scope: global`` TIES, PCB) reads the model through: one tensor at a time, streamed in
blocks, with progress reported and cancellation checked between tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from merging.inputs import TensorInputs
from workers.merge.parameters import ParameterResolver
from workers.merge.progress import ProgressTracker
from workers.merge.reading import InputReader


class ModelPasses:
    def __init__(
        self,
        reader: InputReader,
        params: ParameterResolver,
        progress: ProgressTracker,
        tensor_inputs: Callable[[str], TensorInputs],
        check_cancel: Callable[[], None],
    ) -> None:
        self.reader = reader
        self.params = params
        self.progress = progress
        self.tensor_inputs = tensor_inputs  # a tensor's inputs, streamed, no statistics yet
        self.check_cancel = check_cancel
        self.first = next(iter(reader.plan))
        self.current_tensor: str | None = None  # the tensor a pass is on (for errors)

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
        for name in [n for n, p in self.reader.plan.items() if p.is_float]:
            self.check_cancel()
            self.current_tensor = name
            yield self.tensor_inputs(name)
            self.progress.advance(phase, self.reader.input_bytes(name))
