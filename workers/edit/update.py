"""What every edit method shares: what an update is computed from (:class:`EditContext`),
what it returns (:class:`RankOneUpdate`), and the :class:`EditMethod` protocol the engine
dispatches through (the table of methods is ``workers.edit.methods``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from workers.edit.algebra import delta_from_factors
from workers.edit.history import EditHistory

if TYPE_CHECKING:
    from schemas.edit_recipe import EditRequest
    from workers.edit.architectures import EditModel
    from workers.edit.settings import EditSettings
    from workers.edit.values import OptimisedValue


@dataclass(frozen=True)
class EditContext:
    """What the engine derives from the model before an update: the context templates
    (``"{}"`` first; keys and values are averaged over them), the keys' second moment C
    per layer (empty where the method needs none) and the input model's edit history (the
    requests and keys of the edits that produced it; empty for an unedited model)."""

    templates: list[str]
    covariances: Mapping[int, torch.Tensor] = field(default_factory=dict)
    history: EditHistory = field(default_factory=lambda: EditHistory.empty())
    notes: dict[str, Any] = field(default_factory=dict)  # what the method reports (metrics)


@dataclass(frozen=True)
class RankOneUpdate:
    """ΔW = left · rightᵀ (nn.Linear orientation) for one request at one layer."""

    request: int
    layer: int
    left: torch.Tensor  # [d_out]
    right: torch.Tensor  # [d_in]
    denominator: float  # uᵀk used (ROME); NaN for MEMIT
    relative_denominator: float  # uᵀk / (‖u‖‖k‖)
    steps: int = 0
    scale: float = 1.0  # ROME's edit_margin / sufficient_loss factor (1: the whole update)
    value: OptimisedValue | None = None  # ROME's v* (reusable for the same request and layer)
    key: torch.Tensor | None = None  # [d_in] the key the update writes (for the edit history)


def layer_deltas(updates: Sequence[RankOneUpdate]) -> dict[int, torch.Tensor]:
    """ΔW per layer: the sum of the layer's rank-one updates (layers in order of first
    appearance)."""
    out: dict[int, torch.Tensor] = {}
    for u in updates:
        d = delta_from_factors(u.left, u.right)
        out[u.layer] = out[u.layer] + d if u.layer in out else d
    return out


def steps_per_request(updates: Sequence[RankOneUpdate]) -> list[tuple[int, int]]:
    """(request, v* optimisation steps) for each request, in request order."""
    return sorted({u.request: u.steps for u in updates}.items())


class EditMethod(Protocol):
    """One edit method, by its recipe name. Adding a method is one module implementing this
    and one entry in ``workers.edit.methods.METHODS`` (and the name in the recipe schema)."""

    name: str

    def default_layers(self, depth: int) -> list[int]:
        """The edited layers when the recipe names none, for a model of ``depth`` layers."""
        ...

    def layers_at(self, peak: int, depth: int) -> list[int]:
        """The edited layers for ``layers: auto`` when the causal trace peaks at ``peak``."""
        ...

    def needs_covariance(self, settings: EditSettings) -> bool:
        """Whether the update uses the keys' second moment C."""
        ...

    def check_model(self, target: EditModel) -> None:
        """InputError (field ``edit_method``) when the method cannot edit this model's
        architecture; checked before any work."""
        ...

    def update(
        self,
        target: EditModel,
        requests: list[EditRequest],
        settings: EditSettings,
        context: EditContext,
        *,
        targets_true: list[str],
        cancelled: Callable[[], bool] | None = None,
    ) -> list[RankOneUpdate]:
        """The updates of the requests, applied to ``target.model`` in place (the engine
        restores the weights after measuring). ``targets_true``: each request's target_true
        as the pre-edit probe settled it."""
        ...

    def metrics(self, updates: list[RankOneUpdate], settings: EditSettings) -> dict[str, Any]:
        """The method's own metrics (denominators, scales, λ, optimisation steps)."""
        ...
