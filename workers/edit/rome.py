"""ROME (Meng et al. 2022) with consistent prefixed keys (r-ROME, Gupta et al. 2024).

    k̄ = mean over templates of the key at the subject's last token
    u = C⁻¹ k̄                    (k̄ itself when mom2_adjustment is off)
    ΔW = (v* − W k̄) uᵀ / (uᵀ k̄)  (consistent, default)
    ΔW = (v* − W k₀) uᵀ / (uᵀ k₀) (original: k₀ the key of the bare prompt)

The original variant's denominator can be tiny for subjects at the first token (whose
key is an outlier) and the model collapses ("Rebuilding ROME", Gupta et al. 2024).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from schemas.edit_recipe import EditRequest
from workers.edit.algebra import delta_from_factors, rome_direction, rome_update
from workers.edit.architectures import EditModel
from workers.edit.metrics import greedy_next_token, mean_log_probs
from workers.edit.prompts import Batch, Prompt, collate, encode, pad_id, subject_prompt
from workers.edit.settings import EditSettings
from workers.edit.tracing import log_probs_at, module_io
from workers.edit.update import EditContext, RankOneUpdate, steps_per_request
from workers.edit.values import OptimisedValue, optimise_value, rewrite_prompts
from workers.errors import InputError

MIN_MARGIN = 1.0  # nats: the least m₀ an edit_margin multiplies (weakly held facts)
# The default edited layer: the second MLP, whatever the depth. Yoon, Gupta and
# Anumanchipalli (2024, arXiv:2405.00664) found layer 1 the best for ROME on Llama-2/3, and on
# SmolLM2-135M's 50 bench facts at the recipe defaults layer 1 kept neighborhood 0.870 against
# 0.700 at layer 5 (the published Llama-2-7B layer 5 of 32, the previous default), with
# efficacy 1.000 at both (bench/README.md, "Layers by causal tracing").
DEFAULT_LAYER = 1


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
    batch = collate(prompts, pad_id(tokenizer), model.device)
    keys, outs = module_io(model, module_name, batch, batch.rows, batch.subject_pos)
    return SubjectKeys(keys.mean(0), outs.mean(0), keys[0], outs[0])


@torch.no_grad()
def prompt_keys(model: Any, tokenizer: Any, module_name: str, prompts: list[str]) -> torch.Tensor:
    """The module's input at every token of every prompt, as columns ([d_in, n], float32):
    an update with ΔW k = 0 for all of them leaves these prompts' whole forward pass, and so
    their predictions, unchanged."""
    encoded = [Prompt(ids=encode(tokenizer, p)[0], subject_pos=-1) for p in prompts]
    batch = collate(encoded, pad_id(tokenizer), model.device)
    rows = torch.tensor([i for i, p in enumerate(encoded) for _ in p.ids], device=batch.device)
    pos = torch.tensor([j for p in encoded for j in range(len(p.ids))], device=batch.device)
    keys, _ = module_io(model, module_name, batch, rows, pos)
    return keys.T


def rome_edit(
    target: EditModel,
    request: EditRequest,
    settings: EditSettings,
    context: EditContext,
    *,
    index: int = 0,
    value: OptimisedValue | None = None,
    target_true: str | None = None,
) -> RankOneUpdate:
    """The rank-one update of one request at ``settings.layer`` (the model is not changed).

    u = C⁻¹k̄ with C = ``context.covariances[layer]`` (u = k̄ without mom2_adjustment); the
    keys of ``request.keep_prompts`` are held fixed (uᵀk = 0 for each,
    :func:`~workers.edit.algebra.rome_direction`). The update is then scaled down by
    ``settings.sufficient_loss`` or ``settings.edit_margin`` (:func:`update_scale`;
    ``target_true``: what the margin is measured against, default the request's, else the
    model's greedy next token). ``index``: the request's position in the recipe (named in
    errors and in the factors' names). ``value``: v* of an earlier call for the same
    request, layer and templates (it does not depend on u), to compare settings without
    optimising it again."""
    layer = settings.layer
    module = target.arch.module_name(layer)
    model, tokenizer, templates = target.model, target.tokenizer, context.templates
    keys = subject_keys(model, tokenizer, module, templates, request.prompt, request.subject)
    keep = None
    if request.keep_prompts:
        keep = prompt_keys(model, tokenizer, module, request.keep_prompts)
    C = context.covariances[layer] if settings.mom2_adjustment else None
    try:
        u = rome_direction(keys.k_bar, C, keep)
    except InputError as e:
        raise InputError(e.message, field=f"requests[{index}].keep_prompts") from e
    if value is None:
        value = optimise_value(model, tokenizer, module, templates, request, settings.values)
    if settings.key_mode == "consistent":
        k, w_k, v_star = keys.k_bar, keys.w_k_bar, value.v_star
    else:
        k, w_k, v_star = keys.k0, keys.w_k0, value.v_init_unprefixed + value.delta
    left, right = rome_update(v_star, w_k, u, k)
    scale = update_scale(
        target, layer, delta_from_factors(left, right), request, settings, templates, target_true
    )
    if scale != 1.0:
        left = left * scale
    denominator = float(torch.dot(u.double(), k.double()))
    return RankOneUpdate(
        request=index,
        layer=layer,
        left=left,
        right=right,
        denominator=denominator,
        relative_denominator=denominator / float(k.double().norm()),
        steps=value.steps,
        scale=scale,
        value=value,
        key=k.detach().clone(),
    )


def update_scale(
    target: EditModel,
    layer: int,
    delta: torch.Tensor,
    request: EditRequest,
    settings: EditSettings,
    templates: list[str],
    target_true: str | None = None,
) -> float:
    """The factor ROME puts on its whole update ``delta`` at ``layer``: with
    ``sufficient_loss`` the least that still reaches that loss
    (:func:`least_sufficient_scale`; it takes precedence), with ``edit_margin`` the least
    that turns the prompt's preference around by that many times the margin the model held
    (:func:`least_margin_scale`), else 1."""
    if settings.sufficient_loss is not None:
        return least_sufficient_scale(
            target, layer, delta, templates, request, settings.sufficient_loss
        )
    if settings.edit_margin is None:
        return 1.0
    true = target_true or request.target_true
    if true is None:
        true = greedy_next_token(target.model, target.tokenizer, request.prompt)
    return least_margin_scale(target, layer, delta, request, true, settings.edit_margin)


@torch.no_grad()
def worst_rewrite_nll(model: Any, batch: Batch) -> float:
    """The largest, over the rewrite prompts, of the mean per-token NLL of the target."""
    rows, pos, labels = batch.target_index()
    nll = -log_probs_at(model, batch, rows, pos).gather(1, labels[:, None])[:, 0].double()
    n = len(batch.prompts)
    per_prompt = torch.zeros(n, dtype=torch.float64, device=nll.device).index_add_(0, rows, nll)
    counts = torch.zeros_like(per_prompt).index_add_(0, rows, torch.ones_like(nll))
    return float((per_prompt / counts).max())


@torch.no_grad()
def least_scale(
    target: EditModel,
    layer: int,
    delta: torch.Tensor,
    reached: Callable[[], bool],
    iterations: int = 7,
) -> float:
    """The least a in (0, 1] such that ``reached()`` holds on the model edited by a·delta, by
    bisection to 2⁻ⁱᵗᵉʳᵃᵗⁱᵒⁿˢ (``reached`` is taken to be monotone in a); 1 when it does not
    hold for the whole update. The weight is restored bit for bit."""
    w = target.weight(layer)
    with target.restored([layer]) as originals:

        def holds(a: float) -> bool:
            w.copy_(originals[layer])
            target.apply(layer, a * delta)
            return reached()

        if not holds(1.0):
            return 1.0
        lo, hi = 0.0, 1.0
        for _ in range(iterations):
            mid = (lo + hi) / 2
            if holds(mid):
                hi = mid
            else:
                lo = mid
        return hi


@torch.no_grad()
def least_sufficient_scale(
    target: EditModel,
    layer: int,
    delta: torch.Tensor,
    templates: list[str],
    request: EditRequest,
    sufficient_loss: float,
    iterations: int = 7,
) -> float:
    """The least a in (0, 1] such that on the model edited by a·ΔW every rewrite prompt (the
    request's prompt after each context template) has a mean target NLL ≤ sufficient_loss
    (:func:`least_scale`).

    The v* optimisation stops only when the loss over all the prefixed prompts is tiny, which
    leaves most edits far stronger than the fact needs; the excess is what spills onto
    subjects whose keys resemble this one's (ΔW k' = (uᵀk'/uᵀk̄)·(v* − Wk̄)). The edit is
    measured on the model itself (the real ΔW at every prompt's own key), not on δ."""
    tokenizer = target.tokenizer
    prompts = rewrite_prompts(
        tokenizer, templates, request.prompt, request.subject, request.target_new
    )
    batch = collate(prompts, pad_id(tokenizer), target.device)
    return least_scale(
        target, layer, delta,
        lambda: worst_rewrite_nll(target.model, batch) <= sufficient_loss, iterations,
    )  # fmt: skip


def preference_margin(model: Any, tokenizer: Any, prompt: str, new: str, true: str) -> float:
    """Mean per-token log P(new | prompt) − mean per-token log P(true | prompt): the margin
    by which the model prefers ``new`` (the efficacy metric's comparison)."""
    lp_new, lp_true = mean_log_probs(model, tokenizer, [(prompt, new), (prompt, true)])
    return lp_new - lp_true


@torch.no_grad()
def least_margin_scale(
    target: EditModel,
    layer: int,
    delta: torch.Tensor,
    request: EditRequest,
    target_true: str,
    edit_margin: float,
    iterations: int = 7,
) -> float:
    """The least a in (0, 1] such that on the model edited by a·ΔW the prompt prefers
    target_new to target_true by at least ``edit_margin`` × m₀, where m₀ is the margin by
    which the clean model preferred target_true (at least MIN_MARGIN nats):
    :func:`least_scale`. 1 (the whole update) when the clean model does not prefer
    target_true (m₀ ≤ 0: the margin says nothing about how much edit the fact needs).

    With edit_margin 1 the edit turns the preference around by as much as the model held
    it; the whole optimised update often moves the margin by two to four times m₀, and a
    subject with a similar key gets that excess times uᵀk'/uᵀk̄."""

    def margin() -> float:
        return preference_margin(
            target.model, target.tokenizer, request.prompt, request.target_new, target_true
        )

    m0 = -margin()
    if m0 <= 0:
        return 1.0  # the model does not hold target_true over target_new: nothing to measure
    needed = edit_margin * max(m0, MIN_MARGIN)
    return least_scale(target, layer, delta, lambda: margin() >= needed, iterations)


class Rome:
    """ROME as an edit method (``edit_method: rome``): one request, one layer."""

    name = "rome"

    def default_layers(self, depth: int) -> list[int]:
        return [min(DEFAULT_LAYER, depth - 1)]

    def layers_at(self, peak: int, depth: int) -> list[int]:
        return [peak]

    def needs_covariance(self, settings: EditSettings) -> bool:
        return settings.mom2_adjustment

    def check_model(self, target: EditModel) -> None:
        """Every architecture of the table: W'k̄ = v* holds for the projection's output,
        whatever follows it (v* is optimised through it)."""

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
        (request,) = requests  # the recipe holds rome to one request
        update = rome_edit(target, request, settings, context, target_true=targets_true[0])
        target.apply(update.layer, delta_from_factors(update.left, update.right))
        return [update]

    def metrics(self, updates: list[RankOneUpdate], settings: EditSettings) -> dict[str, Any]:
        return {
            "denominator": [u.denominator for u in updates],
            "relative_denominator": [u.relative_denominator for u in updates],
            "v_steps": steps_per_request(updates),
            "update_scale": [u.scale for u in updates],
        }
