"""Parameters a method declares: name, type, default, where a recipe may set them, range.

A method lists its :class:`ParameterSpec` objects next to its math; the recipe schema
(schemas/recipe.py) validates every setting against them without torch. The parameters
several methods share (a model's ``weight``, ``density``, ``lambda``, ``normalize``, ...)
are declared once here. Defaults follow mergekit 0.1.5 where the method exists there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32, (2 − 2⁻²³)·2¹²⁷: every merge computes in float32."""


class ParamScope(StrEnum):
    MODEL = "model"  # may differ per input model (weight, density, ...)
    SHARED = "shared"  # one value for the merge of a tensor (lambda, normalize, scope, ...)


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    kind: type  # float, bool or str
    default: Any  # None: required (the method's recipe rules say so)
    scope: ParamScope
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    # per-layer gradients and {filter, value} lists are allowed unless the value must be
    # the same for the whole model (global statistics, variant switches)
    per_tensor: bool = True
    integer: bool = False  # a whole number (an iteration count), given as an int or x.0

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
        if self.integer and not v.is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        if self.minimum is not None and v < self.minimum:
            raise ValueError(f"must be ≥ {self.minimum:g}, got {v:g}")
        if self.maximum is not None and v > self.maximum:
            raise ValueError(f"must be ≤ {self.maximum:g}, got {v:g}")
        return v


# ---- parameters several methods share ---------------------------------------------------------


def weight(doc: str = "weight of this model's contribution") -> ParameterSpec:
    return ParameterSpec("weight", float, 1.0, ParamScope.MODEL, doc)


def density(default: float = 1.0) -> ParameterSpec:
    return ParameterSpec(
        "density",
        float,
        default,
        ParamScope.MODEL,
        "fraction of entries kept",
        minimum=0.0,
        maximum=1.0,
    )


LAMBDA = ParameterSpec("lambda", float, 1.0, ParamScope.SHARED, "scale of the merged delta")
INT8_MASK = ParameterSpec(
    "int8_mask",
    bool,
    False,
    ParamScope.SHARED,
    "accepted for mergekit compatibility; masks are always compact here",
)


def normalize(default: bool) -> ParameterSpec:
    return ParameterSpec(
        "normalize", bool, default, ParamScope.SHARED, "divide by the sum of weights"
    )


def rescale(default: bool) -> ParameterSpec:
    return ParameterSpec(
        "rescale",
        bool,
        default,
        ParamScope.SHARED,
        "rescale the kept entries to the task vector's L1 norm",
    )
