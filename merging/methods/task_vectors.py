"""The sparse task-vector family: TIES, DARE, Model Breadcrumbs, DELLA and their variants.

Every variant computes θ0 + λ·mixed from the sparsified task vectors τi' = sparsify(τi):
with sign consensus (TIES elect + disjoint merge) s = sign(Σ wi·τi') with 0 counted as +,
mi = [sign(wi·τi') = s], mixed = Σ mi·wi·τi' (÷ Σ mi·wi with ``normalize``); without it,
mixed = Σ wi·τi' (÷ Σ wi). A variant is data, three choices:

- a :class:`Sparsification`: which entries of τi survive (TIES' top-k by magnitude, DARE's
  random drop, Breadcrumbs' rank band, DELLA's rank-weighted random drop);
- ``consensus``: whether signs are elected;
- :class:`Rescale`: what the survivors are scaled by (L1-norm matching, 1/density, none).

A new variant is one more entry of ``VARIANTS``; a new sparsification, one more class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from merging.inputs import WORK_CHUNK, Block, Scratch, TensorInputs, scale_
from merging.lazy_torch import numpy, torch
from merging.method import (
    MergeInputError,
    MergeMethod,
    RecipeRuleError,
    RecipeSettings,
    as_number,
    is_scalar,
    register,
)
from merging.parameters import (
    INT8_MASK,
    LAMBDA,
    ParameterSpec,
    ParamScope,
    density,
    normalize,
    rescale,
    weight,
)
from merging.selection import IN_MEMORY_KEYS_BYTES, RankRangeStream, rank_range_mask
from merging.statistics import (
    WINDOW_SAMPLE,
    WholeModel,
    WholeModelStatistic,
    select_in_window,
    select_per_model,
    task_vector_magnitudes,
)
from merging.threads import each, spans

# ---- sparsifications ---------------------------------------------------------------------------


class Sparsification(ABC):
    """How a task vector is thinned: a keep mask per model, on each block of the tensor.

    Called only where the model's density is below 1 (density 1 keeps everything).
    """

    parameters: tuple[ParameterSpec, ...] = ()  # what it adds to the family's parameters
    draws_random = False  # keep() draws at random (x.draws)

    def check_recipe(self, recipe: RecipeSettings) -> None:  # noqa: B027 (optional hook)
        """Rules of its own over a recipe (RecipeRuleError at the field to change)."""

    def whole_model_statistic(self, shared: Mapping[str, Any]) -> WholeModelStatistic | None:
        return None

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        """Whether the masks need the tensor whole (rows, random draws of its shape)."""
        return True

    def prepare(self, x: TensorInputs) -> tuple[list[Any], bool]:
        """Per-model state for ``keep``, after any passes over the tensor's blocks, and
        whether those passes checked the inputs for NaN/Inf."""
        return [None] * x.count, False

    @abstractmethod
    def keep(self, x: TensorInputs, j: int, state: Any, tau: torch.Tensor) -> torch.Tensor:
        """Which entries of model j's τ (this block of it) survive: 1/0 in τ's float dtype
        (comparisons written into a float buffer: a bool mask is several times slower to
        make and to multiply by on the CPU)."""

    def sparsify_(self, x: TensorInputs, j: int, state: Any, tau: torch.Tensor) -> torch.Tensor:
        """τ with the dropped entries zeroed, in place."""
        return tau.mul_(self.keep(x, j, state, tau))

    def held_tau(self, state: Any, numel: int) -> torch.Tensor | None:
        """The next block's τ (``numel`` entries) where ``prepare`` made and holds the
        tensor's, to be used (and overwritten) instead of making it again; else None."""
        return None


def _random_keep(
    x: TensorInputs, j: int, tau: torch.Tensor, p: torch.Tensor | float
) -> torch.Tensor:
    """Bernoulli(p) keep mask from the seeded per-(model, tensor) draws (merging/randomness.py)."""
    draws = x.draws(j).take(tau.numel()).view(tau.shape).to(tau.device)
    return torch.lt(draws, p, out=draws)  # 1.0 where draw < p, in the draws' buffer


