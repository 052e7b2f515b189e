"""The streaming (block by block) merge path against the reference merge.

The test models are tiny, so with the default block size every tensor is a single block.
Here the block size is made small and odd (tensors span many blocks, which end at arbitrary
positions inside rows) so that the streamed methods' cross-block logic is exercised: the
exact per-tensor rank windows of TIES and Breadcrumbs found by radix select over the blocks,
with ties broken by position across block boundaries, and PCB's global statistics.
"""

from __future__ import annotations

import pytest
import torch

from merging.selection import RankRangeStream, rank_range_mask
from tests.support.merge_cases import (
    BF16_CASES,
    LLAMA_CASES,
    SEED,
    assert_matches_reference,
    engine,
)
from tests.support.reference_merge import reference_merge
from workers.merge import blocks

STREAMED_LLAMA = [
    "linear",
    "linear_unnormalized_gradient",
    "task_arithmetic",
    "task_arithmetic_normalize",
    "ties",
    "ties_global",
    "breadcrumbs",
    "pcb",
    "pcb_defaults",
]
STREAMED_BF16 = ["linear", "task_arithmetic", "ties", "ties_global", "breadcrumbs", "pcb"]


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 4093)


@pytest.mark.parametrize(
    ("family", "case"),
    [
        *[pytest.param("llama_family", c, id=f"llama-{c}") for c in STREAMED_LLAMA],
        *[pytest.param("bf16_llama_family", c, id=f"bf16-{c}") for c in STREAMED_BF16],
    ],
)
def test_streamed_merge_matches_reference(family, case, small_blocks, request, tmp_path):
    f = request.getfixturevalue(family)
    r = (LLAMA_CASES if family == "llama_family" else BF16_CASES)[case](f)
    _, out = engine(r, tmp_path / "out", seed=SEED)
    assert_matches_reference(out, reference_merge(r, SEED), out_dir=tmp_path / "out")


@pytest.mark.parametrize("descending", [False, True])
def test_rank_window_over_blocks_equals_the_whole_tensor_mask(descending):
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 40, (50_000,), generator=gen).to(torch.float32)  # many ties
    n = x.numel()
    for lo, hi in [(0, 1234), (777, 40_000), (49_000, n), (0, n), (10, 10), (0, 1)]:
        window = RankRangeStream(n, lo, hi, descending=descending)
        parts = [x[s : s + 997] for s in range(0, n, 997)]
        if window.needs_selection:
            for p in parts:
                window.observe_high(p)
            window.end_high()
            for p in parts:
                window.observe_low(p)
            window.end_low()
        got = torch.cat([window.mask(p) for p in parts])
        want = rank_range_mask(x, lo, hi, descending=descending, nonnegative=True)
        assert torch.equal(got, want), (lo, hi)


def test_streamed_merge_with_read_ahead_thread(llama_family, small_blocks, monkeypatch, tmp_path):
    monkeypatch.setattr(blocks, "READ_AHEAD_BLOCKS", 2)
    r = LLAMA_CASES["ties"](llama_family)
    _, out = engine(r, tmp_path / "out", seed=SEED)
    assert_matches_reference(out, reference_merge(r, SEED), out_dir=tmp_path / "out")
