"""A recipe's parameters resolved for one tensor (mergekit's precedence and gradients).

Precedence, highest first: the model's own ``parameters``, the top level's, the method's
default; a gradient list is read at the tensor's layer (schemas/recipe.py resolves one
setting; this applies it to every parameter the method declares).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from merging.method import MergeMethod
from merging.parameters import FLOAT32_MAX, ParamScope
from schemas.recipe import MergeRecipe, layer_position, resolve_parameter
from workers.merge.inputs import InputModel
from workers.merge.plan import layer_of

if TYPE_CHECKING:
    from workers.merge.slices import SliceLayout


class ParameterResolver:
    """Parameters per tensor. With slices (``layout``), a slice's ``parameters`` come
    between a source's and the top level's, gradients run over the slice's layers, and a
    source's filters match its own tensor names (mergekit's resolution)."""

    def __init__(
        self, recipe: MergeRecipe, num_layers: int, layout: SliceLayout | None = None
    ) -> None:
        self.recipe = recipe
        self.method: MergeMethod = recipe.method
        self.num_layers = num_layers
        self.layout = layout

    def _t(self, name: str) -> float:
        if self.layout is not None:
            return self.layout.t(name)
        return layer_position(layer_of(name), self.num_layers)

    def _shared_scopes(self, name: str) -> list[Any]:
        if self.layout is None:
            return [self.recipe.parameters]
        return [self.layout.slice_parameters(name), self.recipe.parameters]

    def shared(self, name: str) -> dict[str, Any]:
        """The shared parameters for tensor ``name``."""
        t, scopes = self._t(name), self._shared_scopes(name)
        return {
            p.name: resolve_parameter(p, scopes, name, t)
            for p in self.method.parameters
            if p.scope is ParamScope.SHARED
        }

    def for_model(self, m: InputModel, name: str) -> dict[str, Any]:
        """Model ``m``'s own parameters for tensor ``name``."""
        t, scopes = self._t(name), [m.entry_params, *self._shared_scopes(name)]
        own = m.source_name(name)
        return {
            p.name: resolve_parameter(p, scopes, own, t)
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
