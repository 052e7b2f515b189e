"""The target value of an edit: v* = v_init + δ, δ optimised so the model predicts
target_new (ROME §3.1 eq. 4, MEMIT §4.1 eq. 16).

δ is added to a module's output at the subject's last token of every rewrite prompt
(template + prompt + target tokens except the last) and of the KL prompt
"{subject} is a". Loss = mean per-token NLL of the target + kl_factor · KL(current ‖ initial)
at the KL prompt's subject token + weight_decay · ‖δ‖ / ‖v_init‖². Adam; stop when the loss
falls below a threshold; after each step ‖δ‖ ≤ clamp·‖v_init‖.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from schemas.edit_recipe import EditRequest
from workers.edit.algebra import clamp_norm
from workers.edit.prompts import (
    Batch,
    Prompt,
    collate,
    pad_id,
    split_at_subject,
    subject_prompt,
    target_token_ids,
)
from workers.edit.tracing import add_to_output, log_probs_at, module_io, prefix_cache

KL_TEMPLATE = "{} is a"


@dataclass(frozen=True)
class ValueSettings:
    """The v* optimisation's part of the edit settings (``EditSettings.values``)."""

    steps: int
    lr: float
    weight_decay: float
    kl_factor: float
    clamp_factor: float
    early_stop_loss: float
    loss_layer: int | None  # None: the model's output


@dataclass(frozen=True)
class OptimisedValue:
    v_init: torch.Tensor  # mean clean output over the rewrite prompts (at the subject token)
    v_init_unprefixed: torch.Tensor  # the clean output for the bare prompt (template "{}")
    delta: torch.Tensor
    steps: int

    @property
    def v_star(self) -> torch.Tensor:
        return self.v_init + self.delta


def rewrite_prompts(
    tokenizer: Any, templates: list[str], prompt: str, subject: str, target: str
) -> list[Prompt]:
    """The prompt after each context template, followed by the target's tokens."""
    t_ids = target_token_ids(tokenizer, prompt, target)
    return [subject_prompt(tokenizer, t, prompt, subject, t_ids) for t in templates]


def rewrite_batch(
    tokenizer: Any,
    templates: list[str],
    prompt: str,
    subject: str,
    target: str,
    device: torch.device | str = "cpu",
) -> Batch:
    """The rewrite prompts (one per template) then the KL prompt, last, on ``device``."""
    prompts = rewrite_prompts(tokenizer, templates, prompt, subject, target)
    prompts.append(subject_prompt(tokenizer, "{}", KL_TEMPLATE.format(subject), subject))
    return collate(prompts, pad_id(tokenizer), device)


def optimise_value(
    model: Any,
    tokenizer: Any,
    module_name: str,
    templates: list[str],
    request: EditRequest,
    s: ValueSettings,
) -> OptimisedValue:
    """Optimise δ at ``module_name``'s output (ROME: the MLP projection; MEMIT: the block)
    so that the model continues the request's prompt with its target_new."""
    assert templates[0] == "{}", "the first context template is the bare prompt"
    batch = rewrite_batch(
        tokenizer, templates, request.prompt, request.subject, request.target_new, model.device
    )
    # δ sits at the subject position: the prompts run from there on, after a cached prefix
    split = split_at_subject(batch, pad_id(tokenizer))
    prefix = prefix_cache(model, split)
    rows = batch.rows
    subj = torch.zeros_like(rows)  # the subject's last token opens every suffix
    n_rewrite = len(templates)
    _, outs = module_io(model, module_name, split, rows, subj, prefix=prefix)
    v_init = outs[:n_rewrite].mean(0)
    t_rows, t_pos, labels = batch.target_index()
    t_pos = t_pos - split.prefix_len[t_rows]
    kl_row = torch.tensor([n_rewrite], device=batch.device)
    q_rows = torch.cat([t_rows, kl_row])
    q_pos = torch.cat([t_pos, torch.zeros_like(kl_row)])

    delta = torch.zeros_like(v_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=s.lr)
    max_norm = s.clamp_factor * float(v_init.norm())
    init_kl: torch.Tensor | None = None
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    steps = 0
    try:
        for _ in range(s.steps):
            with add_to_output(model, module_name, rows, subj, delta):
                logp = log_probs_at(
                    model, split, q_rows, q_pos, loss_layer=s.loss_layer, prefix=prefix
                )
            nll = -logp[: len(labels)].gather(1, labels[:, None]).mean()
            kl_logp = logp[len(labels) :]
            if init_kl is None:
                init_kl = kl_logp.detach()
            # KL(current ‖ initial)
            kl = (kl_logp.exp() * (kl_logp - init_kl)).sum(-1).mean()
            decay = s.weight_decay * delta.norm() / v_init.norm() ** 2
            loss = nll + s.kl_factor * kl + decay
            if float(loss.detach()) < s.early_stop_loss:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            with torch.no_grad():
                delta.copy_(clamp_norm(delta, max_norm))
    finally:
        for p in params:
            p.requires_grad_(True)
    return OptimisedValue(
        v_init=v_init,
        v_init_unprefixed=outs[0],
        delta=delta.detach().clone(),
        steps=steps,
    )
