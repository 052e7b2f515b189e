"""MEMIT (Meng et al. 2023): many edits spread over a band of layers.

1. For each request optimise z = z_init + δ, the residual stream (output of block L, the
   last edited layer) at the subject's last token (‖δ‖ ≤ clamp·‖z_init‖).
2. For each layer l in ascending order, on the model as edited so far:
   K = keys at l (prefix-averaged, d_in × m), R = (Z − current z at L) / (layers left),
   ΔW_l = R Kᵀ (λC_l + K Kᵀ)⁻¹ (float64), restricted to ΔW_l k = 0 for the keys of every
   token of the requests' keep_prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from schemas.edit_recipe import EditRequest
from workers.edit.algebra import delta_from_factors, memit_update
from workers.edit.architectures import EditModel, scaled_layer
from workers.edit.prompts import collate, kept_prompts, pad_id, subject_prompt
from workers.edit.rome import prompt_keys
from workers.edit.settings import EditSettings
from workers.edit.tracing import input_and_output
from workers.edit.update import EditContext, RankOneUpdate, steps_per_request
from workers.edit.values import optimise_value
from workers.errors import CancelledError, InputError

ROWS_PER_PASS = 64
PUBLISHED_BAND = (4, 8)  # the edited layers of Llama-2-7B's 32 (MEMIT paper, EasyEdit)


def keys_and_outputs(
    model: Any,
    tokenizer: Any,
    key_module: str,
    output_module: str,
    templates: list[str],
    requests: list[EditRequest],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K [d_in, m], Z [d_out, m]): per request, ``key_module``'s input and
    ``output_module``'s output at the subject's last token, averaged over the templates;
    the requests' prompts run in batches of about ROWS_PER_PASS rows."""
    per_pass = max(1, ROWS_PER_PASS // len(templates))
    keys, outs = [], []
    for start in range(0, len(requests), per_pass):
        chunk = requests[start : start + per_pass]
        prompts = [
            subject_prompt(tokenizer, t, r.prompt, r.subject) for r in chunk for t in templates
        ]
        batch = collate(prompts, pad_id(tokenizer), model.device)
        k, z = input_and_output(
            model, key_module, output_module, batch, batch.rows, batch.subject_pos
        )
        keys.append(k.view(len(chunk), len(templates), -1).mean(1))
        outs.append(z.view(len(chunk), len(templates), -1).mean(1))
    return torch.cat(keys).T, torch.cat(outs).T


# (layer, R [d_out, m], K [d_in, m], kept keys [d_in, p] or None) → (left, right) factors
LayerSolve = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
]


def memit_edit(
    target: EditModel,
    requests: list[EditRequest],
    settings: EditSettings,
    context: EditContext,
    *,
    cancelled: Callable[[], bool] | None = None,
    solve: LayerSolve | None = None,
) -> list[RankOneUpdate]:
    """Rank-one factors per request and layer of ``settings.layers``, with λ =
    ``settings.mom2_update_weight`` and C = ``context.covariances``. The model is edited in
    place as the layers are processed (keys of layer l+1 are read on the model with layer l
    already edited); the caller restores the weights if it wants the original back. The
    keys of every request's ``keep_prompts`` are held fixed at each layer (ΔW_l k = 0; they
    see the same, unchanged, earlier layers). ``cancelled`` is checked before each
    request's optimisation and each layer (raises CancelledError). ``solve``: the per-layer
    update in place of MEMIT's (AlphaEdit's null-space constrained one)."""
    if solve is None:
        lam = settings.mom2_update_weight
        if lam is None:
            raise ValueError("MEMIT needs λ (settings.mom2_update_weight)")

        def solve(
            layer: int, R: torch.Tensor, K: torch.Tensor, keep: torch.Tensor | None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return memit_update(R, K, context.covariances[layer], lam, keep)

    def check() -> None:
        if cancelled is not None and cancelled():
            raise CancelledError("the job was cancelled")

    model, tokenizer, arch = target.model, target.tokenizer, target.arch
    templates, layers = context.templates, settings.layers
    block = arch.block_name(max(layers))
    kept = kept_prompts(requests)
    targets = []
    steps = []
    for r in requests:
        check()
        v = optimise_value(model, tokenizer, block, templates, r, settings.values)
        targets.append(v.v_star)
        steps.append(v.steps)
    Z = torch.stack(targets, dim=1)  # [d_model, m]

    updates: list[RankOneUpdate] = []
    for i, layer in enumerate(sorted(layers)):
        check()
        K, current = keys_and_outputs(
            model, tokenizer, arch.module_name(layer), block, templates, requests
        )
        R = (Z - current) / (len(layers) - i)
        keep = prompt_keys(model, tokenizer, arch.module_name(layer), kept) if kept else None
        left, right = solve(layer, R, K, keep)
        target.apply(layer, delta_from_factors(left, right))
        for j in range(len(requests)):
            updates.append(
                RankOneUpdate(
                    request=j,
                    layer=layer,
                    left=left[:, j].clone(),
                    right=right[:, j].clone(),
                    denominator=float("nan"),
                    relative_denominator=float("nan"),
                    steps=steps[j],
                    key=K[:, j].clone(),
                )
            )
    return updates


class Memit:
    """MEMIT as an edit method (``edit_method: memit``): a batch of requests over a band of
    layers."""

    name = "memit"

    def default_layers(self, depth: int) -> list[int]:
        lo, hi = (scaled_layer(x, depth) for x in PUBLISHED_BAND)
        return list(range(lo, hi + 1))

    def layers_at(self, peak: int, depth: int) -> list[int]:
        """A band as wide as the default one, starting at the peak (moved down to end at
        the last layer when it would run past it)."""
        width = len(self.default_layers(depth))
        start = max(0, min(peak, depth - width))
        return list(range(start, start + width))

    def needs_covariance(self, settings: EditSettings) -> bool:
        return True

    def check_model(self, target: EditModel) -> None:
        """MEMIT asks each layer's MLP output to move the residual stream by R/(layers
        left), which holds only where that output is added to it as is. A post-MLP norm
        (Gemma-2/3, OLMo-2) is not linear, and RMS-normalised outputs cannot be moved by an
        arbitrary R, so the spread would miss its target."""
        arch = target.arch
        if arch.post_mlp_norm is not None:
            model_type = getattr(target.model.config, "model_type", arch.name)
            raise InputError(
                f"{self.name} cannot edit {model_type!r}: its MLP output passes through "
                f"{arch.post_mlp_norm.format('L')} before the residual stream, so MEMIT's "
                "residual target cannot be spread over the layers; use edit_method 'rome' "
                "(one request, exact for this architecture)",
                field="edit_method",
            )

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
        return memit_edit(target, requests, settings, context, cancelled=cancelled)

    def metrics(self, updates: list[RankOneUpdate], settings: EditSettings) -> dict[str, Any]:
        return {
            "denominator": [],  # uᵀk is ROME's; kept as an empty list for one metrics shape
            "relative_denominator": [],
            "v_steps": steps_per_request(updates),
            "mom2_update_weight": settings.mom2_update_weight,
        }
