"""Radix select (merging/selection.py) against a plain sort, over blocks.

The expectations come from ``torch.sort`` of the whole tensor: the k-th smallest value and
the number of entries below and equal to it are read off the sorted values.
"""

from __future__ import annotations

import math

import numpy
import pytest
import torch

from merging import selection, threads
from merging.methods import task_vectors
from merging.selection import RadixSelect, RankRangeStream, order_keys


def _by_sort(x: torch.Tensor, k: int) -> tuple[float, int, int]:
    values = torch.sort(x).values
    v = values[k - 1]
    return float(v), int((x < v).sum()), int((x == v).sum())


def _values(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "signed":  # both signs, many equal values, a few zeros of either sign
        x = torch.randint(-60, 60, (n,), generator=gen).to(torch.float32) * 0.125
        x[::97] = -0.0
        return x
    if kind == "wide":  # magnitudes across many exponents: keys in many buckets
        return torch.randn(n, generator=gen) * torch.exp2(torch.randint(-40, 40, (n,)).float())
    # like |τ| of fp16 checkpoints: close non-negative values, many ties
    base = torch.randn(n, generator=gen).half()
    ft = (base.float() + torch.randn(n, generator=gen) * 0.01).half()
    return (ft.float() - base.float()).abs_()


@pytest.mark.parametrize("few", [0, 1 << 15], ids=["bincount", "scatter-add"])
@pytest.mark.parametrize("kind", ["signed", "wide", "magnitudes"])
def test_radix_select_over_blocks_equals_the_sort(kind, few, monkeypatch):
    """Both ways of counting a bucket's members (bincount, scatter-add below a count)."""
    monkeypatch.setattr(selection, "_FEW_MEMBERS", few)
    gen = torch.Generator().manual_seed(4)
    n = 70_001
    x = _values(kind, n, gen)
    ranks = [1, 2, n // 3, n // 2 + 1, n - 1, n]
    nonnegative = kind == "magnitudes"
    sel = RadixSelect(ranks=list(ranks), nonnegative=nonnegative)
    blocks = [x[s : s + 4099] for s in range(0, n, 4099)]
    for b in blocks:
        sel.observe_high(b)
    sel.end_high()
    for b in blocks:
        sel.observe_low(b)
    sel.end_low()
    for k, s in zip(ranks, sel.selected, strict=True):
        value, less, equal = _by_sort(x, k)
        if value == 0.0 and not nonnegative:
            # −0.0 and +0.0 have two keys but one value: compare the value, and the counts
            # of the two keys together
            assert s.value == 0.0
            continue
        assert (s.value, s.less, s.equal) == (value, less, equal), k


@pytest.mark.parametrize("descending", [False, True])
def test_rank_window_to_either_end_selects_one_boundary(descending):
    """A window that reaches the top or the bottom of the order is found from its other
    boundary alone; the mask is that of a stable sort, also where the boundary's group of
    equal values is the maximum (or minimum) itself."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randint(0, 6, (30_000,), generator=gen).to(torch.float32)  # 6 values: big groups
    n = x.numel()
    order = torch.sort(x, stable=True, descending=descending).indices
    for lo, hi in [(0, 100), (0, 29_000), (100, n), (25_000, n), (0, 1), (n - 1, n)]:
        window = RankRangeStream(n, lo, hi, descending=descending)
        assert len(window._select.ranks) == 1
        parts = [x[s : s + 1013] for s in range(0, n, 1013)]
        for p in parts:
            window.observe_high(p)
        window.end_high()
        for p in parts:
            window.observe_low(p)
        window.end_low()
        got = torch.cat([window.mask(p, dtype=torch.float32) for p in parts])
        want = torch.zeros(n)
        want[order[lo:hi]] = 1.0
        assert torch.equal(got, want), (lo, hi)


@pytest.mark.parametrize("way", ["partition", "window", "window-missed"])
@pytest.mark.parametrize("kind", ["signed", "wide", "magnitudes"])
def test_select_keys_held_whole_equals_the_sort(kind, way, monkeypatch):
    """The in-memory selection gives the sort's k-th value and counts, several ranks at
    once, duplicates and both ends included: by numpy's partition of all the keys, by
    windows placed from a sample (kept and sorted), and by the partition again when the
    sample places every window wrong."""
    gen = torch.Generator().manual_seed(11)
    n = 70_001
    x = _values(kind, n, gen)
    nonnegative = kind == "magnitudes"
    ranks = [n, 1, n // 2 + 1, n // 3, n // 3, n - 1, 2]
    keys = order_keys(x, nonnegative=nonnegative)
    monkeypatch.setattr(selection, "_KEY_WINDOW_FROM", n + 1 if way == "partition" else n)
    if way == "window-missed":  # a sample of one key repeated: every window is that key
        smallest = int(torch.argmin(keys))
        monkeypatch.setattr(selection, "_sample_positions", lambda n: numpy.full(1 << 10, smallest))
    if way != "partition":
        found = selection._in_window(keys.numpy(), ranks)
        assert (found is None) == (way == "window-missed")
    before = keys.clone()
    got = selection.select_keys(keys, ranks)
    assert torch.equal(keys, before)  # the keys are left as they were
    assert selection.select_keys(keys.clone(), ranks, consume=True) == got
    for k, s in zip(ranks, got, strict=True):
        value, less, equal = _by_sort(x, k)
        if value == 0.0 and not nonnegative:
            assert s.value == 0.0  # −0.0 and +0.0: one value, two keys (as above)
            continue
        assert (s.value, s.less, s.equal) == (value, less, equal), k
    with pytest.raises(ValueError, match="outside"):
        selection.select_keys(keys, [n + 1])


def test_key_window_gives_its_ends_groups_and_refuses_a_rank_outside(monkeypatch):
    """A window's ends are whole groups of equal keys, counted, not kept: a rank in the
    group at either end, or strictly inside, is found with its counts; a rank beyond a
    window of one key is a miss (None), never that key."""
    keys = torch.tensor([0] * 100 + [1] * 100 + [2] * 50 + [3] * 50, dtype=torch.int32)
    keys = keys[torch.randperm(300, generator=torch.Generator().manual_seed(3))].contiguous()
    ones = int(torch.nonzero(keys == 1)[0])
    monkeypatch.setattr(selection, "_sample_positions", lambda n: numpy.full(1 << 16, ones))
    found = selection._in_window(keys.numpy(), [150])  # a window of the key 1 alone
    assert found is not None and (found.selected[0].less, found.selected[0].equal) == (100, 100)
    assert selection._in_window(keys.numpy(), [250]) is None  # 2: beyond that window
    assert selection._in_window(keys.numpy(), [50]) is None  # 0: below it
    spread = [int(torch.nonzero(keys == v)[0]) for v in (0, 3)] * (1 << 15)
    monkeypatch.setattr(selection, "_sample_positions", lambda n: numpy.array(spread))
    for rank, want in [(1, (0, 0, 100)), (150, (1, 100, 100)), (260, (3, 250, 50))]:
        (got,) = selection._in_window(keys.numpy(), [rank]).selected  # the window [0, 3]
        key, less, equal = want
        assert (got.value, got.less, got.equal) == (selection.key_to_value(key), less, equal)


@pytest.mark.parametrize("levels", [7, 2000])
@pytest.mark.parametrize("way", ["partition", "window", "window-missed", "window-chunked"])
@pytest.mark.parametrize("descending", [False, True])
def test_rank_window_from_keys_held_whole_is_the_stable_sort_window(
    descending, way, levels, monkeypatch
):
    """``select_whole`` (the boundaries from the whole tensor's signed values, ranked by
    magnitude) masks the same entries as a stable sort of the magnitudes, block by block,
    for windows that cut groups of equal values at one end, at both, or inside one group:
    with the boundaries by partition (the mask counts the groups' members block by block),
    by windows (the kept members' positions are located: the mask compares; the values
    are held, intact), and by partition after the windows missed. "window-chunked": the
    keys are passed in many chunks, so the members are located from the window pass's
    counts per chunk, only in the chunks that hold them. With few levels of |τ| the
    boundary groups are mostly a window's ends; with many, mostly inside it."""
    n = 40_000
    if way == "window-chunked":
        monkeypatch.setattr(selection, "_KEY_CHUNK", 3001)
        way = "window"
    monkeypatch.setattr(selection, "_KEY_WINDOW_FROM", n + 1 if way == "partition" else n)
    if way == "window-missed":  # (how a window can miss: test_select_keys_held_whole...)
        monkeypatch.setattr(selection, "_in_window", lambda keys, ranks, **_: None)
    gen = torch.Generator().manual_seed(13)
    x = torch.randint(0, levels, (n,), generator=gen).to(torch.float32) * 0.5
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float32) * 2 - 1
    signed = x * signs  # (−0.0 among them)
    order = torch.sort(x, stable=True, descending=descending).indices
    group = int((x == 0).sum())  # the windows below cut inside groups, not at their edges
    windows = [(0, 100), (0, 20_001), (3, n), (17_000, n), (5_000, 31_003), (10, 20), (0, n)]
    windows += [(group // 3, group // 2), (n - 1, n), (0, 1)]
    for lo, hi in windows:
        window = RankRangeStream(n, lo, hi, descending=descending)
        if window.needs_selection:
            values = signed.clone()
            window.select_whole(values)
            assert (window._spans is not None) == (way == "window"), (lo, hi)
            assert torch.equal(values.view(torch.int32), signed.view(torch.int32))
            if way == "window":
                assert torch.equal(window.held(n), signed)
        parts = [x[s : s + 997] for s in range(0, n, 997)]
        got = torch.cat([window.mask(p, dtype=torch.float32) for p in parts])
        want = torch.zeros(n)
        want[order[lo:hi]] = 1.0
        assert torch.equal(got, want), (lo, hi)


def test_bucket_members_numpy_and_torch_paths_agree():
    """The low-half pass picks a bucket's members with numpy on the CPU and with torch on
    other devices: both give the members' low halves, one bucket or several at once."""
    gen = torch.Generator().manual_seed(5)
    keys = order_keys(torch.randn(50_000, generator=gen) * 3)
    high = (keys >> 16) + 32768
    buckets = [int(high[0]), int(high[1]), int(high.max())]
    for chosen in ([buckets[0]], buckets):
        by_numpy = selection._members_numpy(keys, chosen)
        by_torch = selection._members_torch(keys, chosen)
        for b, n, t in zip(chosen, by_numpy, by_torch, strict=True):
            want = (keys[high == b] & 0xFFFF).to(torch.int32)
            assert want.numel() > 0
            assert torch.equal(n, want) and torch.equal(t, want)


def _stable_row_order(rows: torch.Tensor) -> torch.Tensor:
    return torch.sort(rows.abs(), dim=1, stable=True).indices


def _della_rows(kind: str, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    if kind == "halves":  # few values: ties, −0.0 and +0.0, x and −x
        rows = (torch.randint(-8, 9, shape, generator=gen) * 0.5).to(torch.float32)
        rows[:, ::5] = -0.0
        return rows
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "fp16":  # τ of fp16 checkpoints: many low zero bits, exact zeros
        base = torch.randn(shape, generator=gen).half()
        ft = (base.float() + torch.randn(shape, generator=gen) * 0.01).half()
        return ft.float() - base.float()
    # float32 values over many exponents: no low zero bits, too wide for 32-bit keys
    return torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-60, 60, shape).float())


@pytest.mark.parametrize("kind", ["halves", "zeros", "fp16", "float32"])
@pytest.mark.parametrize("path", [task_vectors._row_order_numpy, task_vectors._row_order_torch])
def test_della_row_order_is_the_stable_sort_order(path, kind):
    """DELLA's ranks: one sort of unique (|τ| bits, column) keys orders each row as a stable
    sort of |τ| does, equal magnitudes (ties, −0.0 and +0.0, x and −x) by column; in 32-bit
    keys where the values allow it (fp16 τ), in 64-bit ones where not (wide float32)."""
    gen = torch.Generator().manual_seed(6)
    for shape in [(1, 1), (5, 1), (3, 7), (40, 1000), (7, 4097)]:
        rows = _della_rows(kind, shape, gen)
        shift = max(1, (shape[1] - 1).bit_length())
        bits = rows.abs().view(torch.int32)
        packs = task_vectors._packed_keys32(bits.numpy(), shift) is not None
        if kind == "float32" and shape[1] > 1:
            assert not packs, shape
        elif shape[1] <= 1000:  # (fp16 τ of 4,097 columns need 33 bits here)
            assert packs, (kind, shape)
        got = path(bits, shift)
        assert torch.equal(got, _stable_row_order(rows)), shape
        assert torch.equal(task_vectors.row_order(rows), _stable_row_order(rows)), shape


@pytest.mark.parametrize("together", [None, 3000])
@pytest.mark.parametrize("kind", ["halves", "fp16", "float32"])
def test_della_keep_probability_by_stable_rank_in_groups_of_rows(kind, together, monkeypatch):
    """p = (density − ε) + 2ε·r/(cols − 1) at each entry's rank r in a stable sort of its
    row's |τ|, computed here from torch's stable sort: the same whether the rows are
    ranked at once or in groups of rows on several threads (``together``: entries per
    group; a group boundary falls inside the tensor, not on a multiple of anything)."""
    if together is not None:
        monkeypatch.setattr(task_vectors, "_RANKED_TOGETHER", together)
        monkeypatch.setattr(threads, "cores", lambda: 3)
    gen = torch.Generator().manual_seed(8)
    for shape in [(1, 1), (13, 1), (101, 97), (9, 1500)]:
        rows = _della_rows(kind, shape, gen)
        cols = shape[1]
        ranks = torch.empty(shape, dtype=torch.int64)
        ranks.scatter_(1, _stable_row_order(rows), torch.arange(cols).expand(shape))
        rn = ranks.float() / (cols - 1) if cols > 1 else torch.zeros(shape)
        want = (0.5 - 0.2) + 2 * 0.2 * rn
        got = task_vectors.della_keep_probability(rows, 0.5, 0.2)
        assert torch.equal(got, want), shape


@pytest.mark.parametrize("block", [997, 50_000])
@pytest.mark.parametrize("kind", ["signed", "wide", "magnitudes"])
def test_extreme_select_in_one_pass_equals_the_sort(kind, block):
    """Ranks within a few thousand of either end, found by keeping the extreme values seen
    so far (several compactions at this size), equal the sort's k-th values."""
    gen = torch.Generator().manual_seed(17)
    n = 200_003
    x = _values(kind, n, gen)
    ranks = [1, 2, 700, 2_000, n - 1_999, n - 3, n]
    extremes = selection.ExtremeSelect(n, ranks, limit=5_000)
    assert extremes.feasible
    for s in range(0, n, block):
        extremes.observe(x[s : s + block])
    want = [_by_sort(x, k)[0] for k in ranks]
    assert extremes.values() == want
    assert not selection.ExtremeSelect(n, [n // 2], limit=5_000).feasible
    with pytest.raises(ValueError, match="observed"):
        selection.ExtremeSelect(n, ranks).values()


def test_window_select_counts_below_and_keeps_the_window():
    """The k-th value when the window holds it (also at its edges), None when it does not;
    the maximum either way."""
    gen = torch.Generator().manual_seed(19)
    x = torch.randint(-50, 50, (60_000,), generator=gen).to(torch.float32) * 0.25
    n = x.numel()
    blocks = [x[s : s + 4_001] for s in range(0, n, 4_001)]
    for k in (1, 12_345, 30_000, n):
        value = _by_sort(x, k)[0]
        for lo, hi, hit in [
            (value - 1.0, value + 1.0, True),
            (value, value, True),  # the window is exactly the value's group
            (value + 0.25, value + 3.0, False),  # entirely above the k-th value
            (value - 3.0, value - 0.25, False),  # entirely below it
        ]:
            window = selection.WindowSelect(n, k, lo, hi)
            for b in blocks:
                window.observe(b)
            assert window.value() == (value if hit else None), (k, lo, hi)
            assert window.maximum == float(x.max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantile_window_is_the_sorted_samples_values_at_the_window_positions(dtype):
    """The window's ends are the sample's values at ``window_positions`` of its ascending
    order (here from a Python sort of the values), open (±inf) where they run off it."""
    gen = torch.Generator().manual_seed(21)
    sample = (torch.randn(5000, generator=gen) * torch.rand(5000, generator=gen)).to(dtype)
    by_python = sorted(float(v) for v in sample.to(torch.float32))
    for q in (0.0001, 0.1, 0.5, 0.97, 0.9999):
        at_lo, at_hi = selection.window_positions(sample.numel(), q, 8.0)
        want_lo = by_python[at_lo] if at_lo is not None else -math.inf
        want_hi = by_python[at_hi] if at_hi is not None else math.inf
        assert selection.quantile_window(sample, q, 8.0) == (want_lo, want_hi), q
    assert selection.quantile_window(torch.empty(0), 0.5, 8.0) == (-math.inf, math.inf)
