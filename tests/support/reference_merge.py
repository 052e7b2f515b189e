"""A second, deliberately simple implementation of every merge method.

Written from the method descriptions (docs/merge-methods.md) alone, independently of the
methods in ``merging/methods`` and the engine in ``workers/merge``: whole state dicts in
memory, dense tensors, one obvious code path per method. The engine's tests compare its
streamed, sharded output with this.

Precision: task vectors and every *discrete* decision (ranks, top-k, thresholds, sign
election, keep masks) use float32 as the description prescribes ("All math in float32"),
so that an engine following it makes the same decisions bit for bit;
the continuous mixing afterwards is done in float64 (more exact than the engine, differing
only by float32 rounding). PCB is computed entirely in float32 because its output jumps
when an entry crosses a threshold.

The RNG protocol (``merging/randomness.py``) is re-implemented here from its
docstring so that a change to it shows up as a test failure.

Only local references (absolute or relative paths, ``file://``) are supported.

Conventions where the description leaves a choice (each one is exercised by a test):

- TIES top-k per tensor keeps exactly k: |τ| sorted descending with a stable sort, the
  earlier flat index wins among equal magnitudes (mergekit's ``argsort(descending)[:k]``).
  ``scope: global`` keeps every |τ| ≥ the global k-th value (ties at the cut all kept).
- Breadcrumbs and DELLA ranks: stable ascending sort (earlier index = lower rank).
- A parameter whose {filter, value} list matches nothing falls through to the next scope.
- SLERP and Model Stock: a zero-norm vector has cos 0 with anything.
- PCB: S = normalize(clamp(B, t, max)), i.e. entries ≤ the threshold get 0 even when the
  threshold is negative; hi == lo and t == max rows give 0 (not 0/0).
- L1 rescale leaves a tensor with nothing kept as zeros; division by a zero sum of weights
  uses 1 (linear and task_arithmetic too).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from schemas.recipe import parse_recipe

F32 = torch.float32
F64 = torch.float64

# Method defaults, copied from docs/recipes.md (NOT imported from the methods' declarations
# in merging/, so that a changed default there is caught by the engine tests).
_COMMON = {"weight": 1.0, "density": 1.0, "lambda": 1.0, "rescale": False}
DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"weight": 1.0, "normalize": True},
    "task_arithmetic": {**_COMMON, "normalize": False},
    "ties": {**_COMMON, "normalize": True, "scope": "tensor"},
    "dare_linear": {**_COMMON, "normalize": False, "rescale": True, "rescale_mode": "l1"},
    "dare_ties": {**_COMMON, "normalize": False, "rescale": True, "rescale_mode": "l1"},
    "breadcrumbs": {**_COMMON, "normalize": False, "gamma": 0.01, "scope": "tensor"},
    "breadcrumbs_ties": {**_COMMON, "normalize": False, "gamma": 0.01, "scope": "tensor"},
    "della": {**_COMMON, "normalize": True, "rescale": True, "epsilon": 0.15},
    "della_linear": {**_COMMON, "normalize": False, "rescale": True, "epsilon": 0.15},
    "pcb": {"weight": 1.0, "density": 0.1, "clip_ratio": 0.0001, "scope": "global"},
    "model_stock": {"filter_wise": False},
    "slerp": {"t": None},
    "passthrough": {"scale": 1.0},
    "nearswap": {"t": None},
    "nuslerp": {"weight": 1.0, "nuslerp_flatten": True, "nuslerp_row_wise": False},
    "multislerp": {"weight": 1.0, "normalize_weights": True, "eps": 1e-8},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "sce": {"select_topk": 1.0, "int8_mask": False},
    "arcee_fusion": {},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
}
# methods that use base_model when the recipe gives one (karcher: as one more input)
OPTIONAL_BASE = {"nuslerp", "multislerp", "karcher"}
SPARSE_FAMILY = {
    # method: (sparsify, sign consensus)
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
    "breadcrumbs": ("breadcrumbs", False),
    "breadcrumbs_ties": ("breadcrumbs", True),
    "della": ("della", True),
    "della_linear": ("della", False),
}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: a directory (sharded via its index json, or a single
    model.safetensors) or a .safetensors file."""
    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    index = path / "model.safetensors.index.json"
    if index.exists():
        out: dict[str, torch.Tensor] = {}
        weight_map = json.loads(index.read_text())["weight_map"]
        for shard in sorted(set(weight_map.values())):
            out.update(load_file(str(path / shard)))
        missing = set(weight_map) - set(out)
        assert not missing, f"index lists tensors absent from the shards: {sorted(missing)}"
        return out
    files = sorted(path.glob("*.safetensors"))
    assert len(files) == 1, f"{path}: expected one .safetensors file or an index, got {files}"
    return load_file(str(files[0]))


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    return json.loads(cfg.read_text()) if cfg.exists() else {}


