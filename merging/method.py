"""What a merge method is: its declarations (read without torch) and its per-tensor math.

A method is a :class:`MergeMethod` registered from one module of ``merging/methods/``:

- declarations, read by the API, the CLI and the worker alike to validate a recipe: its
  ``name``, ``title`` and paper (``reference``), whether it needs a base model, how many
  fine-tuned models it takes, its ``parameters``, and any rule of its own over a recipe
  (:meth:`MergeMethod.check_recipe`, e.g. slerp needs ``t``);
- its math, written once for a *block*: the engine hands it the whole tensor as one block,
  or, when :meth:`MergeMethod.whole_tensor` says the math is element-wise, the tensor's
  flattened elements a block at a time, so that memory stays a few blocks whatever the
  tensor size. A method that must look at the whole tensor first (a rank selection)
  overrides :meth:`MergeMethod.merge` and makes its passes over the blocks there;
- optionally, statistics over whole models that the engine gathers in extra streaming
  passes before the merge (:meth:`MergeMethod.whole_model_statistic`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from merging.parameters import ParameterSpec

if TYPE_CHECKING:
    from merging.inputs import Block, TensorInputs
    from merging.lazy_torch import torch
    from merging.statistics import WholeModelStatistic

Location = tuple[str | int, ...]


class RecipeRuleError(ValueError):
    """A recipe that breaks a method's own rule, located at the field to change
    (``("models", 2, "parameters", "density")``): the recipe schema reports it there."""

    def __init__(self, location: Location, message: str) -> None:
        super().__init__(message)
        self.location = location
        self.message = message


class MergeInputError(ValueError):
    """Inputs a method cannot merge, found only per tensor (a parameter gradient that is
    out of range at one layer, weights that sum to 0 where normalize divides by them). The
    engine reports it with the tensor's name; ``field`` is the recipe field to change."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def is_scalar(setting: Any) -> bool:
    """A setting that is one value (not a gradient or ``{filter, value}`` list)."""
    return isinstance(setting, bool | int | float | str)


def as_number(setting: Any) -> float | None:
    """A numeric scalar setting as a float; None for anything else."""
    if isinstance(setting, int | float) and not isinstance(setting, bool):
        return float(setting)
    return None


@dataclass(frozen=True)
class ModelSettings:
    """One entry of a recipe's ``models``, as a method's rules see it."""

    position: int  # index in the recipe's ``models`` list
    parameters: Mapping[str, Any]  # its own settings, as written
    fine_tuned: bool  # False for the base model listed among the models


@dataclass(frozen=True)
class RecipeSettings:
    """A recipe's parameter settings as written (scalars, gradient lists, filter lists),
    for a method's recipe rules. Built by the recipe schema after it checked each setting
    against the method's declared parameters."""

    method: MergeMethod
    parameters: Mapping[str, Any]  # the top level
    models: tuple[ModelSettings, ...]

    def is_set(self, name: str) -> bool:
        return name in self.parameters or any(name in m.parameters for m in self.models)

    def setting(self, model: ModelSettings, name: str) -> tuple[Any, Location | None]:
        """What applies to ``model`` for parameter ``name`` and where it is written: its
        own setting, else the top level's; (the default, None) when neither sets it."""
        if name in model.parameters:
            return model.parameters[name], ("models", model.position, "parameters", name)
        if name in self.parameters:
            return self.parameters[name], ("parameters", name)
        p = self.method.parameter(name)
        return (None if p is None else p.default), None


class MergeMethod:
    """A merge method. Subclasses set the class attributes and write the math in
    :meth:`merge_block` (or :meth:`merge`); see the module docstring."""

    name: str
    title: str
    reference: str  # the paper (or page) the math follows
    needs_base: bool = True
    # a base the recipe may give or not (mergekit's BasePolicy.OPTIONAL: nuslerp, multislerp
    # work on task vectors with one, on the models without); needs_base is False then
    optional_base: bool = False
    draws_random: bool = False  # merge() draws at random (the engine makes the draws ahead)
    min_models: int = 1  # fine-tuned (non-base) inputs
    max_models: int | None = None
    parameters: tuple[ParameterSpec, ...] = ()

    @property
    def uses_base(self) -> bool:
        """Whether a recipe's ``base_model`` is read (required, or optional and given)."""
        return self.needs_base or self.optional_base

    def parameter(self, name: str) -> ParameterSpec | None:
        return next((p for p in self.parameters if p.name == name), None)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def check_recipe(self, recipe: RecipeSettings) -> None:
        """The method's own rules over a recipe whose settings are each valid (no torch).
        Raises RecipeRuleError at the field to change."""

    def whole_model_statistic(self, shared: Mapping[str, Any]) -> WholeModelStatistic | None:
        """Statistics over whole models this merge needs before writing (extra streaming
        passes), given the shared parameters; None when it needs none."""
        return None

    def whole_tensor(self, shared: Mapping[str, Any]) -> bool:
        """Whether the math needs each tensor whole, as one block shaped like the tensor
        (rows, norms, random draws of its shape); False lets the engine stream it."""
        return False

    def merge(self, x: TensorInputs) -> Iterator[torch.Tensor]:
        """The merged tensor in float32, block by block in order (a yielded block may be a
        buffer reused for the next: the engine copies it out before asking for more)."""
        for b in x.blocks():
            yield self.merge_block(x, b)

    def merge_block(self, x: TensorInputs, b: Block) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines neither merge nor merge_block")


_M = TypeVar("_M", bound=MergeMethod)
_REGISTERED: dict[str, MergeMethod] = {}


@overload
def register(method: type[_M]) -> type[_M]: ...
@overload
def register(method: _M) -> _M: ...


def register(method: type[_M] | _M) -> type[_M] | _M:
    """Add a method to the registry: as a class decorator (``@register``, the class is
    instantiated once and returned unchanged) or with an instance (variants declared as
    data). A name registered twice is a programming error."""
    instance = method() if isinstance(method, type) else method
    if instance.name in _REGISTERED:
        raise RuntimeError(f"merge method {instance.name!r} is registered twice")
    _REGISTERED[instance.name] = instance
    return method


def registered() -> dict[str, MergeMethod]:
    """Every registered method by name, in alphabetical order."""
    return dict(sorted(_REGISTERED.items()))
