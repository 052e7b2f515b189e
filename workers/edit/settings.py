"""The one settings object of an edit: the recipe's hyperparameters resolved for one model.

The recipe (schemas/edit_recipe.py) validates every hyperparameter without the model and
declares the defaults; what only the model can settle is resolved here once, before any
work: the default layers (scaled to its depth), MEMIT's default λ (scaled to its key
width), and every layer index checked against its depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from workers.edit.architectures import EditModel, default_mom2_update_weight
from workers.edit.values import ValueSettings
from workers.errors import InputError

if TYPE_CHECKING:
    from schemas.edit_recipe import EditRecipe
    from workers.edit.update import EditMethod


@dataclass(frozen=True)
class EditSettings:
    """How an edit computes its update (field meanings: docs/editing.md, "Recipe").

    Built by :meth:`from_recipe` for a run (the recipe declares the defaults); tests and
    benches build it directly. The optional fields default to "not set": no scaling of
    ROME's update, no λ (MEMIT needs one).
    """

    layers: tuple[int, ...]  # ROME: exactly one
    values: ValueSettings  # the v* optimisation
    key_mode: Literal["consistent", "original"]
    mom2_adjustment: bool  # ROME: u = C⁻¹k̄ (False: u = k̄)
    edit_margin: float | None = None  # ROME: the update scaled to turn the preference by κ·m₀
    sufficient_loss: float | None = None  # ROME: … or to reach this NLL (takes precedence)
    mom2_update_weight: float | None = None  # MEMIT's λ
    nullspace_threshold: float | None = None  # AlphaEdit: eigenvalues of C below span P
    alphaedit_l2: float | None = None  # AlphaEdit: the weight of ‖ΔP‖²

    @property
    def layer(self) -> int:
        """The one edited layer of a single-layer method (ROME)."""
        if len(self.layers) != 1:
            raise ValueError(f"one layer expected, got {list(self.layers)}")
        return self.layers[0]

    @classmethod
    def from_recipe(
        cls,
        recipe: EditRecipe,
        target: EditModel,
        method: EditMethod,
        chosen: Sequence[int] | None = None,
    ) -> EditSettings:
        """The recipe's hyperparameters for ``target``; InputError naming the field when a
        layer index does not exist in the model. ``chosen``: the layers a causal trace chose
        (required for ``layers: auto``)."""
        h = recipe.hyperparameters
        depth = target.depth
        check_layers(recipe, depth)
        if chosen is not None:
            layers = list(chosen)
        elif h.layers == "auto":
            raise ValueError("layers: auto needs the layers chosen by the causal trace")
        elif h.layers is None:
            layers = method.default_layers(depth)
        else:
            layers = list(h.layers)
        loss_layer = h.v_loss_layer
        values = ValueSettings(
            steps=h.v_num_grad_steps,
            lr=h.v_lr,
            weight_decay=h.v_weight_decay,
            kl_factor=h.kl_factor,
            clamp_factor=recipe.clamp_norm_factor,
            early_stop_loss=h.v_early_stop_loss,
            # the last layer's output is the model's output: the plain loss
            loss_layer=None if loss_layer in (None, depth - 1) else loss_layer,
        )
        return cls(
            layers=tuple(layers),
            values=values,
            key_mode=h.key_mode,
            mom2_adjustment=h.mom2_adjustment,
            edit_margin=h.edit_margin,
            sufficient_loss=h.sufficient_loss,
            mom2_update_weight=h.mom2_update_weight
            or default_mom2_update_weight(target.key_width(layers[0])),
            nullspace_threshold=h.nullspace_threshold,
            alphaedit_l2=h.alphaedit_l2,
        )


def check_layers(recipe: EditRecipe, depth: int) -> None:
    """InputError naming the field for a layer index (``hyperparameters.layers`` or
    ``v_loss_layer``) that a model of ``depth`` layers does not have."""
    h = recipe.hyperparameters
    if isinstance(h.layers, list):
        bad = [x for x in h.layers if x >= depth]
        if bad:
            raise InputError(
                f"layer(s) {bad} do not exist: the model has {depth} layers (0–{depth - 1})",
                field="hyperparameters.layers",
            )
    loss_layer = h.v_loss_layer
    if loss_layer is not None and loss_layer >= depth:
        raise InputError(
            f"layer {loss_layer} does not exist: the model has {depth} layers (0–{depth - 1})",
            field="hyperparameters.v_loss_layer",
        )
