"""Progress of a merge, reported to the caller (the job record shows it while it runs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    phase: str  # resolve, statistics, merge, publish
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


ProgressCallback = Callable[[Progress], None]


class ProgressTracker:
    """Counts tensors and input bytes over every pass (statistics passes, then the merge)."""

    def __init__(self, report: ProgressCallback, tensors_total: int, bytes_total: int) -> None:
        self.report = report
        self.tensors_total = tensors_total
        self.bytes_total = bytes_total
        self.tensors_done = 0
        self.bytes_done = 0

    def advance(self, phase: str, nbytes: int) -> None:
        """One more tensor of ``nbytes`` input bytes is through ``phase``."""
        self.tensors_done += 1
        self.bytes_done += nbytes
        # a statistic whose shortcut missed makes more passes than it planned
        self.tensors_total = max(self.tensors_total, self.tensors_done)
        self.bytes_total = max(self.bytes_total, self.bytes_done)
        self.report(
            Progress(
                phase, self.tensors_done, self.tensors_total, self.bytes_done, self.bytes_total
            )
        )

    def advance_many(self, phase: str, tensors: int, nbytes: int) -> None:
        """Several tensors at once (a pass that was not needed), one report."""
        self.tensors_done += tensors - 1
        self.advance(phase, nbytes)

    def publishing(self) -> None:
        """The tensors are all through; the folder's last files are being written. The
        counters stay where every pass left them (they never go back)."""
        self.report(
            Progress(
                "publish", self.tensors_done, self.tensors_total, self.bytes_done, self.bytes_total
            )
        )