def _drop_at_random_(
    x: TensorInputs, j: int, tau: torch.Tensor, p: torch.Tensor | float
) -> torch.Tensor:
    """``tau.mul_(_random_keep(...))`` a cache-sized chunk at a time: the same draws (one
    generator, drawn in order), without a float32 copy of the tensor's draws or mask."""
    flat = tau.reshape(-1)
    probability = p.reshape(-1) if isinstance(p, torch.Tensor) else p
    stream = x.draws(j)
    for start in range(0, flat.numel(), WORK_CHUNK):
        draws = stream.take(min(WORK_CHUNK, flat.numel() - start))
        stop = start + draws.numel()
        if isinstance(probability, torch.Tensor):
            keep = torch.lt(draws.to(tau.device), probability[start:stop])
        else:
            keep = torch.lt(draws, probability, out=draws).to(tau.device)
        flat[start:stop].mul_(keep)
    return tau


class RankWindow(Sparsification):
    """Keep the entries whose rank of |τ| lies in a window of a stable sort (equal values
    ranked by position, the lower flat index first, in either direction).

    On a streamed tensor the window's boundaries are found exactly by radix select over the
    blocks first (RankRangeStream: two extra read passes instead of holding the tensor); a
    tensor held whole is ranked at once (rank_range_mask).
    """

    @abstractmethod
    def window(self, n: int, p: Mapping[str, Any]) -> tuple[int, int, bool]:
        """(lo, hi, descending): the ranks [lo, hi) of |τ| kept, for density < 1."""

    def prepare(self, x: TensorInputs) -> tuple[list[Any], bool]:
        windows: list[Any] = []
        for j in range(x.count):
            lo, hi, descending = self.window(x.numel, x.params[j])
            windows.append(
                (lo, hi, descending)
                if x.whole
                else RankRangeStream(x.numel, lo, hi, descending=descending)
            )
        selecting = {
            j: w
            for j, w in enumerate(windows)
            if isinstance(w, RankRangeStream) and w.needs_selection
        }
        if not selecting:
            return windows, False
        if x.numel * len(selecting) * 4 <= IN_MEMORY_KEYS_BYTES:
            _select_in_memory(x, selecting)
            return windows, True
        for b in x.blocks():  # the exact boundaries of every model's window: two radix passes
            for j, w in selecting.items():
                w.observe_high(b.tau(j).abs_())
        for w in selecting.values():
            w.end_high()
        for b in x.blocks(check=False):
            for j, w in selecting.items():
                w.observe_low(b.tau(j).abs_())
        for w in selecting.values():
            w.end_low()
        return windows, True

    def held_tau(self, state: Any, numel: int) -> torch.Tensor | None:
        return state.held(numel) if isinstance(state, RankRangeStream) else None

    def keep(self, x: TensorInputs, j: int, state: Any, tau: torch.Tensor) -> torch.Tensor:
        if isinstance(state, RankRangeStream):  # per block, in buffers reused block to block
            n = tau.numel()
            magnitude = torch.abs(tau, out=x.scratch.get("magnitude", n, tau.dtype, tau.device))
            out = x.scratch.get("mask", n, tau.dtype, tau.device)
            work = x.scratch.get("mask-work", n, tau.dtype, tau.device)
            return state.mask(magnitude, dtype=tau.dtype, out=out, work=work).view(tau.shape)
        lo, hi, descending = state
        mask = rank_range_mask(tau.abs(), lo, hi, descending=descending, nonnegative=True)
        return mask.to(tau.dtype)


def _select_in_memory(x: TensorInputs, windows: dict[int, RankRangeStream]) -> None:
    """Every window's boundaries from one pass that gathers each model's τ whole (float32;
    the bit patterns of its magnitudes are the keys): one read of the inputs instead of
    two, and no histograms. Where a window holds its τ after (``RankRangeStream.held``),
    the merge takes τ from it instead of reading and making it again."""
    taus: dict[int, torch.Tensor] = {}
    for b in x.blocks():
        for j in windows:
            if j not in taus:
                taus[j] = x.scratch.get(f"held/{j}", x.numel, torch.float32, b.base32().device)
            b.tau(j, out=taus[j][b.start : b.stop])
    jobs = list(windows.items())
    if any(t.device.type != "cpu" for t in taus.values()):  # (numpy's work is the CPU's)
        for j, w in jobs:
            w.select_whole(taus[j])
    else:
        each(lambda jw: jw[1].select_whole(taus[jw[0]]), jobs)  # on the cores at once


