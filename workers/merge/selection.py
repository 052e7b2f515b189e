"""Exact order statistics by radix select on the float32 bit pattern.

For float32 values the 32-bit pattern, with negative values' bits all flipped and positive
values' sign bit set, is an unsigned integer that sorts exactly like the values. A
histogram of its high 16 bits (65,536 counters) finds the bucket holding rank k; a second
histogram of the low 16 bits of the members of that bucket gives the exact value. The
histograms can be accumulated chunk by chunk, so the k-th value of a whole model is found
in two streaming passes with O(65,536) memory (see shared spec "Exact global k-th value").
The same two steps on one tensor are several times faster than a sort or torch.kthvalue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_BUCKETS = 1 << 16
_SMALL = 1 << 18  # below this many elements, sorting beats the histograms


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """Monotone int32 keys of float32 values: a < b ⇔ key(a) < key(b) (−0.0 sorts before +0.0).

    Non-negative floats already compare like their bit patterns; negative ones have every bit
    but the sign flipped so that larger magnitudes give smaller keys.
    """
    bits = x.detach().reshape(-1).to(torch.float32).contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def key_to_value(key: int) -> float:
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def _high(keys: torch.Tensor) -> torch.Tensor:
    return (keys >> 16) + (_BUCKETS // 2)  # in [0, 65536)


@dataclass
class RadixSelect:
    """Streaming exact k-th smallest values (1-based ranks) over many chunks of float32 data.

    Usage: ``observe_high(chunk)`` for every chunk, ``end_high()``; then ``observe_low(chunk)``
    for every chunk again and ``end_low()``; then read ``values``. Several ranks are selected
    at once over the same data.
    """

    ranks: list[int]
    count: int = 0
    _high: torch.Tensor = field(default_factory=lambda: torch.zeros(_BUCKETS, dtype=torch.int64))
    _buckets: list[int] = field(default_factory=list)
    _residual: list[int] = field(default_factory=list)
    _low: dict[int, torch.Tensor] = field(default_factory=dict)
    values: list[float] = field(default_factory=list)

    def observe_high(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        keys = order_keys(x) if keys is None else keys
        self.count += keys.numel()
        self._high += torch.bincount(_high(keys), minlength=_BUCKETS).cpu()

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
        for b in set(self._buckets):
            self._low[b] = torch.zeros(_BUCKETS, dtype=torch.int64)

    def observe_low(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        keys = order_keys(x) if keys is None else keys
        high = _high(keys)
        for b, hist in self._low.items():
            members = keys[high == b] & 0xFFFF
            if members.numel():
                hist += torch.bincount(members, minlength=_BUCKETS).cpu()

    def end_low(self) -> None:
        self.values = []
        for b, r in zip(self._buckets, self._residual, strict=True):
            cum = torch.cumsum(self._low[b], 0)
            low = int(torch.searchsorted(cum, torch.tensor(r, dtype=torch.int64)).item())
            key = ((b - _BUCKETS // 2) << 16) | low
            self.values.append(key_to_value(key))


def kth_smallest(x: torch.Tensor, ranks: list[int]) -> list[float]:
    """Exact k-th smallest values (1-based) of a tensor, by two radix histogram passes."""
    flat = x.reshape(-1)
    if flat.numel() <= _SMALL:
        values = torch.sort(flat.to(torch.float32)).values
        return [float(values[k - 1]) for k in ranks]
    keys = order_keys(x)
    sel = RadixSelect(ranks=list(ranks))
    sel.observe_high(x, keys)
    sel.end_high()
    sel.observe_low(x, keys)
    sel.end_low()
    return sel.values


def rank_range_mask(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Mask of the entries whose rank in a stable ascending sort of ``x`` is in [lo, hi).

    Equal values are ranked by position (lower flat index first), as ``torch.sort(...,
    stable=True)`` would, but without sorting: the two boundary values are found by radix
    select and only the entries equal to a boundary value need their position counted.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    lo, hi = max(0, lo), min(n, hi)
    if lo >= hi:
        return torch.zeros_like(flat, dtype=torch.bool).reshape(x.shape)
    if lo == 0 and hi == n:
        return torch.ones_like(flat, dtype=torch.bool).reshape(x.shape)
    if n <= _SMALL:  # a stable sort is faster than two 65,536-bucket histograms here
        order = torch.sort(flat, stable=True).indices
        small = torch.zeros_like(flat, dtype=torch.bool)
        small[order[lo:hi]] = True
        return small.reshape(x.shape)
    a, b = kth_smallest(flat, [lo + 1, hi])  # values at ranks lo and hi-1
    mask = (flat > a) & (flat < b)
    for v in {a, b}:
        eq = flat == v
        n_eq = int(eq.sum().item())
        start = int((flat < v).sum().item())
        if start >= lo and start + n_eq <= hi:  # the whole group of equal values is inside
            mask |= eq
            continue
        rank = start + torch.cumsum(eq, 0) - 1
        mask |= eq & (rank >= lo) & (rank < hi)
    return mask.reshape(x.shape)
