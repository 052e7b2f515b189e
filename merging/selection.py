"""Exact order statistics by radix select on the float32 bit pattern.

For float32 values the 32-bit pattern, with negative values' bits all flipped and positive
values' sign bit set, is an unsigned integer that sorts exactly like the values. A
histogram of its high 16 bits (65,536 counters) finds the bucket holding rank k; a second
histogram of the low 16 bits of the members of that bucket gives the exact value. The
histograms can be accumulated chunk by chunk, so the k-th value of a whole model is found
in two streaming passes with O(65,536) memory (docs/merge-methods.md, "Whole-model
statistics in bounded memory").
The same two steps on one tensor are several times faster than a sort or torch.kthvalue;
on the CPU a tensor's keys held whole are selected faster still (``select_keys``: windows
placed from a sample, numpy's vectorised partition for few keys), which a streamed tensor
uses too while every model's keys fit a memory budget (``IN_MEMORY_KEYS_BYTES``).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from merging.lazy_torch import numpy, torch

_BUCKETS = 1 << 16
_SMALL = 1 << 18  # below this many elements, sorting beats the histograms


def order_keys(x: torch.Tensor, *, nonnegative: bool = False) -> torch.Tensor:
    """Monotone int32 keys of float32 values: a < b ⇔ key(a) < key(b) (−0.0 sorts before +0.0).

    Non-negative floats already compare like their bit patterns; negative ones have every bit
    but the sign flipped so that larger magnitudes give smaller keys.
    """
    bits = x.detach().reshape(-1).to(torch.float32).contiguous().view(torch.int32)
    if nonnegative:
        return bits
    # bits ^ 0x7FFFFFFF where negative: the arithmetic shift makes the xor mask (all ones but
    # the sign for a negative value, 0 otherwise); integer ops, ~15x faster than a where
    flip = torch.bitwise_right_shift(bits, 31).bitwise_and_(0x7FFFFFFF)
    return flip.bitwise_xor_(bits)


def key_to_value(key: int) -> float:
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


_HALF = _BUCKETS // 2


def _halves(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 16-bit halves of int32 keys as int16 views: no arithmetic, no copy."""
    if sys.byteorder == "little":
        pairs = keys.view(torch.int16)
        return pairs[1::2], pairs[0::2]
    return (keys >> 16).to(torch.int16), (keys & 0xFFFF).to(torch.int16)


def _add_high_histogram(hist: torch.Tensor, keys: torch.Tensor, nonnegative: bool) -> None:
    """Adds the counts per bucket b = (key >> 16) + 32768 to ``hist`` (65,536 int64 counters).

    The high halves are shifted into a contiguous int32 tensor first: torch's bincount
    over it is faster than over the strided int16 view of the halves, even with the
    shift. bincount's counts reach only the largest bucket present, and are added in
    place (no 65,536-counter temporary per block)."""
    high = torch.bitwise_right_shift(keys, 16)  # arithmetic: −32768 … 32767
    if nonnegative:  # high half in [0, 32767]: count it as it is
        counts = torch.bincount(high).cpu()
        hist[_HALF : _HALF + counts.numel()] += counts
    else:
        counts = torch.bincount(high.add_(_HALF)).cpu()
        hist[: counts.numel()] += counts


# below this many members a scatter-add beats bincount's 65,536 counters per block
_FEW_MEMBERS = 1 << 15


def _add_low_counts(hist: torch.Tensor, members: torch.Tensor) -> None:
    """Adds the counts of ``members`` (low halves, 0 … 65535) to ``hist``, in place."""
    if members.numel() < _FEW_MEMBERS:
        index = members.to(device=hist.device, dtype=torch.int64)
        hist.scatter_add_(0, index, torch.ones(1, dtype=torch.int64).expand(index.numel()))
    else:
        counts = torch.bincount(members).cpu()
        hist[: counts.numel()] += counts


def _bucket_members(keys: torch.Tensor, buckets: list[int]) -> list[torch.Tensor]:
    """For each bucket b, the low 16 bits (int32, 0 … 65535) of the keys in it, i.e. of the
    keys in [first, first + 65536) with first = (b − 32768) << 16.

    On the CPU through numpy: k − first wraps around in int32, so as uint32 it is below
    65536 exactly for the members, and it is their low half; a numpy compare and boolean
    index cost about half of torch's (bool results and masked selects are slow in torch
    on the CPU). Several buckets share one boolean index of the whole block (the members
    of any of them), then split that short list."""
    if keys.device.type == "cpu":
        return _members_numpy(keys.contiguous(), buckets)
    return _members_torch(keys, buckets)


def _members_numpy(keys: torch.Tensor, buckets: list[int]) -> list[torch.Tensor]:
    k = keys.numpy()
    firsts = [(b - _HALF) << 16 for b in buckets]
    if len(firsts) > 1:  # int32 arithmetic, modulo 2**32
        hits = [(k - first).view("uint32") < _BUCKETS for first in firsts]
        for hit in hits[1:]:
            hits[0] |= hit
        k = k[hits[0]]
    members = []
    for first in firsts:
        offsets = k - first
        members.append(torch.from_numpy(offsets[offsets.view("uint32") < _BUCKETS]))
    return members


