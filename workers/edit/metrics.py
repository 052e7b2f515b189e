"""What an edit did (docs/editing.md, "Metrics and the gate"): efficacy and paraphrase success
(P(target_new) > P(target_true), mean per-token log-probability), neighborhood specificity
(share of neighborhood prompts whose preference is unchanged), perplexity on fixed
reference sentences before and after (the "Butterfly Effect" surrogate for collapse)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from schemas.edit_recipe import EditRequest
from workers.edit.prompts import (
    Prompt,
    collate,
    encode,
    kept_prompts,
    pad_id,
    scoring_prompt,
    target_token_ids,
)
from workers.edit.tracing import log_probs_at

BATCH = 32


def reference_sentences() -> list[str]:
    text = resources.files("workers.edit").joinpath("reference_sentences.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


@torch.no_grad()
def mean_log_probs(model: Any, tokenizer: Any, pairs: list[tuple[str, str]]) -> list[float]:
    """Mean per-token log P(target | prompt) for each (prompt, target)."""
    out: list[float] = []
    for i in range(0, len(pairs), BATCH):
        chunk = pairs[i : i + BATCH]
        prompts = [
            scoring_prompt(tokenizer, p, target_token_ids(tokenizer, p, t)) for p, t in chunk
        ]
        batch = collate(prompts, pad_id(tokenizer), model.device)
        rows, pos, labels = batch.target_index()
        lp = log_probs_at(model, batch, rows, pos).gather(1, labels[:, None])[:, 0]
        sums = torch.zeros(len(chunk), device=lp.device).index_add_(0, rows, lp)
        counts = torch.tensor([len(p.target_ids) for p in prompts], device=lp.device)
        out += (sums / counts).tolist()
    return out


@torch.no_grad()
def next_tokens(model: Any, tokenizer: Any, prompts: list[str]) -> list[int]:
    """The most likely next token id after each prompt."""
    out: list[int] = []
    for i in range(0, len(prompts), BATCH):
        batch = collate(
            [scoring_prompt(tokenizer, p, [0]) for p in prompts[i : i + BATCH]],
            pad_id(tokenizer),
            model.device,
        )
        rows, pos, _ = batch.target_index()
        out += log_probs_at(model, batch, rows, pos).argmax(1).tolist()
    return out


@torch.no_grad()
def greedy_next_token(model: Any, tokenizer: Any, prompt: str) -> str:
    batch = collate([scoring_prompt(tokenizer, prompt, [0])], pad_id(tokenizer), model.device)
    rows, pos, _ = batch.target_index()
    lp = log_probs_at(model, batch, rows, pos)
    return str(tokenizer.decode([int(lp[0].argmax())])).strip()


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, sentences: list[str]) -> float:
    """exp(total NLL / total predicted tokens) over the sentences."""
    nll, count = 0.0, 0
    for i in range(0, len(sentences), BATCH):
        rows = [encode(tokenizer, s)[0] for s in sentences[i : i + BATCH]]
        prompts = [
            Prompt(ids=r, subject_pos=-1, target_pos=tuple(range(len(r) - 1)),
                   target_ids=tuple(r[1:]))
            for r in rows
        ]  # fmt: skip
        batch = collate(prompts, pad_id(tokenizer), model.device)
        r, p, labels = batch.target_index()
        lp = log_probs_at(model, batch, r, p).gather(1, labels[:, None])
        nll -= float(lp.sum())
        count += len(labels)
    return math.exp(nll / count)


@dataclass
class Probe:
    """The pre-edit state the post-edit metrics compare against."""

    targets_true: list[str]
    neighborhood_prefers_true: list[bool]
    perplexity: float
    keep_next_tokens: list[int] = field(default_factory=list)


def _neighborhood_pairs(requests: list[EditRequest], truths: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for r, t in zip(requests, truths, strict=True):
        for p in r.neighborhood_prompts:
            pairs += [(p, t), (p, r.target_new)]
    return pairs


def probe(model: Any, tokenizer: Any, requests: list[EditRequest]) -> Probe:
    """Before the edit: target_true (given, or the model's greedy next token), neighborhood
    preferences and the reference perplexity."""
    truths = [
        r.target_true
        if r.target_true is not None
        else greedy_next_token(model, tokenizer, r.prompt)
        for r in requests
    ]
    lp = mean_log_probs(model, tokenizer, _neighborhood_pairs(requests, truths))
    prefers = [lp[i] > lp[i + 1] for i in range(0, len(lp), 2)]
    return Probe(
        truths,
        prefers,
        perplexity(model, tokenizer, reference_sentences()),
        next_tokens(model, tokenizer, kept_prompts(requests)),
    )


def _success(model: Any, tokenizer: Any, items: list[tuple[str, str, str]]) -> tuple[float, float]:
    """(share with P(new) > P(true), mean of P(new) − P(true)) over (prompt, new, true)."""
    if not items:
        return float("nan"), float("nan")
    pairs = [(p, t) for p, new, true in items for t in (new, true)]
    lp = mean_log_probs(model, tokenizer, pairs)
    wins = [lp[i] > lp[i + 1] for i in range(0, len(lp), 2)]
    gaps = [math.exp(lp[i]) - math.exp(lp[i + 1]) for i in range(0, len(lp), 2)]
    return sum(wins) / len(wins), sum(gaps) / len(gaps)


def evaluate(
    model: Any, tokenizer: Any, requests: list[EditRequest], before: Probe
) -> dict[str, Any]:
    """The metrics of the (edited) model against the pre-edit probe."""
    truths = before.targets_true
    eff = [(r.prompt, r.target_new, t) for r, t in zip(requests, truths, strict=True)]
    para = [
        (p, r.target_new, t)
        for r, t in zip(requests, truths, strict=True)
        for p in r.paraphrase_prompts
    ]
    efficacy, gap = _success(model, tokenizer, eff)
    paraphrase, para_gap = _success(model, tokenizer, para)
    lp = mean_log_probs(model, tokenizer, _neighborhood_pairs(requests, truths))
    prefers = [lp[i] > lp[i + 1] for i in range(0, len(lp), 2)]
    unchanged = [a == b for a, b in zip(prefers, before.neighborhood_prefers_true, strict=True)]
    ppl = perplexity(model, tokenizer, reference_sentences())
    kept = next_tokens(model, tokenizer, kept_prompts(requests))
    same = [a == b for a, b in zip(kept, before.keep_next_tokens, strict=True)]
    return {
        "efficacy": efficacy,
        "efficacy_probability_gap": gap,
        "paraphrase": paraphrase,
        "paraphrase_probability_gap": para_gap,
        "neighborhood": sum(unchanged) / len(unchanged) if unchanged else float("nan"),
        "neighborhood_prompts": len(unchanged),
        "keep_unchanged": sum(same) / len(same) if same else float("nan"),
        "keep_prompts": len(same),
        "perplexity_before": before.perplexity,
        "perplexity_after": ppl,
        "perplexity_ratio": ppl / before.perplexity,
        "targets_true": truths,
    }