_TIES_SCOPE = ParameterSpec(
    "scope",
    str,
    "tensor",
    ParamScope.SHARED,
    "tensor: top-k per tensor (mergekit); global: top-k over the whole model (TIES paper)",
    choices=("tensor", "global"),
    per_tensor=False,
)


class MagnitudeTopK(RankWindow):
    """TIES trim: keep the k = max(1, int(density·N)) largest |τ| of the tensor (ties: lower
    index first). ``scope: global`` (TIES paper) keeps |τ| ≥ the model's k-th largest over
    all its parameters (TiesGlobal): entries at the threshold are all kept, as the official
    code's |τ| >= k-th value."""

    parameters = (_TIES_SCOPE,)

    def check_recipe(self, recipe: RecipeSettings) -> None:
        """A whole-model threshold needs one density per model, not one per tensor."""
        if recipe.parameters.get("scope") != "global":
            return
        scopes = [(("parameters",), recipe.parameters)] + [
            (("models", m.position, "parameters"), m.parameters) for m in recipe.models
        ]
        for where, params in scopes:
            if "density" in params and not is_scalar(params["density"]):
                raise RecipeRuleError(
                    (*where, "density"),
                    "with scope: global the density is one value per model (no gradient or "
                    "filter list)",
                )

    def whole_model_statistic(self, shared: Mapping[str, Any]) -> WholeModelStatistic | None:
        return TiesGlobal() if shared.get("scope") == "global" else None

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        return False

    def window(self, n: int, p: Mapping[str, Any]) -> tuple[int, int, bool]:
        if p["density"] <= 0 or n == 0:
            return 0, 0, True
        return 0, max(1, int(p["density"] * n)), True

    def prepare(self, x: TensorInputs) -> tuple[list[Any], bool]:
        if x.shared.get("scope") == "global":
            return [x.stats["ties_threshold"][i] for i in x.model_indices], False
        return super().prepare(x)

    def keep(self, x: TensorInputs, j: int, state: Any, tau: torch.Tensor) -> torch.Tensor:
        if x.shared.get("scope") == "global":
            magnitude = tau.abs()
            return torch.ge(magnitude, state, out=magnitude)
        return super().keep(x, j, state, tau)


class TiesGlobal(WholeModelStatistic):
    """TIES paper trim: per model, the magnitude of its k-th largest |τ| over all parameters,
    k = max(1, int(density·N))."""

    passes = 2

    def compute(self, model: WholeModel) -> dict[str, Any]:
        sizes = model.float_sizes()
        ranks: dict[int, list[int]] = {}
        thresholds: dict[int, float] = {}
        for i, p in model.model_parameters().items():
            n = sizes[i]
            if p["density"] >= 1 or n == 0:
                thresholds[i] = 0.0  # keeps everything (density 1 never asks)
            elif p["density"] <= 0:
                thresholds[i] = float("inf")
            else:
                ranks[i] = [n - max(1, int(p["density"] * n)) + 1]
        if ranks and not model.in_parts:
            found = self._in_one_pass(model, ranks)
            if found is not None:
                thresholds.update(found)
                return {"ties_threshold": thresholds}
        if ranks:
            selected = select_per_model(
                model, ranks, task_vector_magnitudes, "statistics", nonnegative=True
            )
            thresholds.update({i: v for i, (v,) in selected.items()})
        return {"ties_threshold": thresholds}

    def _in_one_pass(
        self, model: WholeModel, ranks: dict[int, list[int]]
    ) -> dict[int, float] | None:
        """The thresholds in one pass instead of two, in one process: |τ| of stretches
        sampled over the model (read directly) guesses the windows (select_in_window).
        None when a window missed (the radix passes then find them)."""
        sampled: dict[int, list[torch.Tensor]] = {i: [] for i in ranks}
        for x, b in model.sample(WINDOW_SAMPLE):
            for i, v in task_vector_magnitudes(x, b):
                if i in sampled:
                    sampled[i].append(v.clone())
        samples = {i: torch.cat([*parts, torch.empty(0)]) for i, parts in sampled.items()}
        found = select_in_window(
            model,
            {i: k for i, (k,) in ranks.items()},
            samples,
            task_vector_magnitudes,
            "statistics",
        )
        return None if found is None else {i: value for i, (value, _) in found.items()}


