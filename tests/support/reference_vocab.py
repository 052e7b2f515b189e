"""A plain re-implementation of mergekit 0.1.5's vocabulary alignment, for the tests.

Written from mergekit's rules (tokenizer/embed.py), token by token with Python loops, as
independent of workers/merge/vocabulary.py as possible: given each input's vocabulary
(token → row), its stored tensor and the output vocabulary, the rows each input presents
to the merge method.
"""

from __future__ import annotations

from typing import Any

import torch


def expected_rows(
    out_vocab: dict[str, int],
    rows: int,
    inputs: list[tuple[str, dict[str, int], torch.Tensor]],
    *,
    base: str | None = None,
    tokens: dict[str, dict[str, Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """``inputs``: (name, vocabulary, tensor) in mergekit's order; ``tokens``: the recipe's
    ``tokenizer.tokens`` with model sources given as input names. Returns name → tensor of
    ``rows`` rows (all float32 inputs)."""
    tokens = tokens or {}
    names = [n for n, _, _ in inputs]
    vocab = {n: v for n, v, _ in inputs}
    tensor = {n: t for n, _, t in inputs}
    width = inputs[0][2].shape[1]

    def has(n: str, tok: str) -> bool:
        return tok in vocab[n] and vocab[n][tok] < tensor[n].shape[0]

    def listed(tok: str) -> torch.Tensor:
        src = tokens[tok]["source"]
        if isinstance(src, dict) and src["kind"] == "zero":
            return torch.zeros(width)
        if isinstance(src, dict):  # model_token
            m = src["model"]
            row = src["token_id"] if "token_id" in src else vocab[m][src["token"]]
            return tensor[m][row].clone()
        return tensor[src][vocab[src][tok]].clone()

    fill: dict[str, torch.Tensor] = {}
    for tok in out_vocab:
        holders = [n for n in names if has(n, tok)]
        cfg = tokens.get(tok)
        if cfg is not None and cfg.get("source") is not None:
            if cfg.get("force") or len(holders) < len(names):
                fill[tok] = listed(tok)
            continue
        if len(holders) == len(names):
            continue
        if len(holders) == 1:
            fill[tok] = tensor[holders[0]][vocab[holders[0]][tok]].clone()
        elif not holders:
            fill[tok] = torch.zeros(width)
        elif base is not None and base in holders:
            fill[tok] = tensor[base][vocab[base][tok]].clone()
        else:
            total = torch.zeros(width)
            for n in holders:
                total = total + tensor[n][vocab[n][tok]]
            fill[tok] = total / len(holders)

    out = {}
    for n in names:
        new = torch.zeros(rows, width)
        for tok, i in out_vocab.items():
            forced = tokens.get(tok, {}).get("force", False)
            if has(n, tok) and not forced:
                new[i] = tensor[n][vocab[n][tok]]
            else:
                new[i] = fill[tok]
        if rows > len(out_vocab):
            mean = new[: len(out_vocab)].mean(dim=0)
            for i in range(len(out_vocab), rows):
                new[i] = mean
        out[n] = new
    return out
