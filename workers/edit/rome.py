"""ROME (Meng et al. 2022) with consistent prefixed keys (r-ROME, Gupta et al. 2024).

    k̄ = mean over templates of the key at the subject's last token
    u = C⁻¹ k̄                    (k̄ itself when mom2_adjustment is off)
    ΔW = (v* − W k̄) uᵀ / (uᵀ k̄)  (consistent, default)
    ΔW = (v* − W k₀) uᵀ / (uᵀ k₀) (original: k₀ the key of the bare prompt)

The original variant's denominator can be tiny for subjects at the first token (whose
key is an outlier) and the model collapses ("Rebuilding ROME", Gupta et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from schemas.edit_recipe import EditRequest
from workers.edit.algebra import rome_direction, rome_update
from workers.edit.architectures import EditArchitecture
from workers.edit.prompts import collate, pad_id, subject_prompt
from workers.edit.tracing import module_io
from workers.edit.values import ValueSettings, optimise_value


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


@dataclass(frozen=True)
class SubjectKeys:
    k_bar: torch.Tensor  # mean key over the templates
    w_k_bar: torch.Tensor  # mean module output over the templates
    k0: torch.Tensor  # key for the bare prompt
    w_k0: torch.Tensor  # module output for the bare prompt


def subject_keys(
    model: Any, tokenizer: Any, module_name: str, templates: list[str], prompt: str, subject: str
) -> SubjectKeys:
    """Keys and outputs of the module at the subject's last token, per template."""
    prompts = [subject_prompt(tokenizer, t, prompt, subject) for t in templates]
    batch = collate(prompts, pad_id(tokenizer))
    keys, outs = module_io(model, module_name, batch, batch.rows, batch.subject_pos)
    return SubjectKeys(keys.mean(0), outs.mean(0), keys[0], outs[0])


def rome_edit(
    model: Any,
    tokenizer: Any,
    arch: EditArchitecture,
    request: EditRequest,
    layer: int,
    C: torch.Tensor | None,
    templates: list[str],
    values: ValueSettings,
    key_mode: Literal["consistent", "original"],
    index: int = 0,
) -> RankOneUpdate:
    """The rank-one update of one request (the model is not changed)."""
    module = arch.module_name(layer)
    keys = subject_keys(model, tokenizer, module, templates, request.prompt, request.subject)
    u = rome_direction(keys.k_bar, C)
    value = optimise_value(
        model, tokenizer, module, templates, request.prompt, request.subject,
        request.target_new, values,
    )  # fmt: skip
    if key_mode == "consistent":
        k, w_k, v_star = keys.k_bar, keys.w_k_bar, value.v_init + value.delta
    else:
        k, w_k, v_star = keys.k0, keys.w_k0, value.v_init_unprefixed + value.delta
    left, right = rome_update(v_star, w_k, u, k)
    denominator = float(torch.dot(u.double(), k.double()))
    return RankOneUpdate(
        request=index,
        layer=layer,
        left=left,
        right=right,
        denominator=denominator,
        relative_denominator=denominator / float(k.double().norm()),
        steps=value.steps,
    )
