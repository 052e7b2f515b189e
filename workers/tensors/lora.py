"""A base checkpoint with a PEFT LoRA adapter applied, read one tensor at a time.

``BASE+ADAPTER`` in a recipe names a checkpoint and a PEFT LoRA adapter folder
(``adapter_config.json`` and ``adapter_model.safetensors``). :class:`LoraCheckpointReader`
reads it like any checkpoint: each tensor an adapter module targets comes back as

    W' = W + ΔW,   ΔW = s · B·A   (Hu et al. 2021, "LoRA", eq. 3)

with ``s = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``, Kalajdzievski 2023),
``r`` and ``lora_alpha`` taken from ``rank_pattern``/``alpha_pattern`` where a pattern
matches the module. ΔW is transposed where the base stores the weight as (in, out):
``fan_in_fan_out`` (GPT-2's Conv1D) and embeddings (``lora_embedding_A``/``_B``). This is
what PEFT's ``merge_and_unload`` computes (peft/tuners/lora/layer.py, ``get_delta_weight``),
in float32, rounded once to the base tensor's dtype; no merged copy is ever written.
Tensors of ``modules_to_save`` (and an embedding's saved ``base_layer``) replace the base's.

Every adapter tensor is checked when the reader opens: its key, its module's place in the
base, the shapes of A, B and ΔW against the base tensor and the rank; errors name the
adapter, the module or tensor, and what would be valid.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from workers.errors import CheckpointError
from workers.tensors.reader import CheckpointReader
from workers.tensors.safetensors_format import TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT saves the adapter's keys relative to PeftModel: base_model (LoraModel).model (the model)
KEY_PREFIX = "base_model.model."
_LINEAR = (".lora_A.weight", ".lora_B.weight")
_EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")
TILE_ELEMENTS = 1 << 16  # ΔW is computed in tiles of about this many elements


class AdapterError(CheckpointError):
    """A LoRA adapter that cannot be applied to its base (config, keys, shapes)."""


@dataclass(frozen=True)
class LoraConfig:
    """The fields of a PEFT ``adapter_config.json`` that decide ΔW."""

    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    target_modules: tuple[str, ...] | str | None
    modules_to_save: tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """(r, s) for ``module``: the first pattern key that matches it as PEFT matches them
        (``re.match(rf"(.*\\.)?({key})$", module)``: the key is a suffix after a dot)."""
        r = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return int(r), float(alpha) / (math.sqrt(r) if self.use_rslora else r)

    def targets(self, module: str) -> bool:
        """Whether ``module`` is one of ``target_modules`` as PEFT decides it: a string is a
        regex matching the whole name, a list names modules or their final components."""
        t = self.target_modules
        if t is None:
            return False
        if isinstance(t, str):
            return re.fullmatch(t, module) is not None
        return any(module == k or module.endswith(f".{k}") for k in t)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_lora_config(folder: Path, label: str) -> LoraConfig:
    """``adapter_config.json`` of a PEFT LoRA adapter; AdapterError naming the field."""

    def bad(message: str, field: str | None = None) -> AdapterError:
        where = f"{field}: " if field else ""
        return AdapterError(where + message, model=label, file=ADAPTER_CONFIG)

    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise bad(
            f"the adapter has no {ADAPTER_CONFIG}: a PEFT LoRA adapter folder holds "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (as PeftModel.save_pretrained writes them)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"cannot be read as JSON: {e}") from None
    if not isinstance(raw, dict):
        raise bad("must be a JSON object")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise bad(f"{peft_type!r} adapters cannot be applied; only LORA is supported", "peft_type")
    for flag, what in (
        ("use_dora", "DoRA"),
        ("lora_bias", "a bias on lora_B"),
        ("use_qalora", "QALoRA"),
    ):
        if raw.get(flag):
            raise bad(f"{what} is not supported; only plain LoRA (ΔW = s·B·A)", flag)
    if raw.get("layer_replication"):
        raise bad("adapters that replicate layers are not supported", "layer_replication")
    if raw.get("target_parameters"):
        raise bad("LoRA on parameters (not modules) is not supported", "target_parameters")
    r = raw.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise bad(f"must be a positive integer, got {r!r}", "r")
    alpha = raw.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise bad(f"must be a number, got {alpha!r}", "lora_alpha")
    flags = {}
    for name in ("use_rslora", "fan_in_fan_out"):
        value = raw.get(name, False)
        if not isinstance(value, bool):
            raise bad(f"must be true or false, got {value!r}", name)
        flags[name] = value
    target = raw.get("target_modules")
    if isinstance(target, list):
        if not all(isinstance(t, str) and t for t in target):
            raise bad("must be a regex string or a list of module names", "target_modules")
        target = tuple(target)
    elif isinstance(target, str):
        _compile(target, bad, "target_modules")
    elif target is not None:
        raise bad("must be a regex string or a list of module names", "target_modules")
    to_save = raw.get("modules_to_save") or []
    if not isinstance(to_save, list) or not all(isinstance(m, str) and m for m in to_save):
        raise bad("must be a list of module names", "modules_to_save")
    patterns: dict[str, dict[str, Any]] = {}
    for name, check, want in (
        ("rank_pattern", _is_int, "a positive integer"),
        ("alpha_pattern", _is_number, "a number"),
    ):
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise bad("must map module patterns to values", name)
        for key, v in value.items():
            _compile(rf"(.*\.)?({key})$", bad, f"{name}.{key}")
            if not check(v) or (name == "rank_pattern" and v <= 0):
                raise bad(f"must be {want}, got {v!r}", f"{name}.{key}")
        patterns[name] = value
    return LoraConfig(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=flags["use_rslora"],
        fan_in_fan_out=flags["fan_in_fan_out"],
        target_modules=target,
        modules_to_save=tuple(to_save),
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
    )


def _compile(pattern: str, bad: Any, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise bad(f"{pattern!r} is not a valid regular expression: {e}", field) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class LoraModule:
    """One module the adapter changes: base tensor ``target`` += ``scale``·B·A (transposed
    where ``transpose``)."""

    module: str
    target: str
    a: str  # adapter tensor keys
    b: str
    rank: int
    scale: float
    transpose: bool

    def delta_shape(self, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int]:
        out, inp = b[0], a[1]
        return (inp, out) if self.transpose else (out, inp)


class LoraCheckpointReader:
    """``base`` with the adapter in ``adapter_dir`` applied: the tensor names, shapes and
    dtypes of the base; ``read``/``read_into`` return W + ΔW for the targeted tensors and
    the adapter's own tensor for the replaced ones. Closing it closes ``base``."""

    def __init__(self, base: CheckpointReader, adapter_dir: Path, *, label: str) -> None:
        self.base = base
        self.path = base.path
        self.label = label
        self.metadata = base.metadata
        self.names: list[str] = base.names
        self.config = read_lora_config(adapter_dir, label)
        weights = adapter_dir / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise AdapterError(
                f"the adapter has no {ADAPTER_WEIGHTS} (found: "
                f"{', '.join(sorted(p.name for p in adapter_dir.iterdir())[:8]) or 'nothing'}); "
                "save it with PeftModel.save_pretrained(..., safe_serialization=True)",
                model=label,
            )
        self.adapter = CheckpointReader(weights, label=label)
        try:
            self.modules, self.replaced = self._map_adapter()
        except BaseException:
            self.adapter.close()
            raise

    # -- what the adapter changes ----------------------------------------------------------

    def _error(self, message: str, tensor: str | None = None) -> AdapterError:
        return AdapterError(message, model=self.label, file=ADAPTER_WEIGHTS, tensor=tensor)

    def _base_tensor(self, name: str, key: str, what: str) -> TensorInfo:
        if name in self.base:
            return self.base.info(name)
        close = difflib.get_close_matches(name, self.base.names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise self._error(
            f"{what} {name!r}, which the base model does not have{hint} (the adapter was "
            "trained for another architecture, or its keys do not follow PEFT's "
            f"'{KEY_PREFIX}<module>' form)",
            tensor=key,
        )

    def _map_adapter(self) -> tuple[dict[str, LoraModule], dict[str, str]]:
        """{base tensor: module} and {base tensor: adapter key replacing it}, checked."""
        pairs: dict[str, dict[str, str]] = {}  # module -> {"A"/"B": key}, with its kind
        kinds: dict[str, bool] = {}  # module -> is an embedding
        replaced: dict[str, str] = {}
        for key in self.adapter.names:
            if not key.startswith(KEY_PREFIX):
                raise self._error(
                    f"is not a PEFT adapter key: PEFT saves '{KEY_PREFIX}<module>.lora_A.weight'"
                    f", '…lora_B.weight' and the tensors of modules_to_save as "
                    f"'{KEY_PREFIX}<module>.<name>'",
                    tensor=key,
                )
            rest = key[len(KEY_PREFIX) :]
            for suffixes, embedding in ((_LINEAR, False), (_EMBEDDING, True)):
                side = next((s for s in suffixes if rest.endswith(s)), None)
                if side is not None:
                    module = rest[: -len(side)]
                    pairs.setdefault(module, {})["AB"[suffixes.index(side)]] = key
                    kinds[module] = embedding
                    break
            else:
                if ".lora_" in f".{rest}":
                    raise self._error(
                        "is not a tensor of plain LoRA (lora_A/lora_B weights, "
                        "lora_embedding_A/B); DoRA, biases on lora_B and other variants are "
                        "not supported",
                        tensor=key,
                    )
                # modules_to_save, or an embedding's base layer saved with the adapter
                name = rest.replace(".base_layer.", ".")
                info = self._base_tensor(name, key, "replaces")
                got = self.adapter.info(key)
                if got.shape != info.shape:
                    raise self._error(
                        f"has shape {got.shape} but replaces {name!r} of shape {info.shape}",
                        tensor=key,
                    )
                replaced[name] = key
        modules: dict[str, LoraModule] = {}
        for module, found in pairs.items():
            missing = [s for s in "AB" if s not in found]
            if missing:
                have = next(iter(found.values()))
                raise self._error(
                    f"module {module!r} has lora_{'AB'.replace(missing[0], '')} but no "
                    f"lora_{missing[0]}; a LoRA module needs both",
                    tensor=have,
                )
            if not self.config.targets(module):
                raise self._error(
                    f"module {module!r} is not one of the adapter's target_modules "
                    f"({self.config.target_modules!r}); the adapter and its "
                    f"{ADAPTER_CONFIG} disagree",
                    tensor=found["A"],
                )
            modules[module] = self._check_module(module, found["A"], found["B"], kinds[module])
        self._check_targets_exist(modules)
        return {m.target: m for m in modules.values()}, replaced

    def _check_module(self, module: str, a_key: str, b_key: str, embedding: bool) -> LoraModule:
        target = f"{module}.weight"
        info = self._base_tensor(target, a_key, f"module {module!r} changes")
        if not info.torch_dtype.is_floating_point:
            raise self._error(f"changes {target!r}, whose dtype {info.dtype} is not float", a_key)
        a, b = self.adapter.info(a_key), self.adapter.info(b_key)
        for t in (a, b):
            if len(t.shape) != 2 or not t.torch_dtype.is_floating_point:
                raise self._error(
                    f"must be a 2-D float matrix (convolution LoRA is not supported), got "
                    f"shape {t.shape} and dtype {t.dtype}",
                    t.name,
                )
        rank, scale = self.config.rank_and_scale(module)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise self._error(
                f"module {module!r}: lora_A is {a.shape} and lora_B is {b.shape}, but its rank "
                f"is {rank} ({'rank_pattern' if rank != self.config.r else 'r'} in "
                f"{ADAPTER_CONFIG}): A must be (r, in) and B (out, r)",
                a_key,
            )
        transpose = embedding or self.config.fan_in_fan_out
        m = LoraModule(module, target, a_key, b_key, rank, scale, transpose)
        delta = m.delta_shape(a.shape, b.shape)
        if delta != info.shape:
            how = (
                "(B·A)ᵀ (an embedding)"
                if embedding
                else "(B·A)ᵀ (fan_in_fan_out: true)"
                if transpose
                else "B·A (fan_in_fan_out: false)"
            )
            raise self._error(
                f"module {module!r}: ΔW = {how} has shape {delta} but the base tensor "
                f"{target!r} has shape {info.shape}",
                b_key,
            )
        return m

    def _check_targets_exist(self, modules: dict[str, LoraModule]) -> None:
        """Each name in a ``target_modules`` list matches a module the base has (PEFT refuses
        an adapter whose targets are missing from the model)."""
        targets = self.config.target_modules
        if not isinstance(targets, tuple):
            return
        have = {n.rsplit(".", 1)[0] for n in self.base.names if "." in n} | set(modules)
        for t in targets:
            if not any(m == t or m.endswith(f".{t}") for m in have):
                raise AdapterError(
                    f"target_modules names {t!r}, which matches no module of the base model "
                    f"(modules look like {sorted(have)[0]!r})",
                    model=self.label,
                    file=ADAPTER_CONFIG,
                )

    # -- the CheckpointReader interface -----------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def changes(self, name: str) -> bool:
        """Whether the adapter changes or replaces tensor ``name``."""
        return name in self.modules or name in self.replaced

    def read(self, name: str) -> torch.Tensor:
        info = self.base.info(name)
        m = self.modules.get(name)
        if name not in self.replaced and m is None:
            return self.base.read(name)
        w = self._stored(name)
        if m is None:
            return w.to(info.torch_dtype)
        return (w.float() + self._delta(m, 0, info.shape[0])).to(info.torch_dtype)

    def _stored(self, name: str) -> torch.Tensor:
        """The tensor ΔW is added to: the adapter's own copy where it saved one (an
        embedding's ``base_layer``, modules_to_save), else the base's."""
        if name in self.replaced:
            return self.adapter.read(self.replaced[name])
        return self.base.read(name)

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        m = self.modules.get(name)
        if name not in self.replaced and m is None:
            return self.base.read_into(name, start, out)
        info = self.base.info(name)
        count = out.numel()
        if name in self.replaced:
            flat = self.adapter.read(self.replaced[name]).reshape(-1)[start : start + count]
            out.view(-1).copy_(flat.to(info.torch_dtype))
            w = flat.float()
        else:
            self.base.read_into(name, start, out)
            w = out.view(-1).float()
        if m is None or count == 0:
            return out
        cols = info.shape[1]
        first, last = start // cols, (start + count - 1) // cols + 1  # the rows it spans
        delta = self._delta(m, first, last).reshape(-1)
        offset = start - first * cols
        out.view(-1).copy_((w + delta[offset : offset + count]).to(info.torch_dtype))
        return out

    def _delta(self, m: LoraModule, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of ΔW = s·B·A (s·(B·A)ᵀ where transposed), in float32.

        ΔW is computed in tiles of rows fixed by the tensor's shape, whatever the rows
        asked for, so a tensor read whole and one read in blocks get the same bits (a
        matrix product's rounding depends on the shapes it is computed in)."""
        a = self.adapter.read(m.a).float()
        b = self.adapter.read(m.b).float()
        rows, cols = (a.shape[1], b.shape[0]) if m.transpose else (b.shape[0], a.shape[1])
        tile = max(1, TILE_ELEMENTS // cols)
        out = torch.empty(last - first, cols, dtype=torch.float32)
        for t0 in range(first - first % tile, last, tile):
            t1 = min(t0 + tile, rows)
            # transposed, W's rows are the columns of B·A
            d = (b @ a[:, t0:t1]).T if m.transpose else b[t0:t1] @ a
            d = d * m.scale
            lo, hi = max(t0, first), min(t1, last)
            out[lo - first : hi - first] = d[lo - t0 : hi - t0]
        return out

    def files(self) -> list[Path]:
        return self.base.files() + self.adapter.files()

    def total_bytes(self) -> int:
        return self.base.total_bytes()

    def close(self) -> None:
        self.adapter.close()
        self.base.close()

    def __enter__(self) -> LoraCheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraCheckpointReader({self.label!r}, {len(self.modules)} modules)"