def num_layers(config: dict[str, Any]) -> int:
    for key in ("num_hidden_layers", "n_layer"):
        if key in config:
            return int(config[key])
    return 1


def local_path(ref: str) -> Path:
    s = str(ref).strip()
    if s.startswith("file://"):
        s = s[len("file://") :]
    if not s.startswith(("/", "./", "../", "~")) and s not in (".", ".."):
        raise NotImplementedError(f"the reference merge reads local paths only, got {ref!r}")
    return Path(s).expanduser().resolve()


# ---------------------------------------------------------------------------------------------
# Parameters (mergekit's rules, as docs/recipes.md states them)

_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|$)")


def layer_of(tensor_name: str) -> int | None:
    """The integer after ``.layers.`` or ``.h.`` in the name; None outside the layers."""
    m = _LAYER.search(tensor_name)
    return int(m.group(1)) if m else None


def gradient_t(tensor_name: str, n_layers: int) -> float:
    layer = layer_of(tensor_name)
    if layer is None:
        return 0.0
    if n_layers == 1:
        return 1.0
    return layer / (n_layers - 1)


def _is_filter(x: Any) -> bool:
    return isinstance(x, dict) and "value" in x


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """Value of one setting for a tensor at gradient position t; None if no filter matches."""
    if _is_filter(setting):
        setting = [setting]
    if isinstance(setting, list) and setting and all(_is_filter(s) for s in setting):
        for entry in setting:
            f = entry.get("filter")
            if f is None or f == "*" or f in tensor_name:
                return evaluate(entry["value"], tensor_name, t)
        return None
    if isinstance(setting, list):  # gradient: piecewise-linear at t·(g − 1)
        g = len(setting)
        pos = t * (g - 1)
        i0 = min(math.floor(pos), g - 1)
        i1 = min(i0 + 1, g - 1)
        frac = pos - i0
        return (1 - frac) * float(setting[i0]) + frac * float(setting[i1])
    return setting


def resolve(
    name: str, scopes: list[dict[str, Any] | None], default: Any, tensor_name: str, t: float
) -> Any:
    """First scope (highest precedence first) whose setting gives a value, else the default."""
    for scope in scopes:
        if scope and name in scope:
            v = evaluate(scope[name], tensor_name, t)
            if v is not None:
                return v
    return default


# ---------------------------------------------------------------------------------------------
# Randomness (re-implemented from merging/randomness.py's docstring)


