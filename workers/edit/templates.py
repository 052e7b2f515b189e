"""Context templates: "{}" plus short prefixes sampled from the model itself (ROME §3.1:
keys and values are averaged over contexts so the edit holds in any context)."""

from __future__ import annotations

from typing import Any

import torch

from workers.devices import seeded
from workers.edit.prompts import pad_id

START_WORDS = ("The", "Therefore", "Because", "I", "You")
TOP_K = 5


@torch.no_grad()
def context_templates(
    model: Any, tokenizer: Any, counts: list[tuple[int, int]], seed: int
) -> list[str]:
    """["{}"] + for each (n, length): n prefixes of ``length`` sampled tokens (top-k 5,
    seeded, the global RNG untouched), each followed by ". {}". Sampled on the model's
    device: a GPU's generator draws other prefixes than the CPU's for the same seed."""
    templates = ["{}"]
    for g, (n, length) in enumerate(counts):
        if n == 0:
            continue
        starts = [START_WORDS[i % len(START_WORDS)] for i in range(n)]
        enc = [tokenizer(w)["input_ids"] for w in starts]
        for width in sorted({len(e) for e in enc}):
            idx = [i for i, e in enumerate(enc) if len(e) == width]
            ids = torch.tensor([enc[i] for i in idx], device=model.device)
            with seeded(seed * 1000 + g * 100 + width, model.device):
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    top_k=TOP_K,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=length,
                    min_new_tokens=length,
                    pad_token_id=pad_id(tokenizer),
                )
            for row in out:
                text = tokenizer.decode(row, skip_special_tokens=True)
                text = text.replace("{", " ").replace("}", " ").strip()
                templates.append(text + ". {}")
    return templates
