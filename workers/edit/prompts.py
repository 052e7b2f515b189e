"""Tokenised prompts with the positions an edit needs: the subject's last token (where keys
are read and values injected) and the positions whose logits predict the target."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from schemas.edit_recipe import EditRequest
from workers.errors import InputError


@dataclass(frozen=True)
class Prompt:
    """One tokenised sequence. ``subject_pos``: index of the subject's last token (or -1);
    ``target_pos``/``target_ids``: logits at target_pos[j] predict target_ids[j]."""

    ids: list[int]
    subject_pos: int
    target_pos: tuple[int, ...] = ()
    target_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Batch:
    """Token ids on the model's device; the index tensors it derives are made there too."""

    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    prompts: tuple[Prompt, ...]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(len(self.prompts), device=self.device)

    @property
    def subject_pos(self) -> torch.Tensor:
        return torch.tensor([p.subject_pos for p in self.prompts], device=self.device)

    def target_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, position, label) of every target token of every prompt."""
        rows, pos, labels = [], [], []
        for i, p in enumerate(self.prompts):
            rows += [i] * len(p.target_pos)
            pos += list(p.target_pos)
            labels += list(p.target_ids)

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        return index(rows), index(pos), index(labels)


@dataclass(frozen=True)
class SplitBatch:
    """A batch cut at each row's subject position. A vector added to a module's output at the
    subject position cannot change anything at earlier positions (attention is causal), so
    the prefixes' keys and values are computed once (:func:`workers.edit.tracing.prefix_cache`)
    and only the suffixes (subject token onwards) run at each optimisation step.

    Both halves are right-padded. The suffix of row i continues its prefix: its positions
    are ``prefix_len[i] + j`` and it attends to the prefix's real tokens only."""

    prefix_ids: torch.Tensor  # [B, P]
    prefix_mask: torch.Tensor  # [B, P]
    suffix_ids: torch.Tensor  # [B, S]
    suffix_mask: torch.Tensor  # [B, S]
    prefix_len: torch.Tensor  # [B] (= each row's subject position)

    @property
    def position_ids(self) -> torch.Tensor:
        width = self.suffix_ids.shape[1]
        return self.prefix_len[:, None] + torch.arange(width, device=self.prefix_len.device)[None]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prefix_mask, self.suffix_mask], dim=1)


def split_at_subject(batch: Batch, pad: int) -> SplitBatch:
    """``batch`` cut before each row's subject position (suffix position 0 is the subject's
    last token), on the batch's device."""
    starts = [p.subject_pos for p in batch.prompts]
    if min(starts) < 0:
        raise ValueError("every row needs a subject position")
    n = len(batch.prompts)
    width_p = max(starts)
    width_s = max(len(p.ids) - s for p, s in zip(batch.prompts, starts, strict=True))
    prefix = torch.full((n, width_p), pad, dtype=torch.long)
    prefix_mask = torch.zeros((n, width_p), dtype=torch.long)
    suffix = torch.full((n, width_s), pad, dtype=torch.long)
    suffix_mask = torch.zeros((n, width_s), dtype=torch.long)
    for i, (p, s) in enumerate(zip(batch.prompts, starts, strict=True)):
        prefix[i, :s] = torch.tensor(p.ids[:s], dtype=torch.long)
        prefix_mask[i, :s] = 1
        suffix[i, : len(p.ids) - s] = torch.tensor(p.ids[s:], dtype=torch.long)
        suffix_mask[i, : len(p.ids) - s] = 1
    parts = (prefix, prefix_mask, suffix, suffix_mask, torch.tensor(starts))
    return SplitBatch(*(t.to(batch.device) for t in parts))


def target_token_ids(tokenizer: Any, prompt: str, target: str) -> list[int]:
    """Tokens of the target as it continues the prompt (a leading space unless the prompt
    ends with whitespace)."""
    text = target.strip()
    if prompt and not prompt[-1].isspace():
        text = " " + text
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"target {target!r} tokenises to nothing", field="requests")
    return ids


def encode(
    tokenizer: Any, text: str, subject_span: tuple[int, int] | None = None
) -> tuple[list[int], int]:
    """Token ids of text (with the tokenizer's own special tokens) and the index of the last
    token overlapping the character span ``subject_span`` (-1 when None)."""
    enc = tokenizer(text, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    if subject_span is None:
        return ids, -1
    start, end = subject_span
    last = -1
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and a < end and b > start:
            last = i
    if last < 0:
        raise InputError(f"subject at characters {start}–{end} of {text!r} has no token")
    return ids, last


def subject_span(tokenizer: Any, prompt: str, subject: str) -> tuple[list[int], int, int]:
    """Token ids of the prompt (with the tokenizer's special tokens) and the first and last
    index of the tokens overlapping the subject's first occurrence."""
    at = prompt.find(subject)
    if at < 0:
        raise InputError(f"subject {subject!r} does not occur in {prompt!r}", field="requests")
    enc = tokenizer(prompt, return_offsets_mapping=True)
    inside = [
        i
        for i, (a, b) in enumerate(enc["offset_mapping"])
        if b > a and a < at + len(subject) and b > at
    ]
    if not inside:
        raise InputError(f"subject {subject!r} of {prompt!r} has no token", field="requests")
    return list(enc["input_ids"]), inside[0], inside[-1]


def subject_prompt(
    tokenizer: Any,
    template: str,
    prompt: str,
    subject: str,
    target_ids: list[int] | None = None,
    *,
    drop_last_target: bool = True,
) -> Prompt:
    """``template.format(prompt)`` (+ the target tokens, the last one dropped when training:
    nothing is predicted after it), with the subject located inside the prompt part."""
    prefix = template[: template.index("{}")]
    text = template.format(prompt)
    at = prompt.find(subject)
    if at < 0:
        raise InputError(f"subject {subject!r} does not occur in {prompt!r}", field="requests")
    ids, subj = encode(tokenizer, text, (len(prefix) + at, len(prefix) + at + len(subject)))
    if not target_ids:
        return Prompt(ids=ids, subject_pos=subj)
    tail = target_ids[:-1] if drop_last_target else target_ids
    n = len(ids)
    return Prompt(
        ids=ids + list(tail),
        subject_pos=subj,
        target_pos=tuple(n - 1 + j for j in range(len(target_ids))),
        target_ids=tuple(target_ids),
    )


def scoring_prompt(tokenizer: Any, prompt: str, target_ids: list[int]) -> Prompt:
    """A prompt followed by a target, for scoring log P(target | prompt) (no subject)."""
    ids, _ = encode(tokenizer, prompt)
    n = len(ids)
    return Prompt(
        ids=ids + target_ids[:-1],
        subject_pos=-1,
        target_pos=tuple(n - 1 + j for j in range(len(target_ids))),
        target_ids=tuple(target_ids),
    )


def collate(prompts: list[Prompt], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Right-padded batch on ``device`` (the model's): positions of real tokens are the same
    as unpadded."""
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p.ids)] = torch.tensor(p.ids)
        mask[i, : len(p.ids)] = 1
    return Batch(ids.to(device), mask.to(device), tuple(prompts))


def pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def kept_prompts(requests: Sequence[EditRequest]) -> list[str]:
    """The distinct ``keep_prompts`` of the requests, in order of first appearance."""
    return list(dict.fromkeys(p for r in requests for p in r.keep_prompts))
