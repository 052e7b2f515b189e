"""AlphaEdit (Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
Models", ICLR 2025): MEMIT's batch edit over a band of layers, with each layer's update
projected onto the null space of the preserved knowledge's keys.

Per edited layer l (ascending, on the model as edited so far, as MEMIT):

1. P = Û Ûᵀ, Û the eigenvectors of C_l = K₀K₀ᵀ (the cached covariance) with eigenvalue
   below ``nullspace_threshold`` (paper: 2e-2), less the directions of the requests'
   ``keep_prompts`` keys (held fixed, as for MEMIT);
2. Δ = R K₁ᵀ P (Kₚ Kₚᵀ P + K₁ K₁ᵀ P + l2·I)⁻¹ (float64; l2 = ``alphaedit_l2``, the reference
   code's 10), K₁ the new keys, R = (Z − current z at L) / (layers left), Kₚ the keys of the
   earlier edits at l: from the input model's edit history (``workers.edit.history``), and
   for earlier requests edited at other layers, their keys read on the model now.

Δ = Δ P, so preserved keys keep their outputs; the Kₚ term keeps earlier edits' outputs
close (a penalty, not a constraint). Unlike MEMIT there is no λC term: the preserved
knowledge enters only through P.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from schemas.edit_recipe import EditRequest
from workers.edit.algebra import alphaedit_update, nullspace_projector, without_keys
from workers.edit.architectures import EditModel
from workers.edit.history import HISTORY, earlier_requests
from workers.edit.memit import Memit, keys_and_outputs, memit_edit
from workers.edit.settings import EditSettings
from workers.edit.update import EditContext, RankOneUpdate, steps_per_request
from workers.errors import InputError


def earlier_keys(target: EditModel, context: EditContext, layer: int) -> torch.Tensor | None:
    """Kₚ at ``layer`` ([d_in, p]): the history's keys recorded there, and the keys of the
    history's other requests read on the model now (prefix-averaged over the templates)."""
    history = context.history
    parts = []
    if layer in history.keys:
        parts.append(history.keys[layer])
    missing = history.missing(layer)
    if missing:
        arch = target.arch
        K, _ = keys_and_outputs(
            target.model,
            target.tokenizer,
            arch.module_name(layer),
            arch.module_name(layer),
            context.templates,
            earlier_requests(history, missing),
        )
        parts.append(K.detach().float().cpu())
    if not parts:
        return None
    return torch.cat(parts, dim=1)


def alphaedit_edit(
    target: EditModel,
    requests: list[EditRequest],
    settings: EditSettings,
    context: EditContext,
    *,
    cancelled: Callable[[], bool] | None = None,
) -> tuple[list[RankOneUpdate], dict[str, Any]]:
    """The updates (applied to ``target.model`` in place, as :func:`memit_edit`) and what
    the projection did per layer: the null space's dimension and the earlier keys used."""
    threshold, l2 = settings.nullspace_threshold, settings.alphaedit_l2
    if threshold is None or l2 is None:
        raise ValueError("AlphaEdit needs settings.nullspace_threshold and alphaedit_l2")
    nullspace: dict[str, int] = {}
    protected: dict[str, int] = {}

    def solve(
        layer: int, R: torch.Tensor, K: torch.Tensor, keep: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        C = context.covariances[layer]
        P = nullspace_projector(C.to(K.device), threshold)
        dim = round(float(torch.trace(P)))
        if dim == 0:
            smallest = float(torch.linalg.eigvalsh(C.double()).min())
            raise InputError(
                f"layer {layer}: no eigenvalue of the keys' covariance is below "
                f"{threshold:g} (the smallest is {smallest:.4g}), so no update can leave the "
                "preserved keys unchanged; raise nullspace_threshold above it",
                field="hyperparameters.nullspace_threshold",
            )
        P = without_keys(P, keep)
        Kp = earlier_keys(target, context, layer)
        if Kp is not None and Kp.shape[0] != K.shape[0]:
            raise InputError(
                f"the history's keys at layer {layer} are {Kp.shape[0]}-wide, this model's "
                f"{K.shape[0]}: the history belongs to another model",
                file=HISTORY,
            )
        nullspace[str(layer)] = dim
        protected[str(layer)] = 0 if Kp is None else int(Kp.shape[1])
        return alphaedit_update(R, K, P, None if Kp is None else Kp.to(K.device), l2)

    updates = memit_edit(target, requests, settings, context, cancelled=cancelled, solve=solve)
    return updates, {"nullspace_dimension": nullspace, "protected_keys": protected}


class AlphaEdit(Memit):
    """AlphaEdit as an edit method (``edit_method: alphaedit``): MEMIT's layers, values and
    refusals (post-MLP-norm families: the same residual spread), a null-space constrained
    update."""

    name = "alphaedit"

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
        updates, notes = alphaedit_edit(target, requests, settings, context, cancelled=cancelled)
        context.notes.update(notes)
        return updates

    def metrics(self, updates: list[RankOneUpdate], settings: EditSettings) -> dict[str, Any]:
        return {
            "denominator": [],
            "relative_denominator": [],
            "v_steps": steps_per_request(updates),
            "nullspace_threshold": settings.nullspace_threshold,
            "alphaedit_l2": settings.alphaedit_l2,
        }