def tensor_seed(seed: int, model_index: int, tensor_name: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{model_index}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def uniform(seed: int, model_index: int, tensor_name: str, shape: torch.Size) -> torch.Tensor:
    g = torch.Generator(device="cpu")
    g.manual_seed(tensor_seed(seed, model_index, tensor_name))
    return torch.rand(shape, generator=g, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Sparsification building blocks (on float32 task vectors)


def ascending_ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry of the last dim in a stable ascending sort (ties: earlier first)."""
    order = torch.sort(x, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1]).expand_as(order).contiguous())
    return ranks


def topk_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the k = max(1, int(density·N)) largest |τ| of the flattened tensor.

    Exactly k entries: |τ| sorted descending with a stable sort, the first k kept, so among
    equal magnitudes at the cut the earlier (flat index) wins, as in mergekit's
    ``argsort(descending=True)[:k]``. Equal nonzero |τ| are common in float32 task vectors
    (τ = θ − θ0 is a multiple of θ0's ulp), so this choice shows in practice.
    """
    k = max(1, int(density * tau.numel()))
    order = torch.sort(tau.abs().flatten(), descending=True, stable=True).indices
    mask = torch.zeros(tau.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(tau.shape)


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float, row: bool) -> torch.Tensor:
    """Keep ascending-|τ| ranks [bottom, bottom + keep) of the flattened tensor or each row."""
    rows = _rows(tau) if row else tau.reshape(1, -1)
    n = rows.shape[1]
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    ranks = ascending_ranks(rows.abs())
    return ((ranks >= bottom) & (ranks < bottom + keep)).reshape(tau.shape)


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p = (density − ε) + 2ε·rn per row (last dim), rn = ascending |τ| rank / (cols − 1)."""
    rows = _rows(tau)
    cols = rows.shape[1]
    ranks = ascending_ranks(rows.abs()).to(F32)
    rn = ranks / (cols - 1) if cols > 1 else torch.zeros_like(ranks)
    p = (density - epsilon) + (2 * epsilon) * rn
    return p.reshape(tau.shape)


def l1_rescale(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Multiply ``kept`` by ‖τ‖1 / ‖kept‖1 (left as is when nothing was kept)."""
    kept_l1 = kept.double().abs().sum()
    if kept_l1 == 0:
        return kept
    return (kept.double() * (tau.double().abs().sum() / kept_l1)).to(kept.dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Rows along the last dim; a 0-D or 1-D tensor is one row."""
    if x.dim() <= 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# The merge


class _Model:
    def __init__(self, ref: str, params: dict[str, Any] | None, index: int | None):
        self.path = local_path(ref)
        self.params = params
        self.index = index  # RNG index among the fine-tuned models; None for the base
        self.sd = load_checkpoint(self.path)


def _output_dtype(recipe: dict[str, Any], fallback: torch.dtype) -> torch.dtype:
    name = (recipe.get("output") or {}).get("dtype") or recipe.get("out_dtype")
    name = name or recipe.get("dtype")
    return _DTYPES[str(name).lower()] if name else fallback


def reference_merge(
    recipe: dict[str, Any] | str, seed: int | None = None
) -> dict[str, torch.Tensor]:
    """Merge per ``recipe`` (a dict or YAML text) in memory; tensor name → output tensor.

    ``seed`` overrides the recipe's ``seed`` (random methods need one or the other).
    """
    if isinstance(recipe, str):
        recipe = yaml.safe_load(recipe)
    assert isinstance(recipe, dict)
    parse_recipe(recipe)  # reject what the schema rejects; everything else read from the dict
    method = recipe["merge_method"]
    if seed is None:
        seed = recipe.get("seed")
    top = recipe.get("parameters") or {}
    defaults = DEFAULTS[method]

    base: _Model | None = None
    fine: list[_Model] = []
    base_path = local_path(recipe["base_model"]) if recipe.get("base_model") else None
    needs_base = method not in ("linear", "passthrough") and (
        method not in OPTIONAL_BASE or base_path is not None
    )
    if needs_base:
        assert base_path is not None
        base = _Model(str(base_path), None, None)
    for entry in recipe.get("models") or []:
        if needs_base and local_path(entry["model"]) == base_path:
            continue  # the base listed among the models is the base, not a fine-tune
        fine.append(_Model(entry["model"], entry.get("parameters"), len(fine)))
    listed = {local_path(e["model"].split("+")[0]) for e in recipe.get("models") or []}
    if base_path is not None and not needs_base and base_path not in listed:
        # mergekit's planner adds an unlisted base_model to every method's inputs: one
        # more model for those that take no base, with only the top-level parameters
        fine.append(_Model(str(base_path), None, len(fine)))

    first = base if base is not None else fine[0]
    n_layers = num_layers(load_config(first.path))

    def shared(name: str, tensor_name: str) -> Any:
        return resolve(name, [top], defaults[name], tensor_name, gradient_t(tensor_name, n_layers))

    def per_model(m: _Model, name: str, tensor_name: str) -> Any:
        t = gradient_t(tensor_name, n_layers)
        return resolve(name, [m.params, top], defaults[name], tensor_name, t)

    names = list(first.sd)
    float_names = sorted(n for n in names if first.sd[n].is_floating_point())

    # Statistics over whole models (scope: global) are computed up front.
    global_masks: dict[tuple[int, str], torch.Tensor] = {}
    if method == "ties" and top.get("scope", defaults["scope"]) == "global":
        global_masks = _ties_global_masks(base, fine, float_names, top, defaults)
    pcb_deltas: dict[str, torch.Tensor] = {}
    if method == "pcb":
        pcb_deltas = _pcb_deltas(base, fine, float_names, top, per_model, defaults)

    out: dict[str, torch.Tensor] = {}
    for name in names:
        ref_t = first.sd[name]
        if not ref_t.is_floating_point():
            out[name] = ref_t.clone()  # non-float tensors are copied from the base
            continue
        inputs = [m for m in fine if name in m.sd]
        if method == "linear":
            merged = _linear(name, inputs, per_model, shared)
        elif method == "task_arithmetic":
            merged = _task_arithmetic(name, base, inputs, per_model, shared)
        elif method in SPARSE_FAMILY:
            merged = _sparse_family(method, name, base, inputs, per_model, shared, seed,
                                    global_masks)  # fmt: skip
        elif method == "pcb":
            merged = base.sd[name].double() + pcb_deltas[name].double()
        elif method == "model_stock":
            merged = _model_stock(base.sd[name], [m.sd[name] for m in inputs],
                                  bool(shared("filter_wise", name)))  # fmt: skip
        elif method == "slerp":
            (other,) = inputs
            merged = slerp(float(shared("t", name)), base.sd[name], other.sd[name])
        elif method == "passthrough":
            (only,) = inputs
            merged = only.sd[name].double() * float(per_model(only, "scale", name))
        elif method == "nearswap":
            (other,) = inputs
            merged = nearswap(float(shared("t", name)), base.sd[name], other.sd[name])
        elif method == "nuslerp":
            merged = _nuslerp(name, base, inputs, per_model, shared)
        elif method == "multislerp":
            w = [float(per_model(m, "weight", name)) for m in inputs]
            merged = multislerp([m.sd[name] for m in inputs], w,
                                base.sd[name] if base is not None else None,
                                bool(shared("normalize_weights", name)),
                                float(shared("eps", name)))  # fmt: skip
        elif method == "karcher":
            points = [m.sd[name] for m in inputs] + ([base.sd[name]] if base else [])
            merged = karcher(points, int(shared("max_iter", name)), float(shared("tol", name)))
        elif method == "sce":
            merged = sce(base.sd[name], [m.sd[name] for m in inputs],
                         float(shared("select_topk", name)))  # fmt: skip
        elif method == "arcee_fusion":
            (other,) = inputs
            merged = arcee_fusion(base.sd[name], other.sd[name])
        elif method in ("ram", "ramplus_tl"):
            plus = None
            if method == "ramplus_tl":
                plus = (float(shared("r", name)), float(shared("alpha", name)))
            merged = ram(base.sd[name], [m.sd[name] for m in inputs],
                         float(shared("epsilon", name)), plus)  # fmt: skip
        else:
            raise NotImplementedError(method)
        out[name] = merged.to(_output_dtype(recipe, ref_t.dtype))
    return out


def _linear(name, inputs, per_model, shared) -> torch.Tensor:
    weights = [float(per_model(m, "weight", name)) for m in inputs]
    total = sum(w * m.sd[name].double() for w, m in zip(weights, inputs, strict=True))
    if shared("normalize", name):
        div = sum(weights)
        total = total / (div if div != 0 else 1.0)
    return total


def _task_arithmetic(name, base, inputs, per_model, shared) -> torch.Tensor:
    theta0 = base.sd[name]
    weights = [float(per_model(m, "weight", name)) for m in inputs]
    mixed = sum(
        w * (m.sd[name].to(F32) - theta0.to(F32)).double()
        for w, m in zip(weights, inputs, strict=True)
    )
    if shared("normalize", name):
        div = sum(weights)
        mixed = mixed / (div if div != 0 else 1.0)
    return theta0.double() + float(shared("lambda", name)) * mixed


def _sparse_family(method, name, base, inputs, per_model, shared, seed, global_masks):
    sparsify, consensus = SPARSE_FAMILY[method]
    theta0 = base.sd[name].to(F32)
    rescale = bool(shared("rescale", name))
    deltas: list[torch.Tensor] = []  # D_i = w_i·τ_i' (float32)
    weights: list[float] = []
    for m in inputs:
        tau = m.sd[name].to(F32) - theta0
        w = float(per_model(m, "weight", name))
        density = float(per_model(m, "density", name))
        if sparsify == "magnitude":
            mask = global_masks.get((m.index, name))
            if mask is None:
                mask = topk_mask(tau, density)
            kept = tau * mask
            if rescale:
                kept = l1_rescale(tau, kept)
        elif sparsify == "random":
            assert seed is not None, "DARE needs a seed"
            u = uniform(seed, m.index, name, tau.shape)
            kept = tau * (u < density)
            if rescale:
                if shared("rescale_mode", name) == "inverse_p":
                    kept = kept / density if density > 0 else kept
                else:
                    kept = l1_rescale(tau, kept)
        elif sparsify == "breadcrumbs":
            gamma = float(per_model(m, "gamma", name))
            row = shared("scope", name) == "row"
            kept = tau * breadcrumbs_mask(tau, density, gamma, row)
        elif sparsify == "della":
            assert seed is not None, "DELLA needs a seed"
            eps = float(per_model(m, "epsilon", name))
            p = della_probabilities(tau, density, eps)
            u = uniform(seed, m.index, name, tau.shape)
            kept = tau * (u < p)
            if rescale:
                kept = l1_rescale(tau, kept)
        else:
            raise NotImplementedError(sparsify)
        deltas.append(w * kept)
        weights.append(w)

    if consensus:
        total = deltas[0].clone()
        for d in deltas[1:]:
            total = total + d  # float32, in model order
        s = torch.where(total >= 0, 1.0, -1.0)  # sign of the sum, 0 counted as +
        masks = [torch.sign(d) == s for d in deltas]  # zeros never match
        mixed = sum(mk.double() * d.double() for mk, d in zip(masks, deltas, strict=True))
        divisor = sum(mk.double() * w for mk, w in zip(masks, weights, strict=True))
    else:
        mixed = sum(d.double() for d in deltas)
        divisor = torch.tensor(float(sum(weights)), dtype=F64)
    if shared("normalize", name):
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    return theta0.double() + float(shared("lambda", name)) * mixed


def _ties_global_masks(base, fine, float_names, top, defaults):
    """scope: global — top density fraction of |τ| over all float tensors of each model.

    docs/merge-methods.md: each model's exact k-th largest |τ| over all its parameters
    (k = max(1, int(density·N)) over the N float entries of the model), keeping |τ| ≥ that
    value, as the TIES paper's code does:
    entries equal to the k-th value are all kept (so more than k when there are ties at the
    cut; per tensor scope keeps exactly k instead, see topk_mask).
    """
    masks: dict[tuple[int, str], torch.Tensor] = {}
    for m in fine:
        density = resolve("density", [m.params, top], defaults["density"], "", 0.0)
        for scope in (m.params, top):
            if scope and "density" in scope and not isinstance(scope["density"], int | float):
                raise NotImplementedError("scope: global needs one density per model")
        names = [n for n in float_names if n in m.sd]
        taus = [(m.sd[n].to(F32) - base.sd[n].to(F32)).flatten() for n in names]
        flat = torch.cat(taus).abs()
        k = max(1, int(float(density) * flat.numel()))
        kth = torch.sort(flat, descending=True).values[k - 1]
        mask = flat >= kth
        offset = 0
        for n, t in zip(names, taus, strict=True):
            masks[(m.index, n)] = mask[offset : offset + t.numel()].reshape(m.sd[n].shape)
            offset += t.numel()
    return masks


# ---------------------------------------------------------------------------------------------
# PCB


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """(X − min) / (max − min) per row; 0 where max == min."""
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


def pcb_delta(T: torch.Tensor, lam: torch.Tensor, density: float, clip: float) -> torch.Tensor:
    """The steps of docs/merge-methods.md ("PCB") on an n×d float32 matrix of task vectors;
    the merged delta.

    ``lam`` is λ, broadcastable to T (n×1 or n×d).
    """
    T = T.to(F32)
    n, d = T.shape
    # 1. clip |T| per row to [lo, hi]
    srt = T.abs().sort(dim=1).values
    lo = srt[:, int(d * clip)].unsqueeze(1)
    hi = srt[:, int(d * (1 - clip)) - 1].unsqueeze(1)
    A = torch.clamp(T.abs(), min=lo, max=hi)
    Tc = torch.sign(T) * A
    # 2.-3. intra-balancing: exp(n·normalize(A)²), written exp(n·(x² − 1))
    x = _normalize_rows(A)
    intra = torch.exp(n * (x * x - 1))
    # 4. inter-balancing on the raw T
    inter = torch.tanh(T * T.sum(dim=0))
    # 5. drop below the (1 − r) quantile, then S = normalize(clamp(B, t, max))
    B = intra * inter
    srt_b = B.sort(dim=1).values
    thr = srt_b[:, min(int(d * (1 - density)), d - 1)].unsqueeze(1)
    top = srt_b[:, -1:]
    S = _normalize_rows(torch.clamp(B, min=thr, max=top))  # entries ≤ t get 0
    # 6. weighted by S, normalised by Σ S
    return (lam * Tc * S).sum(dim=0) / torch.clamp(S.sum(dim=0), min=1e-12)


def _pcb_deltas(base, fine, float_names, top, per_model, defaults) -> dict[str, torch.Tensor]:
    density = float(top.get("density", defaults["density"]))
    clip = float(top.get("clip_ratio", defaults["clip_ratio"]))
    scope = top.get("scope", defaults["scope"])
    out: dict[str, torch.Tensor] = {}
    n = len(fine)

    def tau(m: _Model, name: str) -> torch.Tensor:
        return (m.sd[name].to(F32) - base.sd[name].to(F32)).flatten()

    def lam(name: str) -> torch.Tensor:
        return torch.tensor([float(per_model(m, "weight", name)) for m in fine], dtype=F32)

    if scope == "tensor":
        for name in float_names:
            T = torch.stack([tau(m, name) for m in fine])
            delta = pcb_delta(T, lam(name).reshape(n, 1), density, clip)
            out[name] = delta.reshape(base.sd[name].shape)
        return out
    # global: one n×d matrix over all float tensors, keys sorted by name
    T = torch.stack([torch.cat([tau(m, name) for name in float_names]) for m in fine])
    L = torch.cat([lam(name).reshape(n, 1).expand(n, base.sd[name].numel())
                   for name in float_names], dim=1)  # fmt: skip
    delta = pcb_delta(T, L, density, clip)
    offset = 0
    for name in float_names:
        k = base.sd[name].numel()
        out[name] = delta[offset : offset + k].reshape(base.sd[name].shape)
        offset += k
    return out


# ---------------------------------------------------------------------------------------------
# Model Stock and SLERP


def model_stock_t(taus: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """t per row (filter_wise) or for the whole tensor, shape (rows, 1) or (1, 1)."""
    rows = [(_rows(t) if filter_wise else t.reshape(1, -1)).double() for t in taus]
    k = len(rows)
    cos_sum = torch.zeros(rows[0].shape[0], 1, dtype=F64)
    pairs = 0
    for i in range(k):
        for j in range(i + 1, k):
            a, b = rows[i], rows[j]
            na = a.norm(dim=1, keepdim=True)
            nb = b.norm(dim=1, keepdim=True)
            ok = (na > 0) & (nb > 0)
            dot = (a * b).sum(dim=1, keepdim=True)
            cos_sum += torch.where(ok, dot / torch.where(ok, na * nb, 1.0), 0.0)
            pairs += 1
    cos = cos_sum / pairs
    den = (k - 1) * cos + 1
    all_zero = torch.stack([r.abs().sum(dim=1, keepdim=True) for r in rows]).sum(0) == 0
    singular = den.abs() < 1e-6
    t = torch.where(singular | all_zero, 0.0, k * cos / torch.where(singular, 1.0, den))
    return t.clamp(0.0, 1.0)


def _model_stock(theta0: torch.Tensor, thetas: list[torch.Tensor], filter_wise: bool):
    base = theta0.to(F32)
    taus = [th.to(F32) - base for th in thetas]
    t = model_stock_t(taus, filter_wise)
    mean = sum(th.double() for th in thetas) / len(thetas)
    shape = theta0.shape
    out = t * _rows(mean) if filter_wise else t.reshape(()) * mean.reshape(1, -1)
    rest = (1 - t) * (_rows(base.double()) if filter_wise else base.double().reshape(1, -1))
    return (out + rest).reshape(shape)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors; lerp when |cos| > 0.9995.

    A zero-norm vector has cos 0 with anything (mergekit leaves it unnormalised).
    """
    a = v0.double().flatten()
    b = v1.double().flatten()
    na, nb = a.norm(), b.norm()
    cos = float((a @ b) / (na * nb)) if na > 0 and nb > 0 else 0.0
    if abs(cos) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        omega = math.acos(max(-1.0, min(1.0, cos)))
        s = math.sin(omega)
        out = (math.sin((1 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b
    return out.reshape(v0.shape)


# ---------------------------------------------------------------------------------------------
# The methods of mergekit 0.1.5 beyond the task-vector family, written from their formulas in
# docs/merge-methods.md (float64 mixing; float32 for the discrete decisions)


def nearswap(t: float, theta0: torch.Tensor, theta1: torch.Tensor) -> torch.Tensor:
    """w = clamp(t / max(|θ1 − θ0|, 1e-6), 0, 1); w·θ1 + (1 − w)·θ0."""
    a, b = theta0.double(), theta1.double()
    w = (t / (b - a).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


def _nuslerp_pair(t: float, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """slerp of the rows of two 2-D float64 matrices, unnormalised vectors interpolated."""
    n1 = v1.norm(dim=1, keepdim=True).clamp(min=1e-7)
    n2 = v2.norm(dim=1, keepdim=True).clamp(min=1e-7)
    cos = ((v1 / n1) * (v2 / n2)).sum(dim=1, keepdim=True).clamp(-1, 1)
    out = torch.empty_like(v1)
    for i in range(v1.shape[0]):
        c = float(cos[i])
        if 1 - c * c <= 1e-16:
            out[i] = (1 - t) * v1[i] + t * v2[i]
        else:
            om = math.acos(c)
            s = math.sin(om)
            out[i] = (math.sin((1 - t) * om) / s) * v1[i] + (math.sin(t * om) / s) * v2[i]
    return out


def _nuslerp(name, base, inputs, per_model, shared) -> torch.Tensor:
    m1, m2 = inputs
    w1, w2 = float(per_model(m1, "weight", name)), float(per_model(m2, "weight", name))
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    th0 = base.sd[name].to(F32) if base is not None else None
    # task vectors in float32 (the description's rule), the rest in float64
    v1, v2 = (m.sd[name].to(F32) - th0 if th0 is not None else m.sd[name] for m in inputs)
    v1, v2 = v1.double(), v2.double()
    shape = v1.shape
    if shared("nuslerp_flatten", name) or v1.dim() <= 1:
        out = _nuslerp_pair(t, v1.reshape(1, -1), v2.reshape(1, -1)).reshape(shape)
    elif shared("nuslerp_row_wise", name):  # vectors along the first dimension
        a = v1.movedim(0, -1)
        b = v2.movedim(0, -1)
        rows = _nuslerp_pair(t, a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
        out = rows.reshape(a.shape).movedim(-1, 0)
    else:
        out = _nuslerp_pair(t, _rows(v1), _rows(v2)).reshape(shape)
    return out + th0.double() if th0 is not None else out


def multislerp(
    thetas: list[torch.Tensor],
    weights: list[float],
    theta0: torch.Tensor | None,
    normalize_weights: bool,
    eps: float,
) -> torch.Tensor:
    """Weighted mean direction, tangent-space interpolation, exponential map, mean norm."""
    if len(thetas) == 1:
        return thetas[0].double()
    shape = thetas[0].shape
    if theta0 is not None:
        vs = [(th.to(F32) - theta0.to(F32)).double().flatten() for th in thetas]
    else:
        vs = [th.double().flatten() for th in thetas]
    w = [wi / sum(weights) for wi in weights] if normalize_weights else list(weights)
    norms = [float(v.norm()) for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    if float(mean.norm()) < eps:
        assert len(vs) == 2, "multislerp refuses antipodal models beyond two"
        out = w[0] * vs[0] + w[1] * vs[1]
    else:
        mean = mean / mean.norm()
        tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units, strict=True))
        g = float(tangent.norm()) + eps
        out = math.cos(g) * mean + (math.sin(g) / g) * tangent
        out = out * sum(wi * n for wi, n in zip(w, norms, strict=True))
    out = out.reshape(shape)
    return out + theta0.double() if theta0 is not None else out


def karcher(points: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """(Σ ‖θi‖ / N)·m, m the Karcher mean of the directions θi/‖θi‖, in float64."""
    shape = points[0].shape
    if len(points) == 1:
        return points[0].double()
    xs = [p.double().flatten() for p in points]
    alpha = 1.0 / len(xs)
    norms = [float(x.norm()) for x in xs]
    valid = [(x / n) for x, n in zip(xs, norms, strict=True) if n > tol]
    if not valid:
        return torch.zeros(shape, dtype=F64)
    a = 1.0 / len(valid)  # equal weights renormalised over the valid inputs
    mean = sum(a * u for u in valid)
    mean = valid[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        g = torch.zeros_like(mean)
        for u in valid:
            c = max(-1.0, min(1.0, float(mean @ u)))
            om = math.acos(c)
            if om < tol:
                continue
            g = g + a * (om / math.sin(om)) * (u - c * mean)
        gn = float(g.norm())
        if gn < tol:
            break
        mean = math.cos(gn) * mean + math.sin(gn) * (g / gn)
        if float(mean.norm()) > tol:
            mean = mean / mean.norm()
    return (sum(alpha * n for n in norms) * mean).reshape(shape)


def sce(theta0: torch.Tensor, thetas: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """Select (variance top-k), Calculate (mean-square weights), Erase (sign election)."""
    base = theta0.to(F32)
    taus = [th.to(F32) - base for th in thetas]  # float32: they decide the masks
    n = len(taus)
    if select_topk < 1:
        var = torch.stack(taus).var(dim=0, unbiased=False)  # float32, as it decides the mask
        k = int(float(torch.tensor(int((var != 0).sum()), dtype=F32) * select_topk))
        # exactly the k largest variances, the earlier index first among equals
        order = torch.sort(var.flatten(), descending=True, stable=True).indices
        keep = torch.zeros(var.numel(), dtype=torch.bool)
        if select_topk > 0:
            keep[order[:k]] = True
        keep = keep.reshape(var.shape)
        taus = [t * keep for t in taus]
    ms = [float(t.double().pow(2).mean()) for t in taus]
    total = sum(ms)
    w = [1.0 / n] * n if abs(total) < 1e-6 else [m / total for m in ms]
    s = torch.where(sum(t.double() for t in taus) >= 0, 1.0, -1.0)
    agree = [torch.sign(t) == s for t in taus]
    num = sum(wi * mk.double() * t.double() for wi, mk, t in zip(w, agree, taus, strict=True))
    den = sum(wi * mk.double() for wi, mk in zip(w, agree, strict=True))
    return base.double() + num / den.clamp(min=1e-6)


def arcee_fusion(theta0: torch.Tensor, theta1: torch.Tensor) -> torch.Tensor:
    """θ0 + τ·[I ≥ Q2 + 1.5·(Q3 − Q1)], I = |τ|·KL(softmax θ1 ‖ softmax θ0) per row (float32,
    the decision)."""
    a, b = theta0.to(F32), theta1.to(F32)
    ra, rb = _rows(a), _rows(b)  # rows along the last dim; a 1-D tensor is one row
    p = torch.softmax(rb, dim=1) + 1e-8
    q = torch.softmax(ra, dim=1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=1, keepdim=True)
    scores = ((rb - ra).abs() * kl).flatten()
    srt = scores.sort().values
    n = scores.numel()
    q1, q2, q3 = (srt[int(float(torch.tensor(q, dtype=F32) * (n - 1)))] for q in (0.25, 0.5, 0.75))
    keep = (scores >= q2 + 1.5 * (q3 - q1)).reshape(a.shape)
    return a.double() + (b.double() - a.double()) * keep


def ram(
    theta0: torch.Tensor,
    thetas: list[torch.Tensor],
    epsilon: float,
    plus: tuple[float, float] | None,
) -> torch.Tensor:
    """θ0 + Σ mi·τi·(λi·[c = 1] + [c > 1]/c); λi = 1 for RAM, 1 + r·clamp(Si/max(Ui, ε), 0, α)
    for RAM+ (tensor-local), ``plus`` = (r, α)."""
    base = theta0.to(F32)
    taus = [th.to(F32) - base for th in thetas]
    masks = [t.abs() > epsilon for t in taus]
    c = sum(m.long() for m in masks)
    lams = [1.0] * len(taus)
    if plus is not None:
        r, alpha = plus
        for i, m in enumerate(masks):
            shared_i = int((m & (c > 1)).sum())
            unique_i = int((m & (c == 1)).sum())
            rho = shared_i / max(unique_i, epsilon)
            lams[i] = 1 + r * min(max(rho, 0.0), alpha)
    out = base.double().clone()
    for t, m, lam in zip(taus, masks, lams, strict=True):
        d = t.double() * m
        out += torch.where(c > 1, d / c.clamp(min=1), d * lam)
    return out
