"""A plain re-implementation of the causal trace of ``layers: auto`` (ROME §2), to test
``workers.edit.causal_trace`` against: one sequence per forward pass, a float64 copy of the
model, transformers forward hooks, the full logits, and no batching, caching or position
bookkeeping shared with the code under test.

The protocol, as docs/editing.md states it: the noise is ``torch.randn(samples, subject
tokens, width)`` from a generator seeded with ``seed``, times ``noise`` × the std of every
entry of the input embedding matrix; each corrupted run adds draw j to the subject's token
embeddings; a restored run also sets one layer's MLP output at the subject's last token to
its clean value; P is the softmax probability of the answer token at the last position.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ReferenceTrace:
    answer: int
    p_clean: float
    p_corrupted: float
    p_restored: list[float]

    @property
    def effects(self) -> list[float]:
        return [p - self.p_corrupted for p in self.p_restored]


def subject_tokens(tokenizer: Any, prompt: str, subject: str) -> tuple[list[int], list[int]]:
    """(token ids, indices of the tokens whose characters overlap the subject)."""
    start = prompt.index(subject)
    stop = start + len(subject)
    enc = tokenizer(prompt, return_offsets_mapping=True)
    inside = [
        i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < stop and b > start and b > a
    ]
    return list(enc["input_ids"]), inside


@torch.no_grad()
def reference_trace(
    model: Any,
    mlp_names: list[str],
    tokenizer: Any,
    prompt: str,
    subject: str,
    answer: int | None,
    *,
    samples: int,
    noise: float,
    seed: int,
) -> ReferenceTrace:
    """The trace of one prompt, in float64. ``answer``: the token measured (None: the clean
    run's most likely next token)."""
    m = copy.deepcopy(model).double().eval()
    ids, subj = subject_tokens(tokenizer, prompt, subject)
    x = torch.tensor([ids])
    last = subj[-1]
    embed = m.get_input_embeddings()
    std = float(embed.weight.std()) * noise
    draws = torch.randn(
        samples, len(subj), embed.weight.shape[1], generator=torch.Generator().manual_seed(seed)
    )
    draws = draws.double() * std

    def out_of(o: Any) -> torch.Tensor:
        return o[0] if isinstance(o, tuple) else o

    # clean run
    clean: dict[str, torch.Tensor] = {}
    handles = []
    for name in mlp_names:

        def save(_m: Any, _a: Any, o: Any, name: str = name) -> None:
            clean[name] = out_of(o)[0, last].clone()

        handles.append(m.get_submodule(name).register_forward_hook(save))
    probs = torch.softmax(m(x).logits[0, -1], dim=-1)
    for h in handles:
        h.remove()
    if answer is None:
        answer = int(probs.argmax())
    p_clean = float(probs[answer])

    def run(j: int, restore: str | None) -> float:
        def corrupt(_m: Any, _a: Any, o: torch.Tensor) -> torch.Tensor:
            o = o.clone()
            for k, pos in enumerate(subj):
                o[0, pos] = o[0, pos] + draws[j, k]
            return o

        def put_back(_m: Any, _a: Any, o: Any) -> Any:
            h = out_of(o).clone()
            h[0, last] = clean[str(restore)]
            return (h, *o[1:]) if isinstance(o, tuple) else h

        hs = [embed.register_forward_hook(corrupt)]
        if restore is not None:
            hs.append(m.get_submodule(restore).register_forward_hook(put_back))
        p = float(torch.softmax(m(x).logits[0, -1], dim=-1)[answer])
        for h in hs:
            h.remove()
        return p

    p_corrupted = sum(run(j, None) for j in range(samples)) / samples
    p_restored = [sum(run(j, name) for j in range(samples)) / samples for name in mlp_names]
    return ReferenceTrace(answer, p_clean, p_corrupted, p_restored)