class RankBand(RankWindow):
    """Model Breadcrumbs: drop the top ``gamma`` and the bottom (1 − density − gamma) by |τ|.

    Ranks of |τ| ascending over N entries: keep = int(density·N), top = int(gamma·N),
    bottom = max(0, N − keep − top); ranks [bottom, bottom + keep) survive. With
    ``scope: row`` the rule is applied to each row along the last dimension (official code).
    """

    parameters = (
        ParameterSpec(
            "gamma",
            float,
            0.01,
            ParamScope.MODEL,
            "fraction of largest-magnitude entries dropped",
            minimum=0.0,
            maximum=1.0,
        ),
        ParameterSpec(
            "scope",
            str,
            "tensor",
            ParamScope.SHARED,
            "tensor: rank the flattened tensor (mergekit); row: rank each row (official code)",
            choices=("tensor", "row"),
            per_tensor=False,
        ),
    )

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        return shared.get("scope") == "row"

    def window(self, n: int, p: Mapping[str, Any]) -> tuple[int, int, bool]:
        keep, top = int(p["density"] * n), int(p["gamma"] * n)
        bottom = max(0, n - keep - top)
        return bottom, bottom + keep, False

    def keep(self, x: TensorInputs, j: int, state: Any, tau: torch.Tensor) -> torch.Tensor:
        if x.shared.get("scope") == "row" and tau.dim() >= 2:
            rows = tau.reshape(-1, tau.shape[-1])
            masks = []
            for r in rows:
                lo, hi, descending = self.window(r.numel(), x.params[j])
                masks.append(
                    rank_range_mask(r.abs(), lo, hi, descending=descending, nonnegative=True)
                )
            return torch.stack(masks).reshape(tau.shape).to(tau.dtype)
        return super().keep(x, j, state, tau)


class RandomDrop(Sparsification):
    """DARE: keep each entry with probability ``density`` (seeded draws of the tensor's shape)."""

    draws_random = True

    def keep(self, x: TensorInputs, j: int, state: Any, tau: torch.Tensor) -> torch.Tensor:
        return _random_keep(x, j, tau, x.params[j]["density"])

    def sparsify_(self, x: TensorInputs, j: int, state: Any, tau: torch.Tensor) -> torch.Tensor:
        return _drop_at_random_(x, j, tau, x.params[j]["density"])


