"""Statistics over whole models, gathered in extra streaming passes before the merge.

A method that needs one (``scope: global`` TIES, PCB) returns a :class:`WholeModelStatistic`
from ``MergeMethod.whole_model_statistic``; the engine runs it against a :class:`WholeModel`,
its view of the merge, and hands the result to every tensor's merge as ``TensorInputs.stats``.
Each pass reads every float tensor once, one tensor at a time and block by block; exact order
statistics come from radix select (two passes: high then low 16 bits), so memory is
O(65,536) counters per model whatever the model size.

Every pass ends with :meth:`WholeModel.reduce` of what it gathered: integer counts (summed)
and maxima (keys starting ``max/``). In one process that is the pass's own result; a merge
split into parts (workers/merge/parts.py) has each part read its own tensors and the
partials combined exactly (integer sums, maxima), so the statistic is bit-identical
whatever the split.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from merging.lazy_torch import torch
from merging.selection import RadixSelect, WindowSelect, quantile_window

if TYPE_CHECKING:
    from merging.inputs import Block, TensorInputs


class WholeModel(Protocol):
    """The engine's view of a merge, for statistics over every parameter of each model."""

    def float_sizes(self) -> dict[int, int]:
        """Float parameters each fine-tuned model has (by model index), from the headers."""
        ...

    def model_parameters(self) -> dict[int, dict[str, Any]]:
        """Each fine-tuned model's parameters (by model index). A whole-model statistic
        takes one value per model, so they are resolved for the first tensor."""
        ...

    def shared_parameters(self) -> dict[str, Any]:
        """The shared parameters, resolved for the first tensor."""
        ...

    def tensors(self, phase: str) -> Iterator[TensorInputs]:
        """One pass: every float tensor's inputs in turn (read them with ``blocks()``);
        ``phase`` is what the job's progress shows meanwhile."""
        ...

    def sample(self, elements: int) -> Iterator[tuple[TensorInputs, Block]]:
        """Blocks of about ``elements`` elements of each input, spread over every float
        tensor (for guesses: no progress, no pass; non-finite values are not checked)."""
        ...

    @property
    def in_parts(self) -> bool:
        """Whether the passes run split across processes (each pass then reads part of the
        tensors and ``reduce`` combines the partials): a statistic's single-process
        shortcuts (fewer passes than ``passes``) are for when it is False."""
        ...

    def skip_pass(self, phase: str) -> None:
        """A pass counted in ``passes`` that a shortcut made unnecessary: the progress moves
        past it as if it were read."""
        ...

    def reduce(self, partial: Partial) -> Partial:
        """At the end of each pass, exactly once: what the pass gathered over the tensors
        this process read (int64 counts, summed; float maxima under keys starting ``max/``)
        → the same over every tensor of the model. In one process it is ``partial``."""
        ...


class WholeModelStatistic(ABC):
    passes: int  # reads of every float tensor it makes (for the progress totals)

    @abstractmethod
    def compute(self, model: WholeModel) -> dict[str, Any]:
        """The statistics, handed to each tensor's merge as ``TensorInputs.stats``."""


# the result of one pass over some tensors: name -> int64 counts, or a maximum (``max/…``)
Partial = dict[str, "torch.Tensor"]


def combine_partials(partials: Iterable[Partial]) -> Partial:
    """The partials of one pass over disjoint sets of tensors, combined exactly: counts are
    added (int64), maxima taken; a key missing from a partial counts as 0 (or −inf)."""
    combined: Partial = {}
    for partial in partials:
        for key, value in partial.items():
            if key not in combined:
                combined[key] = value.clone()
            elif key.startswith("max/"):
                combined[key] = torch.maximum(combined[key], value)
            else:
                combined[key] = combined[key] + value
    return combined


# values(x, block) -> (model index, values of that model in this block) for each model
BlockValues = Callable[["TensorInputs", "Block"], Iterable[tuple[int, "torch.Tensor"]]]


def select_per_model(
    model: WholeModel,
    ranks: dict[int, list[int]],
    values: BlockValues,
    phase: str,
    maxima: dict[int, float] | None = None,
    *,
    nonnegative: bool = False,
) -> dict[int, list[float]]:
    """Exact k-th smallest values (1-based ``ranks`` per model index) of ``values`` over
    the whole model, in two streaming passes (the inputs are never held whole).

    ``maxima``: per-model maxima that ``values`` updates as it goes (PCB's max of B); they
    are reduced with the second pass, so they hold the whole model's maxima on return.
    ``nonnegative``: the values are never negative (nor −0.0), so their bit patterns are
    their order keys as they are."""
    sel = {i: RadixSelect(ranks=r, nonnegative=nonnegative) for i, r in ranks.items()}
    for x in model.tensors(f"{phase} (1/2)"):
        for b in x.blocks():
            for i, v in values(x, b):
                if i in sel:
                    sel[i].observe_high(v)
    high = model.reduce({k: v for i, s in sel.items() for k, v in s.high_partial(f"{i}").items()})
    for i, s in sel.items():
        s.set_high_partial(f"{i}", high)
        s.end_high()
    for x in model.tensors(f"{phase} (2/2)"):
        for b in x.blocks(check=False):
            for i, v in values(x, b):
                if i in sel:
                    sel[i].observe_low(v)
    partial = {k: v for i, s in sel.items() for k, v in s.low_partial(f"{i}").items()}
    for i, m in (maxima or {}).items():
        partial[f"max/{i}"] = torch.tensor([m], dtype=torch.float64)
    low = model.reduce(partial)
    for i, s in sel.items():
        s.set_low_partial(f"{i}", low)
        s.end_low()
    if maxima is not None:
        for i in maxima:
            if f"max/{i}" in low:
                maxima[i] = float(low[f"max/{i}"].item())
    return {i: s.values for i, s in sel.items()}


# a window around a rank is guessed from about this many sampled values of each model, and
# spans the sample's quantile ± this many standard errors of a sample quantile's rank
WINDOW_SAMPLE = 1 << 20
WINDOW_SPREAD = 8.0


def select_in_window(
    model: WholeModel,
    ranks: dict[int, int],
    samples: dict[int, torch.Tensor],
    values: BlockValues,
    phase: str,
    *,
    check: bool = True,
) -> dict[int, tuple[float, float]] | None:
    """Exact k-th smallest values (1-based ``ranks`` per model index) of ``values`` over
    the whole model in one streaming pass instead of radix select's two, in one process:
    a window around each rank is guessed from the model's ``samples`` of the same values,
    and the pass counts what lies below it and keeps what lies in it (WindowSelect).

    Returns (k-th value, maximum) per model, and moves the progress past the pass it saved;
    None when a window missed the rank (then find it by ``select_per_model``). ``check``:
    whether this pass checks the inputs for NaN/Inf (the first pass over them does)."""
    sizes = model.float_sizes()
    windows = {
        i: WindowSelect(sizes[i], k, *quantile_window(samples[i], k / sizes[i], WINDOW_SPREAD))
        for i, k in ranks.items()
    }
    for x in model.tensors(phase):
        for b in x.blocks(check=check):
            for i, v in values(x, b):
                if i in windows:
                    windows[i].observe(v)
    found = {i: w.value() for i, w in windows.items()}
    if any(v is None for v in found.values()):
        return None
    model.skip_pass(phase)
    return {i: (float(v), windows[i].maximum) for i, v in found.items() if v is not None}


def task_vector_magnitudes(x: TensorInputs, b: Block) -> Iterator[tuple[int, torch.Tensor]]:
    """|τj| of every model on this block."""
    for j in range(x.count):
        yield x.model_indices[j], b.tau(j).abs_()
