"""A recipe's parameters resolved for one tensor (mergekit's precedence and gradients).

Precedence, highest first: the model's own ``parameters``, the top level's, the method's
default; a gradient list is read at the tensor's layer (schemas/recipe.py resolves one
setting; this applies it to every parameter the method declares).
"""

from __future__ import annotations

from typing import Any

from merging.method import MergeMethod
from merging.parameters import FLOAT32_MAX, ParamScope
from schemas.recipe import MergeRecipe, layer_position, resolve_parameter
from workers.merge.inputs import InputModel
from workers.merge.plan import layer_of


class ParameterResolver:
    def __init__(self, recipe: MergeRecipe, num_layers: int) -> None:
        self.recipe = recipe
        self.method: MergeMethod = recipe.method
        self.num_layers = num_layers

    def _t(self, name: str) -> float:
        return layer_position(layer_of(name), self.num_layers)

    def shared(self, name: str) -> dict[str, Any]:
        """The shared parameters for tensor ``name``."""
        t = self._t(name)
        return {
            p.name: resolve_parameter(p, [self.recipe.parameters], name, t)
            for p in self.method.parameters
            if p.scope is ParamScope.SHARED
        }

    def for_model(self, m: InputModel, name: str) -> dict[str, Any]:
        """Model ``m``'s own parameters for tensor ``name``."""
        t = self._t(name)
        return {
            p.name: resolve_parameter(p, [m.entry_params, self.recipe.parameters], name, t)
            for p in self.method.parameters
            if p.scope is ParamScope.MODEL
        }

    def out_of_range(
        self, name: str, holders: list[InputModel]
    ) -> tuple[str, str | None, float] | None:
        """(recipe field, model or None, value) of the first parameter for tensor ``name``
        that no float32 can hold (|v| > 3.4e38, inf, NaN), or None."""

        def beyond(v: Any) -> bool:
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            return number and not abs(v) <= FLOAT32_MAX

        for m in holders:
            own = m.entry_params or {}
            for key, value in self.for_model(m, name).items():
                if beyond(value):
                    if key in own:  # set on this model's entry
                        return f"{m.role}.parameters.{key}", m.label, float(value)
                    return f"parameters.{key}", None, float(value)  # set recipe-wide
        for key, value in self.shared(name).items():
            if beyond(value):
                return f"parameters.{key}", None, float(value)
        return None