class RankedRandomDrop(Sparsification):
    """DELLA MagPrune: keep with probability p = (density − ε) + 2ε·rn, rn the normalised rank
    of |τ| in its row; needs 0 < density − ε and density + ε ≤ 1."""

    draws_random = True

    parameters = (
        ParameterSpec(
            "epsilon",
            float,
            0.15,
            ParamScope.MODEL,
            "spread of DELLA's keep probabilities",
            minimum=0.0,
            maximum=1.0,
        ),
    )

    def check_recipe(self, recipe: RecipeSettings) -> None:
        """density ± ε must be a probability, checked here on scalar settings; a gradient
        is checked per tensor by ``keep``. The error points at the model's own setting (of
        density, else epsilon), else at the top level's."""
        for m in (m for m in recipe.models if m.fine_tuned):
            d_setting, d_at = recipe.setting(m, "density")
            e_setting, e_at = recipe.setting(m, "epsilon")
            d, e = as_number(d_setting), as_number(e_setting)
            if d is None or e is None or d >= 1 or (d - e > 0 and d + e <= 1):
                continue
            places = [at for at in (d_at, e_at) if at is not None]
            own = [at for at in places if at[0] == "models"]
            whose = "" if own else f" for models[{m.position}]"
            raise RecipeRuleError(
                (own or places)[0],
                "della needs 0 < density − epsilon and density + epsilon ≤ 1; got density "
                f"{d:g}, epsilon {e:g}{whose}",
            )

    def keep(self, x: TensorInputs, j: int, state: Any, tau: torch.Tensor) -> torch.Tensor:
        return _random_keep(x, j, tau, della_keep_probability(tau, *self._settings(x, j)))

    def sparsify_(self, x: TensorInputs, j: int, state: Any, tau: torch.Tensor) -> torch.Tensor:
        """τ ⊙ Bernoulli(p) in place, a block of whole rows at a time: each block's ranks,
        probabilities and draws (the generator's stream in order, as ``uniform`` draws it)
        are made and used before the next, so no tensor-sized temporary is made."""
        density, epsilon = self._settings(x, j)
        rows = _rows(tau)
        by_rank = della_rank_probabilities(rows.shape[1], density, epsilon, tau.device)
        stream = x.draws(j)
        step = max(1, WORK_CHUNK // rows.shape[1]) if rows.shape[1] else 1
        for r0 in range(0, rows.shape[0], step):
            block = rows[r0 : r0 + step]
            p = _by_rank(block, by_rank)
            d = stream.take(block.numel())
            keep = torch.lt(d.to(tau.device).view(block.shape), p, out=p)  # 1.0 where draw < p
            block.mul_(keep)
        return tau

    def _settings(self, x: TensorInputs, j: int) -> tuple[float, float]:
        d, eps = x.params[j]["density"], x.params[j]["epsilon"]
        if not (d - eps > 0 and d + eps <= 1):
            raise MergeInputError(
                f"della needs 0 < density − epsilon and density + epsilon ≤ 1; got density "
                f"{d:g}, epsilon {eps:g}",
                field="parameters.epsilon",
            )
        return d, eps


def _rows(tau: torch.Tensor) -> torch.Tensor:
    """The rows DELLA ranks in: along the last dimension (a 1-D tensor is one row)."""
    return tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(-1, tau.shape[-1])


def della_rank_probabilities(
    cols: int, density: float, epsilon: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """p by rank r = 0 … cols − 1: (density − ε) + 2ε·rn, rn = r / (cols − 1) (0 for one
    column), in float32 with the same operations an element of that rank would get."""
    ranks = torch.arange(cols, device=device)
    rn = ranks.to(torch.float32) / (cols - 1) if cols > 1 else torch.zeros(cols, device=device)
    return (density - epsilon) + 2 * epsilon * rn


def row_order(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the columns in the order of a stable ascending sort of |τ| (equal values by
    column, lower first): int64, the shape of ``rows``.

    One unstable sort of unique int64 keys instead of a stable sort with its indices: the
    bit pattern of |τ| (a non-negative float32 compares like its int32 bits) in the high
    bits and the column in the low bits, so no two keys of a row are equal and any sort
    orders them as the stable sort orders the values; the sorted keys' low bits are the
    columns. On the CPU the sort is numpy's (vectorised for int64: several times faster
    than torch.sort here), elsewhere torch's.
    """
    cols = rows.shape[1]
    shift = max(1, (cols - 1).bit_length())
    bits = rows.abs().view(torch.int32)
    if rows.device.type == "cpu":
        return _row_order_numpy(bits, shift)
    return _row_order_torch(bits, shift)


def _row_order_numpy(bits: torch.Tensor, shift: int) -> torch.Tensor:
    """``row_order`` by numpy (its int64 element-wise ops are faster here too), with 32-bit
    keys where they fit (``_packed_keys32``: numpy sorts them twice as fast)."""
    packed = _packed_keys32(bits.numpy(), shift)
    if packed is None:
        packed = bits.numpy().astype("int64")
        packed <<= shift
        packed |= torch.arange(bits.shape[1]).numpy()
        packed.sort(axis=1)  # in place; unique keys: the kind of sort does not matter
        packed &= (1 << shift) - 1
        return torch.from_numpy(packed)
    packed.sort(axis=1)
    order = numpy.empty(packed.shape, dtype=numpy.int64)  # the index dtype scatter takes
    numpy.bitwise_and(packed, (1 << shift) - 1, out=order)
    return torch.from_numpy(order)


def _packed_keys32(bits: Any, shift: int) -> Any:
    """``row_order``'s keys in 32 bits (as int32 that sort like them), or None where they
    need more. Lossless, so they order exactly as the 64-bit keys: the magnitudes of τ made
    from fp16/bf16 checkpoints share many low zero bits, which are dropped, and where the
    rest is still too wide they are counted up from the smallest non-zero one (a zero is
    below it), leaving about 20 bits for the value beside the column's ``shift`` bits."""
    top = int(bits.max())
    common = int(numpy.bitwise_or.reduce(bits, axis=None))
    zeros = (common & -common).bit_length() - 1 if common else 0  # low bits 0 in every value
    if (top >> zeros).bit_length() + shift <= 32:
        keys = bits >> zeros
    else:
        least = int((bits.view(numpy.uint32) - numpy.uint32(1)).min()) + 1  # smallest > 0
        if (((top - least) >> zeros) + 1).bit_length() + shift > 32:
            return None
        keys = bits - numpy.int32(least)  # non-negative int32 values: no overflow
        keys >>= zeros
        numpy.maximum(keys, -1, out=keys)  # zeros (all below `least`) to -1 ...
        keys += 1  # ... then 0, the others 1 + their steps above `least`
    unsigned = keys.view(numpy.uint32)
    unsigned <<= numpy.uint32(shift)
    unsigned |= numpy.arange(bits.shape[1], dtype=numpy.uint32)
    unsigned ^= numpy.uint32(1 << 31)  # unsigned order as int32 order
    return keys


def _row_order_torch(bits: torch.Tensor, shift: int) -> torch.Tensor:
    """``row_order`` by torch, on any device."""
    keys = bits.to(torch.int64).bitwise_left_shift_(shift)
    keys.bitwise_or_(torch.arange(bits.shape[1], device=bits.device))
    return torch.sort(keys, dim=1).values.bitwise_and_((1 << shift) - 1)


def _by_rank(rows: torch.Tensor, by_rank: torch.Tensor) -> torch.Tensor:
    """Each entry's value of ``by_rank`` at its rank of |τ| in its row (a float32 tensor).
    Rows are ranked on their own: on the CPU, groups of rows are ranked on the cores at
    once (the sort runs on the calling thread only)."""
    out = torch.empty(rows.shape, dtype=by_rank.dtype, device=rows.device)

    def fill(span: tuple[int, int]) -> None:
        part = out[span[0] : span[1]]
        part.scatter_(1, row_order(rows[span[0] : span[1]]), by_rank.expand_as(part))

    cols = max(1, rows.shape[1])
    groups = spans(rows.shape[0], least=max(1, _RANKED_TOGETHER // cols))
    each(fill, groups if rows.device.type == "cpu" else [(0, rows.shape[0])])
    return out


# entries of a group of rows ranked on one thread: fewer are ranked on the calling thread
_RANKED_TOGETHER = 1 << 16


def della_keep_probability(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p = (density − ε) + 2ε·rn, rn the normalised rank of |τ| in its row (stable sort)."""
    rows = _rows(tau)
    by_rank = della_rank_probabilities(rows.shape[1], density, epsilon, tau.device)
    return _by_rank(rows, by_rank).reshape(tau.shape)


# ---- rescaling and sign consensus --------------------------------------------------------------


@dataclass(frozen=True)
class Rescale:
    """How the surviving entries are scaled: its ``rescale`` switch (with its default) and,
    where there is a choice, ``rescale_mode``. L1 matches the full task vector's L1 norm
    (mergekit), which needs the tensor whole; inverse_p divides by the density (DARE paper)."""

    default: bool
    modes: tuple[str, ...] = ("l1",)

    @property
    def parameters(self) -> tuple[ParameterSpec, ...]:
        if len(self.modes) == 1:
            return (rescale(self.default),)
        mode = ParameterSpec(
            "rescale_mode",
            str,
            "l1",
            ParamScope.SHARED,
            "l1: match the L1 norm (mergekit); inverse_p: divide by density (DARE paper)",
            choices=self.modes,
            per_tensor=False,
        )
        return rescale(self.default), mode

    def mode(self, shared: Mapping[str, Any]) -> str | None:
        return shared.get("rescale_mode", "l1") if shared.get("rescale") else None


def l1_norm(x: torch.Tensor) -> float:
    """Σ|x|, a cache-sized chunk at a time (no full-size |x| temporary), summed in float64."""
    flat = x.reshape(-1)
    scratch = torch.empty(min(flat.numel(), WORK_CHUNK), dtype=x.dtype, device=x.device)
    total = 0.0
    for start in range(0, flat.numel(), WORK_CHUNK):
        part = flat[start : start + WORK_CHUNK]
        total += float(torch.abs(part, out=scratch[: part.numel()]).sum())
    return total


def l1_rescale(before: float, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale the kept entries (in place) so their L1 norm matches ``before``, the full task
    vector's (mergekit's rescale)."""
    after = l1_norm(kept)
    if before < eps or after < eps:
        return kept
    return kept.mul_(before / after)


def sign_consensus(
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    divisor: bool = True,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TIES elect + disjoint merge: s = sign(Σ Di) (0 counts as +), mi = [sign(Di) = s];
    returns (Σ mi·Di, Σ mi·wi), the second only when ``divisor`` (else None). Works in
    cache-sized chunks; the Di are consumed (overwritten).

    All in float32 arithmetic (a comparison written as 0/1 into a float32 buffer, never a
    bool tensor: bool results, ``where`` and bool masks are many times slower on the CPU):
    with s = ±1, mi·Di = s·max(s·Di, 0), and a sum of values that all have the sign s is s
    times the sum of their magnitudes, rounding included, so Σ mi·Di is the same float32
    value as the plain masked sum in the same order. The divisor and the sign are made in
    buffers of ``scratch`` where one is given.
    """
    shape = deltas[0].shape
    flat = [d.reshape(-1) for d in deltas]
    n = flat[0].numel()
    mixed = torch.empty(n, dtype=flat[0].dtype, device=flat[0].device)

    def buffer(slot: str, size: int) -> torch.Tensor:
        if scratch is not None:
            return scratch.get(slot, size, mixed.dtype, mixed.device)
        return torch.empty(size, dtype=mixed.dtype, device=mixed.device)

    div = buffer("divisor", n) if divisor else None
    sign = buffer("sign", min(n, WORK_CHUNK))
    for start in range(0, n, WORK_CHUNK):
        blk = [d[start : start + WORK_CHUNK] for d in flat]
        m = mixed[start : start + WORK_CHUNK]
        s = sign[: m.numel()]
        if len(blk) > 1:
            torch.add(blk[0], blk[1], out=m)
        else:
            m.copy_(blk[0])
        for d in blk[2:]:
            m += d
        torch.ge(m, 0, out=s)  # 1 where Σ Di >= 0 (NaN: 0), else 0 ...
        s.mul_(2).sub_(1)  # ... as ±1
        m.zero_()
        for j, d in enumerate(blk):
            r = d.mul_(s).clamp_(min=0)  # |Di| where it has the elected sign, else 0
            m += r
            if div is not None:
                div_blk = div[start : start + WORK_CHUNK]
                if j == 0:
                    div_blk.zero_()
                div_blk.add_(torch.gt(r, 0, out=d), alpha=weights[j])  # d: free now
        m.mul_(s)
    return mixed.reshape(shape), None if div is None else div.reshape(shape)


def nonzero_divisor(divisor: torch.Tensor) -> torch.Tensor:
    """``divisor`` with its zeros (no model agreed, or weights that cancel) replaced by 1, in
    place: + [divisor = 0] as a float 0/1 (faster than a bool mask), which adds exactly 0
    elsewhere (NaN stays NaN)."""
    return divisor.add_(torch.eq(divisor, 0, out=torch.empty_like(divisor)))


# ---- the family --------------------------------------------------------------------------------


class TaskVectorMethod(MergeMethod):
    """One variant of the family: a sparsification, sign consensus or not, a rescale."""

    def __init__(
        self,
        name: str,
        title: str,
        reference: str,
        sparsify: Sparsification,
        *,
        consensus: bool,
        normalize_default: bool,
        rescaling: Rescale | None,
    ) -> None:
        self.name, self.title, self.reference = name, title, reference
        self.sparsify, self.consensus, self.rescaling = sparsify, consensus, rescaling
        self.draws_random = sparsify.draws_random
        self.parameters = (
            weight(),
            density(),
            LAMBDA,
            normalize(normalize_default),
            INT8_MASK,
            *(rescaling.parameters if rescaling else ()),
            *sparsify.parameters,
        )

    def check_recipe(self, recipe: RecipeSettings) -> None:
        self.sparsify.check_recipe(recipe)

    def whole_model_statistic(self, shared: Mapping[str, Any]) -> WholeModelStatistic | None:
        return self.sparsify.whole_model_statistic(shared)

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        return self.sparsify.whole_tensor(shared) or self._rescale(shared) == "l1"

    def _rescale(self, shared: Mapping[str, Any]) -> str | None:
        return self.rescaling.mode(shared) if self.rescaling else None

    def merge(self, x: TensorInputs) -> Iterator[torch.Tensor]:
        states, checked = self.sparsify.prepare(x)
        # where prepare holds every model's τ, the merge reads only the base
        held = all(
            p["density"] < 1 and self.sparsify.held_tau(s, 0) is not None
            for p, s in zip(x.params, states, strict=True)
        )
        for b in x.blocks(check=not checked, models=not held or x.count == 0):
            yield self.merge_block_with(x, b, states)

    def merge_block_with(self, x: TensorInputs, b: Block, states: list[Any]) -> torch.Tensor:
        if x.count == 0:
            return b.base32().clone()
        weights = [p["weight"] for p in x.params]
        divisor: torch.Tensor | float
        if self.consensus:
            deltas = [
                scale_(self.sparse_tau(x, b, j, states[j]), weights[j]) for j in range(x.count)
            ]
            mixed, div = sign_consensus(
                deltas, weights, divisor=x.shared["normalize"], scratch=x.scratch
            )
            del deltas
            divisor = 1.0 if div is None else nonzero_divisor(div)
        else:
            mixed = torch.zeros_like(b.base32())
            for j in range(x.count):
                mixed.add_(self.sparse_tau(x, b, j, states[j]), alpha=weights[j])
            divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        if x.shared["normalize"]:
            mixed /= divisor
        return scale_(mixed, x.shared["lambda"]).add_(b.base32())

    def sparse_tau(self, x: TensorInputs, b: Block, j: int, state: Any) -> torch.Tensor:
        """τj' = rescale(τj ⊙ keep) on this block, computed in place on a fresh τj (a
        whole tensor's in a buffer reused from tensor to tensor: a fresh tensor-sized one
        would be page-faulted in every time, about as long as the work done in it)."""
        p = x.params[j]
        held = self.sparsify.held_tau(state, b.numel) if p["density"] < 1 else None
        if held is not None:
            tau = held.view(b.shape)
        elif x.whole:
            buffer = x.scratch.get(f"tau/{j}", b.numel, torch.float32, b.base32().device)
            tau = b.tau(j, out=buffer)
        else:
            tau = b.tau(j)
        if p["density"] >= 1:
            return tau
        mode = self._rescale(x.shared)
        l1 = l1_norm(tau) if mode == "l1" else None
        self.sparsify.sparsify_(x, j, state, tau)
        if mode == "inverse_p":
            return tau.div_(p["density"]) if p["density"] > 0 else tau
        return tau if l1 is None else l1_rescale(l1, tau)


_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"
_DARE_RESCALE = Rescale(default=True, modes=("l1", "inverse_p"))

VARIANTS = (
    # name, title, paper, sparsification, consensus, normalize default, rescale
    TaskVectorMethod(
        "ties", "TIES", _TIES, MagnitudeTopK(),
        consensus=True, normalize_default=True, rescaling=Rescale(default=False),
    ),
    TaskVectorMethod(
        "dare_linear", "Linear DARE", _DARE, RandomDrop(),
        consensus=False, normalize_default=False, rescaling=_DARE_RESCALE,
    ),
    TaskVectorMethod(
        "dare_ties", "DARE TIES", _DARE, RandomDrop(),
        consensus=True, normalize_default=False, rescaling=_DARE_RESCALE,
    ),
    TaskVectorMethod(
        "breadcrumbs", "Model Breadcrumbs", _BREADCRUMBS, RankBand(),
        consensus=False, normalize_default=False, rescaling=None,
    ),
    TaskVectorMethod(
        "breadcrumbs_ties", "Model Breadcrumbs with TIES", _BREADCRUMBS, RankBand(),
        consensus=True, normalize_default=False, rescaling=None,
    ),
    TaskVectorMethod(
        "della", "DELLA", _DELLA, RankedRandomDrop(),
        consensus=True, normalize_default=True, rescaling=Rescale(default=True),
    ),
    TaskVectorMethod(
        "della_linear", "Linear DELLA", _DELLA, RankedRandomDrop(),
        consensus=False, normalize_default=False, rescaling=Rescale(default=True),
    ),
)  # fmt: skip
for _variant in VARIANTS:
    register(_variant)
