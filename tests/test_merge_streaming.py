"""The streaming (block by block) merge path against the reference merge.

The test models are tiny, so with the default block size every tensor is a single block.
Here the block size is made small and odd (tensors span many blocks, which end at arbitrary
positions inside rows) so that the streamed methods' cross-block logic is exercised: the
exact per-tensor rank windows of TIES and Breadcrumbs found from the keys held whole or by
radix select over the blocks, with ties broken by position across block boundaries, and
PCB's global statistics.
"""

from __future__ import annotations

import pytest
import torch

from merging import inputs as merging_inputs
from merging import selection
from merging.methods import task_vectors
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


@pytest.mark.parametrize(
    ("family", "case"),
    [
        *[pytest.param("llama_family", c, id=f"llama-{c}") for c in ("ties", "breadcrumbs")],
        *[pytest.param("bf16_llama_family", c, id=f"bf16-{c}") for c in ("ties", "breadcrumbs")],
    ],
)
def test_streamed_rank_windows_by_radix_match_reference(
    family, case, small_blocks, request, monkeypatch, tmp_path
):
    """Above the memory budget for keys held whole, a tensor's rank windows come from the
    two radix passes over its blocks instead: the same reference results."""
    monkeypatch.setattr(task_vectors, "IN_MEMORY_KEYS_BYTES", 0)
    f = request.getfixturevalue(family)
    r = (LLAMA_CASES if family == "llama_family" else BF16_CASES)[case](f)
    _, out = engine(r, tmp_path / "out", seed=SEED)
    assert_matches_reference(out, reference_merge(r, SEED), out_dir=tmp_path / "out")


@pytest.mark.parametrize(
    ("family", "case"),
    [
        *[pytest.param("llama_family", c, id=f"llama-{c}") for c in ("ties", "breadcrumbs")],
        *[pytest.param("bf16_llama_family", c, id=f"bf16-{c}") for c in ("ties", "breadcrumbs")],
    ],
)
def test_streamed_rank_windows_by_sampled_windows_match_reference(
    family, case, small_blocks, request, monkeypatch, tmp_path
):
    """Keys held whole from any size on: the boundaries come from windows placed by a
    sample, and the masks from the located boundary groups (compares, no counting): the
    same reference results."""
    monkeypatch.setattr(selection, "_KEY_WINDOW_FROM", 1)
    spans = []
    take = RankRangeStream._take

    def counting(self, selected):
        take(self, selected)
        spans.append(self)

    monkeypatch.setattr(RankRangeStream, "_take", counting)
    f = request.getfixturevalue(family)
    r = (LLAMA_CASES if family == "llama_family" else BF16_CASES)[case](f)
    _, out = engine(r, tmp_path / "out", seed=SEED)
    assert_matches_reference(out, reference_merge(r, SEED), out_dir=tmp_path / "out")
    assert spans and all(w._spans is not None for w in spans)


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


@pytest.fixture
def small_chunks(monkeypatch):
    """Cache-sized chunks of a few thousand elements: whole-tensor methods (DARE and DELLA
    draws, L1 norms, sign consensus) then work on every test tensor in many chunks."""
    monkeypatch.setattr(merging_inputs, "WORK_CHUNK", 3001)
    monkeypatch.setattr(task_vectors, "WORK_CHUNK", 3001)


CHUNKED = ["ties", "dare_ties", "dare_ties_inverse_p", "dare_linear", "breadcrumbs_ties_row",
           "della", "della_linear"]  # fmt: skip


@pytest.mark.parametrize("case", CHUNKED)
def test_merge_in_small_chunks_matches_reference(case, llama_family, small_chunks, tmp_path):
    r = LLAMA_CASES[case](llama_family)
    _, out = engine(r, tmp_path / "out", seed=SEED)
    assert_matches_reference(out, reference_merge(r, SEED), out_dir=tmp_path / "out")


def _plain_sign_consensus(deltas, weights):
    """TIES elect + disjoint merge as written (bool masks, where): the reference."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    positive = total >= 0
    mixed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for d, w in zip(deltas, weights, strict=True):
        agree = torch.where(positive, d > 0, d < 0)
        mixed += d * agree
        divisor += agree * w
    divisor[divisor == 0] = 1.0
    return mixed, divisor


@pytest.mark.parametrize("count", [1, 2, 3])
def test_sign_consensus_equals_the_plain_masked_sum(count):
    gen = torch.Generator().manual_seed(3)
    n = 10_007
    # few distinct values: many zeros, sums that cancel to exactly 0, equal magnitudes
    deltas = [
        torch.randint(-3, 4, (n,), generator=gen).to(torch.float32) * 0.25 for _ in range(count)
    ]
    deltas[0][:50] = 0.0
    weights = [1.0, -1.0, 0.5][:count]  # 1 − 1 = 0: weights that cancel where both agree
    want_mixed, want_div = _plain_sign_consensus([d.clone() for d in deltas], weights)
    mixed, div = task_vectors.sign_consensus([d.clone() for d in deltas], weights)
    assert div is not None
    assert torch.equal(mixed, want_mixed)
    assert torch.equal(task_vectors.nonzero_divisor(div), want_div)
    only_mixed, none = task_vectors.sign_consensus(
        [d.clone() for d in deltas], weights, divisor=False
    )
    assert none is None and torch.equal(only_mixed, want_mixed)


@pytest.mark.parametrize("descending", [False, True])
def test_rank_window_float_mask_equals_the_bool_mask(descending):
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(0, 30, (40_000,), generator=gen).to(torch.float32)  # many ties
    n = x.numel()
    for lo, hi in [(0, 1234), (777, 30_000), (39_000, n), (0, n), (10, 10)]:
        windows = [RankRangeStream(n, lo, hi, descending=descending) for _ in range(2)]
        parts = [x[s : s + 1009] for s in range(0, n, 1009)]
        for w in windows:
            if w.needs_selection:
                for p in parts:
                    w.observe_high(p)
                w.end_high()
                for p in parts:
                    w.observe_low(p)
                w.end_low()
        as_bool = torch.cat([windows[0].mask(p) for p in parts])
        as_float = torch.cat([windows[1].mask(p, dtype=torch.float32) for p in parts])
        assert as_float.dtype == torch.float32
        assert torch.equal(as_float, as_bool.to(torch.float32)), (lo, hi)
        assert torch.equal(as_bool, rank_range_mask(x, lo, hi, descending=descending)), (lo, hi)


def test_streamed_merge_with_read_ahead_thread(llama_family, small_blocks, monkeypatch, tmp_path):
    monkeypatch.setattr(blocks, "READ_AHEAD_BLOCKS", 2)
    r = LLAMA_CASES["ties"](llama_family)
    _, out = engine(r, tmp_path / "out", seed=SEED)
    assert_matches_reference(out, reference_merge(r, SEED), out_dir=tmp_path / "out")
