"""Declared merge methods: names, inputs they need, parameters with defaults.

This table is the single source of truth for what a recipe may say. The engine in
``workers/merge`` registers one implementation per entry (and checks that the two agree);
the API and the CLI validate recipes against it without importing torch. Defaults follow
mergekit 0.1.5 where the method exists there; paper-faithful variants are opt-in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from schemas.limits import FLOAT32_MAX


class ParamScope(StrEnum):
    MODEL = "model"  # may differ per input model (weight, density, ...)
    SHARED = "shared"  # one value for the merge of a tensor (lambda, normalize, scope, ...)


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    kind: type  # float, bool or str
    default: Any
    scope: ParamScope
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    # per-layer gradients and {filter, value} lists are allowed unless the value must be
    # the same for the whole model (global statistics, variant switches)
    per_tensor: bool = True

    def check(self, value: Any) -> Any:
        """Validate one scalar; return it converted. Raises ValueError saying what is valid."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError(f"expected true or false, got {value!r}")
        if self.kind is str:
            if isinstance(value, str) and value in self.choices:
                return value
            raise ValueError(f"expected one of {', '.join(self.choices)}; got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            v = float(value)
        except OverflowError:  # an int past float64's range
            raise ValueError(
                f"expected a number within ±{FLOAT32_MAX:.4g}, got an integer of "
                f"{int(value).bit_length()} bits"
            ) from None
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {value!r}")
        if abs(v) > FLOAT32_MAX:
            # the merge computes in float32: this factor alone would be infinite there
            raise ValueError(
                f"must lie within ±{FLOAT32_MAX:.4g} (the largest float32, which the merge "
                f"computes in), got {v:g}"
            )
        if self.minimum is not None and v < self.minimum:
            raise ValueError(f"must be ≥ {self.minimum:g}, got {v:g}")
        if self.maximum is not None and v > self.maximum:
            raise ValueError(f"must be ≤ {self.maximum:g}, got {v:g}")
        return v


@dataclass(frozen=True)
class MethodSpec:
    name: str
    title: str
    reference: str
    needs_base: bool
    min_models: int  # fine-tuned (non-base) inputs
    max_models: int | None
    parameters: tuple[ParameterSpec, ...]
    # statistics the method needs over whole models before writing (extra streaming passes)
    global_passes: Callable[[dict[str, Any]], bool] = field(default=lambda _shared: False)

    def parameter(self, name: str) -> ParameterSpec | None:
        return next((p for p in self.parameters if p.name == name), None)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)


def _weight(doc: str = "weight of this model's contribution") -> ParameterSpec:
    return ParameterSpec("weight", float, 1.0, ParamScope.MODEL, doc)


def _density(default: float = 1.0) -> ParameterSpec:
    return ParameterSpec(
        "density",
        float,
        default,
        ParamScope.MODEL,
        "fraction of entries kept",
        minimum=0.0,
        maximum=1.0,
    )


_LAMBDA = ParameterSpec("lambda", float, 1.0, ParamScope.SHARED, "scale of the merged delta")
_INT8_MASK = ParameterSpec(
    "int8_mask",
    bool,
    False,
    ParamScope.SHARED,
    "accepted for mergekit compatibility; masks are always compact here",
)


def _normalize(default: bool) -> ParameterSpec:
    return ParameterSpec(
        "normalize", bool, default, ParamScope.SHARED, "divide by the sum of weights"
    )


def _rescale(default: bool) -> ParameterSpec:
    return ParameterSpec(
        "rescale",
        bool,
        default,
        ParamScope.SHARED,
        "rescale the kept entries to the task vector's L1 norm",
    )


_GAMMA = ParameterSpec(
    "gamma",
    float,
    0.01,
    ParamScope.MODEL,
    "fraction of largest-magnitude entries dropped",
    minimum=0.0,
    maximum=1.0,
)
_EPSILON = ParameterSpec(
    "epsilon",
    float,
    0.15,
    ParamScope.MODEL,
    "spread of DELLA's keep probabilities",
    minimum=0.0,
    maximum=1.0,
)
_RESCALE_MODE = ParameterSpec(
    "rescale_mode",
    str,
    "l1",
    ParamScope.SHARED,
    "l1: match the L1 norm (mergekit); inverse_p: divide by density (DARE paper)",
    choices=("l1", "inverse_p"),
    per_tensor=False,
)


def _task_vector_family(
    name: str,
    title: str,
    reference: str,
    *,
    normalize: bool,
    rescale: bool | None,
    extra: tuple[ParameterSpec, ...] = (),
    sparsifies: bool = True,
) -> MethodSpec:
    params: list[ParameterSpec] = [_weight()]
    if sparsifies:
        params.append(_density())
    params += [_LAMBDA, _normalize(normalize), _INT8_MASK]
    if rescale is not None:
        params.append(_rescale(rescale))
    params.extend(extra)
    return MethodSpec(
        name,
        title,
        reference,
        needs_base=True,
        min_models=1,
        max_models=None,
        parameters=tuple(params),
    )


_TIES_SCOPE = ParameterSpec(
    "scope",
    str,
    "tensor",
    ParamScope.SHARED,
    "tensor: top-k per tensor (mergekit); global: top-k over the whole model (TIES paper)",
    choices=("tensor", "global"),
    per_tensor=False,
)
_BREADCRUMBS_SCOPE = ParameterSpec(
    "scope",
    str,
    "tensor",
    ParamScope.SHARED,
    "tensor: rank the flattened tensor (mergekit); row: rank each row (official code)",
    choices=("tensor", "row"),
    per_tensor=False,
)

METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "linear",
            "Linear (model soup)",
            "https://arxiv.org/abs/2203.05482",
            needs_base=False,
            min_models=1,
            max_models=None,
            parameters=(_weight(), _normalize(True)),
        ),
        _task_vector_family(
            "task_arithmetic",
            "Task Arithmetic",
            "https://arxiv.org/abs/2212.04089",
            normalize=False,
            rescale=None,
            sparsifies=False,
        ),
        MethodSpec(
            "ties",
            "TIES",
            "https://arxiv.org/abs/2306.01708",
            needs_base=True,
            min_models=1,
            max_models=None,
            parameters=(
                _weight(),
                _density(),
                _LAMBDA,
                _normalize(True),
                _INT8_MASK,
                _rescale(False),
                _TIES_SCOPE,
            ),
            global_passes=lambda shared: shared.get("scope") == "global",
        ),
        _task_vector_family(
            "dare_linear",
            "Linear DARE",
            "https://arxiv.org/abs/2311.03099",
            normalize=False,
            rescale=True,
            extra=(_RESCALE_MODE,),
        ),
        _task_vector_family(
            "dare_ties",
            "DARE TIES",
            "https://arxiv.org/abs/2311.03099",
            normalize=False,
            rescale=True,
            extra=(_RESCALE_MODE,),
        ),
        _task_vector_family(
            "breadcrumbs",
            "Model Breadcrumbs",
            "https://arxiv.org/abs/2312.06795",
            normalize=False,
            rescale=None,
            extra=(_GAMMA, _BREADCRUMBS_SCOPE),
        ),
        _task_vector_family(
            "breadcrumbs_ties",
            "Model Breadcrumbs with TIES",
            "https://arxiv.org/abs/2312.06795",
            normalize=False,
            rescale=None,
            extra=(_GAMMA, _BREADCRUMBS_SCOPE),
        ),
        _task_vector_family(
            "della",
            "DELLA",
            "https://arxiv.org/abs/2406.11617",
            normalize=True,
            rescale=True,
            extra=(_EPSILON,),
        ),
        _task_vector_family(
            "della_linear",
            "Linear DELLA",
            "https://arxiv.org/abs/2406.11617",
            normalize=False,
            rescale=True,
            extra=(_EPSILON,),
        ),
        MethodSpec(
            "pcb",
            "PCB (Parameter Competition Balancing)",
            "https://arxiv.org/abs/2410.02396",
            needs_base=True,
            min_models=1,
            max_models=None,
            parameters=(
                _weight("λi: scale of this model's balanced task vector"),
                ParameterSpec(
                    "density",
                    float,
                    0.1,
                    ParamScope.SHARED,
                    "r: fraction of entries kept per model",
                    minimum=0.0,
                    maximum=1.0,
                    per_tensor=False,
                ),
                ParameterSpec(
                    "clip_ratio",
                    float,
                    0.0001,
                    ParamScope.SHARED,
                    "c: fraction clipped at each end of |τ|",
                    minimum=0.0,
                    maximum=0.5,
                    per_tensor=False,
                ),
                ParameterSpec(
                    "scope",
                    str,
                    "global",
                    ParamScope.SHARED,
                    "global: statistics over the whole model (reference); tensor: per tensor",
                    choices=("global", "tensor"),
                    per_tensor=False,
                ),
            ),
            global_passes=lambda shared: shared.get("scope") == "global",
        ),
        MethodSpec(
            "model_stock",
            "Model Stock",
            "https://arxiv.org/abs/2403.19522",
            needs_base=True,
            min_models=2,
            max_models=None,
            parameters=(
                ParameterSpec(
                    "filter_wise",
                    bool,
                    False,
                    ParamScope.SHARED,
                    "compute the interpolation ratio per row",
                ),
            ),
        ),
        MethodSpec(
            "slerp",
            "SLERP",
            "https://en.wikipedia.org/wiki/Slerp",
            needs_base=True,
            min_models=1,
            max_models=1,
            parameters=(
                ParameterSpec(
                    "t",
                    float,
                    None,
                    ParamScope.SHARED,
                    "interpolation factor: 0 gives the base, 1 the other model",
                    minimum=0.0,
                    maximum=1.0,
                ),
            ),
        ),
    )
}


def methods_markdown() -> str:
    """The per-method parameter tables of docs/recipes.md, generated from this table."""
    out: list[str] = []
    for m in METHODS.values():
        if m.max_models is None:
            count = f"{m.min_models} or more"
        elif m.max_models == m.min_models:
            count = f"exactly {m.min_models}"
        else:
            count = f"{m.min_models} to {m.max_models}"
        out += [
            f"### `{m.name}` — {m.title}",
            "",
            f"{m.reference} · base model: {'required' if m.needs_base else 'not used'} · "
            f"fine-tuned models: {count}",
            "",
            "| parameter | where | default | meaning |",
            "|---|---|---|---|",
        ]
        for p in m.parameters:
            if p.default is None:
                default = "required"
            elif isinstance(p.default, bool):
                default = str(p.default).lower()
            elif isinstance(p.default, str):
                default = f"`{p.default}`"
            else:
                default = f"{p.default:g}"
            where = "each model" if p.scope is ParamScope.MODEL else "top level"
            if not p.per_tensor:
                where += ", one value"
            choices = f" (`{'`, `'.join(p.choices)}`)" if p.choices else ""
            out.append(f"| `{p.name}` | {where} | {default} | {p.doc}{choices} |")
        out.append("")
    return "\n".join(out)