def _members_torch(keys: torch.Tensor, buckets: list[int]) -> list[torch.Tensor]:
    high, low = _halves(keys)
    return [low[high == b - _HALF].to(torch.int32) & 0xFFFF for b in buckets]


@dataclass(frozen=True)
class Selected:
    """A selected order statistic: its value, and how many entries are below / equal to it."""

    value: float
    less: int
    equal: int


@dataclass
class RadixSelect:
    """Streaming exact k-th smallest values (1-based ranks) over many chunks of float32 data.

    Usage: ``observe_high(chunk)`` for every chunk, ``end_high()``; then ``observe_low(chunk)``
    for every chunk again and ``end_low()``; then read ``selected`` (or ``values``). Several
    ranks are selected at once over the same data.
    """

    ranks: list[int]
    nonnegative: bool = False
    count: int = 0
    _high: torch.Tensor = field(default_factory=lambda: torch.zeros(_BUCKETS, dtype=torch.int64))
    _buckets: list[int] = field(default_factory=list)
    _residual: list[int] = field(default_factory=list)
    _before: list[int] = field(default_factory=list)
    _low: dict[int, torch.Tensor] = field(default_factory=dict)
    selected: list[Selected] = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        return [s.value for s in self.selected]

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return order_keys(x, nonnegative=self.nonnegative)

    def observe_high(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        keys = self.keys(x) if keys is None else keys
        self.count += keys.numel()
        _add_high_histogram(self._high, keys, self.nonnegative)

    def high_partial(self, prefix: str) -> dict[str, torch.Tensor]:
        """The first pass's counts so far (to combine with other processes' over other data:
        ``statistics.combine_partials``)."""
        return {
            f"{prefix}/count": torch.tensor([self.count], dtype=torch.int64),
            f"{prefix}/high": self._high,
        }

    def set_high_partial(self, prefix: str, combined: dict[str, torch.Tensor]) -> None:
        """Take the first pass's counts over all the data (before ``end_high``)."""
        self.count = int(combined[f"{prefix}/count"].item())
        self._high = combined[f"{prefix}/high"]

    def low_partial(self, prefix: str) -> dict[str, torch.Tensor]:
        """The second pass's counts so far, per selected high bucket."""
        return {f"{prefix}/low/{b}": hist for b, hist in self._low.items()}

    def set_low_partial(self, prefix: str, combined: dict[str, torch.Tensor]) -> None:
        """Take the second pass's counts over all the data (before ``end_low``)."""
        for b in self._low:
            self._low[b] = combined[f"{prefix}/low/{b}"]

    def end_high(self) -> None:
        for k in self.ranks:
            if not 1 <= k <= self.count:
                raise ValueError(f"rank {k} is outside 1..{self.count}")
        cum = torch.cumsum(self._high, 0)
        for k in self.ranks:
            b = int(torch.searchsorted(cum, torch.tensor(k, dtype=torch.int64)).item())
            before = int(cum[b - 1].item()) if b > 0 else 0
            self._buckets.append(b)
            self._residual.append(k - before)
            self._before.append(before)
        for b in set(self._buckets):
            self._low[b] = torch.zeros(_BUCKETS, dtype=torch.int64)

    def observe_low(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        keys = self.keys(x) if keys is None else keys
        hists = list(self._low.values())
        for hist, members in zip(hists, _bucket_members(keys, list(self._low)), strict=True):
            if members.numel():
                _add_low_counts(hist, members)

    def end_low(self) -> None:
        self.selected = []
        for b, r, before in zip(self._buckets, self._residual, self._before, strict=True):
            hist = self._low[b]
            cum = torch.cumsum(hist, 0)
            low = int(torch.searchsorted(cum, torch.tensor(r, dtype=torch.int64)).item())
            less = before + (int(cum[low - 1].item()) if low > 0 else 0)
            key = ((b - _HALF) << 16) | low
            self.selected.append(Selected(key_to_value(key), less, int(hist[low].item())))


# a tensor's selection keys are held whole (every model's, together) up to this many bytes;
# above it a streamed tensor is ranked by the two radix passes (RadixSelect)
IN_MEMORY_KEYS_BYTES = 256 << 20


# keys held whole: from this many on, a window guessed from a sample of them (``_in_window``)
# is counted and kept instead of partitioning them all; the sample's size and the window's
# spread in standard errors of a sample quantile's rank
_KEY_WINDOW_FROM = 1 << 18
_KEY_SAMPLE = 1 << 16
_KEY_SPREAD = 8.0
_KEY_CHUNK = 1 << 18  # keys compared at a time: the temporaries stay cache-sized


def select_keys(keys: torch.Tensor, ranks: list[int], *, consume: bool = False) -> list[Selected]:
    """Exact k-th smallest (1-based ``ranks``) of order keys held whole (``order_keys``'
    int32 keys of one flattened tensor), with the number of keys below and equal to each.

    On the CPU: for many keys, by a window around each rank placed from a sample of them,
    counted and kept in one chunked pass (``_in_window``); when a window misses its rank,
    and for fewer keys, by numpy's partition (introselect, vectorised: several times
    faster than the two radix histograms or torch.kthvalue), one kth at a time (numpy is
    fastest so), of a copy of the keys or, with ``consume``, of the keys themselves (their
    order is lost). Elsewhere by torch.kthvalue. The counts are compares over the
    partitioned keys: the ones below the k-th are all in front of it."""
    for rank in ranks:
        if not 1 <= rank <= keys.numel():
            raise ValueError(f"rank {rank} is outside 1..{keys.numel()}")
    if keys.device.type != "cpu":
        picked = [int(torch.kthvalue(keys, r).values.item()) for r in ranks]
        return [
            Selected(key_to_value(v), int((keys < v).sum()), int((keys == v).sum())) for v in picked
        ]
    if keys.numel() >= _KEY_WINDOW_FROM:
        found = _in_window(keys.numpy(), ranks)
        if found is not None:
            return found.selected
    part = keys.numpy() if consume else keys.numpy().copy()
    done = 0  # part[:done] holds the smallest `done` keys
    for kth in sorted({r - 1 for r in ranks}):
        part[done:].partition(kth - done)
        done = kth + 1
    count = numpy.count_nonzero
    out = []
    for r in ranks:
        v = part[r - 1]
        out.append(
            Selected(key_to_value(int(v)), int(count(part[: r - 1] < v)), int(count(part == v)))
        )
    return out


@functools.lru_cache(maxsize=8)
def _sample_positions(n: int) -> Any:
    """``_KEY_SAMPLE`` fixed pseudo-random positions in n keys, ascending (read in order):
    the same keys select the same way (the result is exact either way)."""
    return numpy.sort(numpy.random.default_rng(n).integers(0, n, _KEY_SAMPLE))


# the bits of a float32's magnitude (all but the sign)
_MAGNITUDE = 0x7FFFFFFF


def _in_window(keys: Any, ranks: list[int], *, magnitudes: bool = False) -> _Windows | None:
    """``select_keys`` of int32 ``keys`` (a numpy array, left as it is) by windows: each
    rank's window [lo, hi] is the sampled keys' quantile ± ``_KEY_SPREAD`` standard errors.
    One chunked pass counts the keys below each window and those equal to its ends, and
    keeps those strictly inside it (the ends are often large groups of equal keys, which
    need no keeping); the k-th key is then an end or the right one of the kept, sorted.
    None when a window misses its rank (the sample was unlucky: the caller selects over
    all the keys). ``magnitudes``: the keys are a float32's bits and are ranked by the
    magnitude's (their sign bit cleared, chunk by chunk). The pass's counts per chunk are
    kept (``_Windows.per_chunk``): where the members of a selected group of equal keys lie
    is then found without another pass over all the keys."""
    n = keys.size
    sample = keys[_sample_positions(n)]
    if magnitudes:
        sample &= _MAGNITUDE
    places = {r: window_positions(sample.size, (r - 0.5) / n, _KEY_SPREAD) for r in set(ranks)}
    sample.partition(sorted({p for pair in places.values() for p in pair if p is not None}))
    windows = {}
    for r, (lo_at, hi_at) in sorted(places.items()):
        lo = int(sample[lo_at]) if lo_at is not None else -(1 << 31)
        hi = int(sample[hi_at]) if hi_at is not None else (1 << 31) - 1
        windows[r] = _Window(lo, hi)
    shifted = numpy.empty(min(n, _KEY_CHUNK), dtype=numpy.uint32)
    cleared = numpy.empty(min(n, _KEY_CHUNK), dtype=numpy.int32) if magnitudes else None
    flags = numpy.empty(min(n, _KEY_CHUNK), dtype=bool)
    count = numpy.count_nonzero
    for start in range(0, n, _KEY_CHUNK):
        chunk = keys[start : start + _KEY_CHUNK]
        m = chunk.size
        if cleared is not None:
            chunk = numpy.bitwise_and(chunk, _MAGNITUDE, out=cleared[:m])
        bits = chunk.view(numpy.uint32)
        for w in windows.values():
            w.below += int(count(numpy.less(chunk, w.lo, out=flags[:m])))
            w.lo_chunks.append(int(count(numpy.equal(chunk, w.lo, out=flags[:m]))))
            if w.hi == w.lo:
                continue
            w.hi_chunks.append(int(count(numpy.equal(chunk, w.hi, out=flags[:m]))))
            if w.hi - w.lo < 2:
                continue  # nothing strictly inside
            # lo < key < hi as one unsigned compare: key − lo − 1 wraps past hi − lo − 2
            # for key ≤ lo
            numpy.subtract(bits, numpy.uint32((w.lo + 1) & 0xFFFFFFFF), out=shifted[:m])
            inside = numpy.less_equal(shifted[:m], numpy.uint32(w.hi - w.lo - 2), out=flags[:m])
            w.kept.append(numpy.compress(inside, chunk))  # (a copy: ``cleared`` is reused)
    out = []
    for r in ranks:
        found = windows[r].select(r)
        if found is None:
            return None
        out.append(found)
    return _Windows(out, list(windows.values()))


@dataclass
class _Windows:
    """What ``_in_window`` found: the selected order statistics (one per rank asked), and
    the windows' counts chunk by chunk."""

    selected: list[Selected]
    windows: list[_Window]

    def per_chunk(self, key: int) -> list[int] | None:
        """How many keys equal ``key`` in each ``_KEY_CHUNK`` of the keys, where a window
        counted or kept them (a window's end, or a key strictly inside it), else None."""
        for w in self.windows:
            if key == w.lo:
                return w.lo_chunks
            if key == w.hi:
                return w.hi_chunks
            if w.lo < key < w.hi:
                return [int(numpy.count_nonzero(kept == key)) for kept in w.kept]
        return None


@dataclass
class _Window:
    """A window [lo, hi] of keys in ``_in_window``'s pass: the counts below it and equal to
    its ends, and the keys strictly inside it, chunk by chunk."""

    lo: int
    hi: int
    below: int = 0
    lo_chunks: list[int] = field(default_factory=list)  # keys equal to lo, chunk by chunk
    hi_chunks: list[int] = field(default_factory=list)  # (empty where hi is lo)
    kept: list[Any] = field(default_factory=list)  # one array per chunk, where lo < hi − 1

    @property
    def at_lo(self) -> int:
        return sum(self.lo_chunks)

    @property
    def at_hi(self) -> int:
        return sum(self.hi_chunks)

    def select(self, rank: int) -> Selected | None:
        at = rank - 1 - self.below  # the k-th key's place among the window's, ascending
        if at < 0:
            return None
        if at < self.at_lo:
            return Selected(key_to_value(self.lo), self.below, self.at_lo)
        at -= self.at_lo
        inside = numpy.concatenate(self.kept) if self.kept else numpy.empty(0, numpy.int32)
        if at < inside.size:
            # sorted, not partitioned: numpy's partition slows down by 20-30x on some
            # orders of many equal keys (as fp16 task vectors give), its sort does not
            inside.sort()
            v = inside[at]
            first = int(numpy.searchsorted(inside, v, "left"))
            last = int(numpy.searchsorted(inside, v, "right"))
            return Selected(key_to_value(int(v)), self.below + self.at_lo + first, last - first)
        if at - inside.size < self.at_hi:
            less = self.below + self.at_lo + inside.size
            return Selected(key_to_value(self.hi), less, self.at_hi)
        return None


def select(x: torch.Tensor, ranks: list[int], *, nonnegative: bool = False) -> list[Selected]:
    """Exact k-th smallest values (1-based ranks) of a tensor with their less/equal counts."""
    flat = x.reshape(-1)
    if flat.numel() <= _SMALL:
        values = torch.sort(flat.to(torch.float32)).values
        out = []
        for k in ranks:
            v = values[k - 1]
            less = int(torch.searchsorted(values, v, right=False).item())
            upto = int(torch.searchsorted(values, v, right=True).item())
            out.append(Selected(float(v), less, upto - less))
        return out
    sel = RadixSelect(ranks=list(ranks), nonnegative=nonnegative)
    keys = sel.keys(flat)
    if keys.device.type == "cpu":  # numpy's partition beats the two histograms there
        selected = select_keys(keys, list(ranks))
    else:
        sel.observe_high(flat, keys)
        sel.end_high()
        sel.observe_low(flat, keys)
        sel.end_low()
        selected = sel.selected
    picked = []
    for s in selected:
        if s.value == 0.0 and not nonnegative:  # −0.0 and +0.0 have two keys but one value
            s = Selected(0.0, int((flat < 0).sum()), int((flat == 0).sum()))
        picked.append(s)
    return picked


def kth_smallest(x: torch.Tensor, ranks: list[int], *, nonnegative: bool = False) -> list[float]:
    """Exact k-th smallest values (1-based) of a tensor held whole (``select``)."""
    return [s.value for s in select(x, ranks, nonnegative=nonnegative)]


def rank_range_mask(
    x: torch.Tensor, lo: int, hi: int, *, descending: bool = False, nonnegative: bool = False
) -> torch.Tensor:
    """Mask of the entries whose rank in a stable sort of ``x`` is in [lo, hi).

    Equal values are ranked by position (lower flat index first), as ``torch.sort(...,
    stable=True)`` would, in either direction, but without sorting: the boundary values come
    from radix select with the number of entries below and equal to them, and only the
    entries equal to a boundary value need their positions.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    lo, hi = max(0, lo), min(n, hi)
    if lo >= hi:
        return torch.zeros_like(flat, dtype=torch.bool).reshape(x.shape)
    if lo == 0 and hi == n:
        return torch.ones_like(flat, dtype=torch.bool).reshape(x.shape)
    if n <= _SMALL:  # a stable sort is faster than two 65,536-bucket histograms here
        order = torch.sort(flat, stable=True, descending=descending).indices
        small = torch.zeros_like(flat, dtype=torch.bool)
        small[order[lo:hi]] = True
        return small.reshape(x.shape)
    # the same entries as ascending ranks [a_lo, a_hi)
    a_lo, a_hi = (n - hi, n - lo) if descending else (lo, hi)
    first, last = select(flat, [a_lo + 1, a_hi], nonnegative=nonnegative)
    groups = [first] if first.value == last.value else [first, last]
    if first.value == last.value:
        mask = torch.zeros_like(flat, dtype=torch.bool)
    elif a_hi == n:  # everything above `first` is in range, the maximum's group included
        mask = flat > first.value
        groups = [first]
    elif a_lo == 0:  # likewise everything below `last`
        mask = flat < last.value
        groups = [last]
    else:
        mask = (flat > first.value) & (flat < last.value)
    for g in groups:
        # the group of entries equal to g.value occupies ranks [start, start + equal) in the
        # requested order, by position within the group
        start = n - g.less - g.equal if descending else g.less
        p0, p1 = max(0, lo - start), min(g.equal, hi - start)
        if p0 >= p1:
            continue
        eq = flat == g.value
        if p0 == 0 and p1 == g.equal:
            mask |= eq
        else:
            idx = torch.nonzero(eq).squeeze(1)
            mask[idx[p0:p1]] = True
    return mask.reshape(x.shape)


class RankRangeStream:
    """``rank_range_mask`` over non-negative values that arrive block by block, in order.

    Ranks are those of a stable sort of the whole flattened tensor (equal values by position,
    lower index first, in either direction). Passes: ``observe_high`` every block, then
    ``observe_low`` every block (radix select of the two boundary values with the counts below
    and equal to them), then ``mask`` every block in order: entries strictly between the
    boundaries are in range, and of the entries equal to a boundary the first ones by
    position, counted across blocks. When ``needs_selection`` is false the first two passes
    can be skipped.
    """

    def __init__(self, n: int, lo: int, hi: int, *, descending: bool = False) -> None:
        self.n = n
        self.lo, self.hi = max(0, lo), min(n, hi)
        self.descending = descending
        self._all: bool | None = None
        if self.lo >= self.hi:
            self._all = False
        elif self.lo == 0 and self.hi == n:
            self._all = True
        a_lo, a_hi = (n - self.hi, n - self.lo) if descending else (self.lo, self.hi)
        self._a_lo, self._a_hi = a_lo, a_hi
        # a window that runs to either end needs only its other boundary: with the maximum
        # (minimum) as its upper (lower) boundary, "above first" ("below last") already
        # covers a group equal to both, so that boundary's low-half histogram is spared
        self._to_top, self._from_bottom = a_hi == n, a_lo == 0 and a_hi != n
        ranks = [a_hi] if self._from_bottom else [a_lo + 1] if self._to_top else [a_lo + 1, a_hi]
        self._select = RadixSelect(ranks=ranks, nonnegative=True)
        # [value, first position in the group to keep, one past the last, seen so far, size]
        self._groups: list[list[float | int]] = []
        # where the tensor's keys were held whole: per group, the flat positions of its first
        # and last kept member; the mask then needs no counting (``_mask_by_spans``)
        self._spans: list[tuple[float, int, int]] | None = None
        self._offset = 0  # flat position of the next block
        self._held: torch.Tensor | None = None  # the values, where held whole and intact
        self._first = self._last = 0.0
        self._below_last = self._above_first = False

    @property
    def needs_selection(self) -> bool:
        return self._all is None

    def observe_high(self, x: torch.Tensor) -> None:
        self._select.observe_high(x)

    def end_high(self) -> None:
        self._select.end_high()

    def observe_low(self, x: torch.Tensor) -> None:
        self._select.observe_low(x)

    def end_low(self) -> None:
        self._select.end_low()
        self._take(self._select.selected)

    def select_whole(self, values: torch.Tensor) -> None:
        """Instead of the two radix passes: the boundaries from the whole tensor's values
        (float32, flattened), ranked by magnitude. Where the sampled windows find them
        (``_in_window``), the values are left intact and held (``held``), and the kept
        members of each boundary group are located in them; otherwise a copy of their
        magnitudes' keys is partitioned (``select_keys``)."""
        ranks = self._select.ranks
        keys = values.view(torch.int32)
        held = keys.device.type == "cpu" and keys.numel() >= _KEY_WINDOW_FROM
        found = _in_window(keys.numpy(), ranks, magnitudes=True) if held else None
        if found is None:
            self._take(select_keys(keys.bitwise_and(_MAGNITUDE), ranks, consume=True))
            return
        self._take(found.selected)
        self._held = values
        self._spans = []
        for g in self._groups:
            value, p0, p1 = float(g[0]), int(g[1]), int(g[2])
            per_chunk = found.per_chunk(int(numpy.float32(value).view(numpy.int32)))
            self._spans.append((value, *_member_positions(keys.numpy(), value, p0, p1, per_chunk)))

    def _take(self, selected: list[Selected]) -> None:
        """The boundaries and boundary groups from the selected order statistics."""
        if self._to_top:  # everything above `first` is in range
            groups, self._above_first = selected, True
            self._first = selected[0].value
        elif self._from_bottom:  # everything below `last`
            groups, self._below_last = selected, True
            self._last = selected[0].value
        else:
            first, last = selected
            self._first, self._last = first.value, last.value
            if first.value == last.value:
                groups = [first]
            else:
                groups, self._above_first, self._below_last = [first, last], True, True
        for g in groups:
            start = self.n - g.less - g.equal if self.descending else g.less
            p0, p1 = max(0, self.lo - start), min(g.equal, self.hi - start)
            if p0 < p1:
                self._groups.append([g.value, p0, p1, 0, g.equal])

    def held(self, numel: int) -> torch.Tensor | None:
        """The next block's values (``numel`` of them, signed) where ``select_whole`` holds
        the tensor's (the caller's buffer must outlive the masks), else None."""
        if self._held is None:
            return None
        return self._held[self._offset : self._offset + numel]

    def mask(
        self,
        x: torch.Tensor,
        dtype: torch.dtype | None = None,
        *,
        out: torch.Tensor | None = None,
        work: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The in-range mask of the next block (blocks must come in order, each once), as
        ``dtype``: bool, or 0/1 in a float dtype (to multiply by: the comparisons then write
        floats, several times faster than bool results on the CPU). ``out`` and ``work``:
        flat buffers of the block's size and ``dtype`` to use instead of new ones (the
        mask is made in ``out``)."""
        flat = x.reshape(-1)
        dtype = torch.bool if dtype is None else dtype  # (not a default: torch loads lazily)
        start = self._offset
        self._offset += flat.numel()
        if self._all is not None:
            return torch.full_like(flat, self._all, dtype=dtype)
        if self._spans is not None:
            return self._mask_by_spans(flat, start, dtype, out, work)
        mask = torch.empty_like(flat, dtype=dtype) if out is None else out
        if self._above_first:
            torch.gt(flat, self._first, out=mask)
            if self._below_last:
                below = torch.empty_like(mask) if work is None else work
                mask.mul_(torch.lt(flat, self._last, out=below))
        elif self._below_last:
            torch.lt(flat, self._last, out=mask)
        else:
            mask.zero_()
        for g in self._groups:
            value = g[0]
            p0, p1, seen, size = (int(v) for v in g[1:])
            if seen >= p1:  # this group's kept positions are all behind
                continue
            eq = torch.eq(flat, value, out=torch.empty_like(mask))
            if p0 == 0 and p1 == size:  # the whole group is in range
                _include(mask, eq)
                continue
            # a float32 sum of 0/1 is exact below 2^24 (a block is far smaller)
            count = int(eq.sum(dtype=torch.float64 if eq.numel() >= 1 << 24 else None))
            g[3] = seen + count
            # the group's members here are its positions [seen, seen + count); kept: [p0, p1)
            a, b = max(p0, seen), min(p1, seen + count)
            if a >= b:
                continue
            if a == seen and b == seen + count:  # all of them
                _include(mask, eq)
            else:  # the block where the kept part of the group starts or ends
                idx = torch.nonzero(eq).squeeze(1)
                mask[idx[a - seen : b - seen]] = 1
        return mask

    def _mask_by_spans(
        self,
        flat: torch.Tensor,
        start: int,
        dtype: torch.dtype,
        out: torch.Tensor | None,
        work: torch.Tensor | None,
    ) -> torch.Tensor:
        """``mask`` where each boundary group's kept members are known to be those at flat
        positions [first, last]: a block inside that span includes the whole group here by
        its comparison (≥ instead of >), one outside it excludes it, and only a block the
        span's ends fall in compares the group's value on the part inside."""
        end = start + flat.numel()
        partial = []
        inclusive = set()
        for value, first, last in self._spans or []:
            if last < start or first >= end:
                continue  # none of this group's kept members is here
            if first <= start and end - 1 <= last:
                inclusive.add(value)  # all of this group's members here are kept
            else:
                partial.append((value, max(first, start) - start, min(last, end - 1) - start + 1))
        mask = torch.empty_like(flat, dtype=dtype) if out is None else out
        if self._above_first:
            cmp = torch.ge if self._first in inclusive else torch.gt
            cmp(flat, self._first, out=mask)
            if self._below_last:
                cmp = torch.le if self._last in inclusive else torch.lt
                below = torch.empty_like(mask) if work is None else work
                mask.mul_(cmp(flat, self._last, out=below))
        elif self._below_last:
            cmp = torch.le if self._last in inclusive else torch.lt
            cmp(flat, self._last, out=mask)
        elif inclusive:  # one group, both boundaries, kept whole here
            torch.eq(flat, self._first, out=mask)
        else:
            mask.zero_()
        for value, a, b in partial:
            _include(mask[a:b], torch.eq(flat[a:b], value, out=torch.empty_like(mask[a:b])))
        return mask


def _member_positions(
    keys: Any, value: float, p0: int, p1: int, per_chunk: list[int] | None = None
) -> tuple[int, int]:
    """Flat positions of the p0-th and the (p1 − 1)-th (0-based, by position) of the keys
    (int32 bit patterns of floats) whose magnitude is ``value``: a chunked count that stops
    at the last one. ``per_chunk``: how many there are in each ``_KEY_CHUNK`` of the keys,
    where known (``_Windows.per_chunk``): only the chunks holding the two are looked at."""
    key = numpy.float32(value).view(numpy.int32)
    wanted, found, seen = [p0, p1 - 1], [], 0
    flags = numpy.empty(min(keys.size, _KEY_CHUNK), dtype=bool)
    cleared = numpy.empty(min(keys.size, _KEY_CHUNK), dtype=numpy.int32)
    for i, start in enumerate(range(0, keys.size, _KEY_CHUNK)):
        if per_chunk is not None and wanted[0] >= seen + per_chunk[i]:
            seen += per_chunk[i]  # neither is in this chunk
            continue
        chunk = keys[start : start + _KEY_CHUNK]
        magnitude = numpy.bitwise_and(chunk, _MAGNITUDE, out=cleared[: chunk.size])
        eq = numpy.equal(magnitude, key, out=flags[: chunk.size])
        here = int(numpy.count_nonzero(eq))
        while wanted and wanted[0] < seen + here:
            found.append(start + int(numpy.flatnonzero(eq)[wanted.pop(0) - seen]))
        if not wanted:
            return found[0], found[1]
        seen += here
    raise ValueError(f"fewer than {p1} keys equal {value!r}")


def _include(mask: torch.Tensor, members: torch.Tensor) -> None:
    """mask |= members, for bool or 0/1 float masks (members are never in ``mask`` yet)."""
    if mask.dtype == torch.bool:
        mask.logical_or_(members)
    else:
        mask.add_(members)


def _host(values: torch.Tensor) -> Any:
    """A float32 CPU tensor's values as a numpy array (no copy), else None."""
    if values.device.type == "cpu" and values.dtype == torch.float32:
        return values.detach().reshape(-1).numpy()
    return None


class _Kept:
    """Values kept from block to block, in one growing float32 buffer: many small arrays
    that outlive the blocks they come from would fragment the heap (each block's buffers
    could no longer be reused, and memory grows by a block per block)."""

    def __init__(self, capacity: int) -> None:
        self.values = torch.empty(max(1, capacity), dtype=torch.float32).numpy()
        self.size = 0

    def add(self, got: Any) -> None:
        if self.size + got.size > self.values.size:
            grown = torch.empty(2 * (self.size + got.size), dtype=torch.float32).numpy()
            grown[: self.size] = self.values[: self.size]
            self.values = grown
        self.values[self.size : self.size + got.size] = got
        self.size += got.size

    def kept(self) -> Any:
        return self.values[: self.size]


def _where(values: torch.Tensor, keep: Callable[[Any], Any]) -> Any:
    """The values for which ``keep`` (a compare, written for numpy arrays and tensors
    alike) holds, flattened, as a numpy array (numpy's compare and index on the CPU:
    torch's bool masks are several times slower there)."""
    host = _host(values)
    if host is not None:
        return host[keep(host)]
    flat = values.detach().reshape(-1)
    return flat[keep(flat)].float().cpu().numpy()


def _below(bound: float) -> Callable[[Any], Any]:
    return lambda v: v < bound


def _above(bound: float) -> Callable[[Any], Any]:
    return lambda v: v > bound


class ExtremeSelect:
    """Exact k-th smallest values for ranks near either end of ``n`` values (within
    ``limit`` of it), in one streaming pass: the m smallest (largest) values seen so far
    are kept, m the deepest rank asked from that end, and a block adds only its values
    below (above) the m-th kept one, which later values cannot displace otherwise.
    Memory: a few times m values per end, whatever n.

    ``observe`` every block, then ``values``. ``feasible`` says whether ranks are close
    enough to the ends for the limit (else use RadixSelect's two passes)."""

    def __init__(self, n: int, ranks: list[int], limit: int = 1 << 20) -> None:
        self.n, self.ranks = n, list(ranks)
        self._m = {
            True: max([r for r in ranks if r <= n - r + 1] or [0]),  # from the bottom
            False: max([n - r + 1 for r in ranks if r > n - r + 1] or [0]),  # from the top
        }
        self.feasible = max(self._m.values()) <= limit and all(1 <= r <= n for r in ranks)
        self._kept: dict[bool, _Kept] = {}
        # the m-th smallest (largest) kept: values at or beyond it cannot be among them
        self._bound = {True: math.inf, False: -math.inf}
        self.count = 0

    def observe(self, values: torch.Tensor) -> None:
        self.count += values.numel()
        for low in (True, False):
            m = self._m[low]
            if not m:
                continue
            bound = self._bound[low]
            got = _where(values, _below(bound) if low else _above(bound))
            if not got.size:
                continue
            if low not in self._kept:
                self._kept[low] = _Kept(4 * m + (1 << 16) + values.numel())
            kept = self._kept[low]
            kept.add(got)
            if kept.size > 4 * m + (1 << 16):
                self._bound[low] = self._compact(kept, m, low)

    @staticmethod
    def _compact(kept: _Kept, m: int, low: bool) -> float:
        """Keep only the m smallest (largest) values; returns the m-th of them."""
        values = kept.kept()
        if low:
            values.partition(m - 1)
        else:
            values.partition(values.size - m)
            values[:m] = values[values.size - m :].copy()
        kept.size = m
        part = kept.kept()
        return float(part.max() if low else part.min())

    def values(self) -> list[float]:
        """The k-th smallest of all observed values, for each rank (after every block)."""
        if self.count != self.n:
            raise ValueError(f"observed {self.count} values, expected {self.n}")
        out = []
        for r in self.ranks:
            low = r <= self.n - r + 1
            values = self._kept[low].kept()
            at = r - 1 if low else values.size - (self.n - r + 1)  # the (n − r + 1)-th largest
            out.append(float(numpy.partition(values, at)[at]))
        return out


class WindowSelect:
    """The exact k-th smallest of ``n`` values in one streaming pass when it lies in a
    window [lo, hi] guessed beforehand (from a sample): the values below the window are
    counted, those in it kept. ``value()`` is the k-th smallest, or None when the window
    missed it (then two radix passes find it). Tracks the maximum as well."""

    def __init__(self, n: int, rank: int, lo: float, hi: float) -> None:
        self.n, self.rank, self.lo, self.hi = n, rank, lo, hi
        self.below = self.count = 0
        self.maximum = -math.inf
        self._inside = _Kept(1 << 16)

    def observe(self, values: torch.Tensor) -> None:
        if not values.numel():
            return
        self.count += values.numel()
        lo, hi = self.lo, self.hi
        host = _host(values)
        if host is not None:
            self.maximum = max(self.maximum, float(host.max()))
            at_least = host >= lo
            self.below += host.size - int(numpy.count_nonzero(at_least))
            at_least &= host <= hi
            self._inside.add(numpy.compress(at_least, host))  # (faster than host[mask])
        else:
            flat = values.detach().reshape(-1)
            self.maximum = max(self.maximum, float(flat.max()))
            self.below += int((flat < lo).sum())
            self._inside.add(flat[(flat >= lo) & (flat <= hi)].float().cpu().numpy())

    def value(self) -> float | None:
        if self.count != self.n:
            raise ValueError(f"observed {self.count} values, expected {self.n}")
        inside = self._inside.kept()
        at = self.rank - 1 - self.below
        if not 0 <= at < inside.size:
            return None
        return float(numpy.partition(inside, at)[at])


def window_positions(s: int, q: float, spread: float) -> tuple[int | None, int | None]:
    """Positions in a sorted sample of ``s`` values of the window around the population's
    q-quantile: q ± ``spread`` standard errors of a sample quantile's rank (plus two
    positions); None for an end that runs off the sample (the window is open there)."""
    half = spread * math.sqrt(max(q * (1 - q), 1 / s) / s) + 2 / s
    at_lo = max(0, math.floor((q - half) * s)) if q - half > 0 else None
    at_hi = min(s - 1, math.ceil((q + half) * s)) if q + half < 1 else None
    return at_lo, at_hi


def quantile_window(sample: torch.Tensor, q: float, spread: float) -> tuple[float, float]:
    """[lo, hi] around the q-quantile of the population a sample is drawn from: the
    sample's values at q ± ``spread`` standard errors of a sample quantile's rank."""
    s = sample.numel()
    if s == 0:
        return -math.inf, math.inf
    at_lo, at_hi = window_positions(s, q, spread)
    flat = sample.reshape(-1)
    # numpy's sort on the CPU (2-3x torch's there; the same order of values)
    cpu = flat.device.type == "cpu"
    ordered = numpy.sort(flat.to(torch.float32).numpy()) if cpu else torch.sort(flat).values
    lo = float(ordered[at_lo]) if at_lo is not None else -math.inf
    hi = float(ordered[at_hi]) if at_hi is not None else math.inf
    return lo, hi
