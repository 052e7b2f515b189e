"""Forward hooks: read a module's input/output at chosen positions, add a vector to its
output, stop the forward pass after the last module of interest, and compute logits only
where a loss needs them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from workers.edit.prompts import Batch


class StopForward(Exception):
    """Raised from a hook once everything needed has been captured."""


def _tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace(out: Any, t: torch.Tensor) -> Any:
    return (t, *out[1:]) if isinstance(out, tuple) else t


@torch.no_grad()
def module_io(
    model: Any, module_name: str, batch: Batch, rows: torch.Tensor, pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [n, d_in], outputs [n, d_out]) of a module at (rows[i], pos[i]), in float32;
    the forward pass stops right after the module."""
    module = model.get_submodule(module_name)
    got: dict[str, torch.Tensor] = {}

    def hook(_m: Any, args: tuple[Any, ...], out: Any) -> None:
        got["in"] = args[0][rows, pos].float()
        got["out"] = _tensor(out)[rows, pos].float()
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return got["in"], got["out"]


@contextmanager
def add_to_output(
    model: Any, module_name: str, rows: torch.Tensor, pos: torch.Tensor, delta: torch.Tensor
) -> Iterator[None]:
    """While active, the module's output at (rows[i], pos[i]) gets + delta[i] (or + delta
    for a single vector)."""
    module = model.get_submodule(module_name)

    def hook(_m: Any, _args: tuple[Any, ...], out: Any) -> Any:
        h = _tensor(out)
        mask = torch.zeros((*h.shape[:2], 1), dtype=h.dtype, device=h.device)
        mask[rows, pos] = 1
        if delta.dim() == 1:
            add = mask * delta.to(h.dtype)
        else:
            add = torch.zeros_like(h)
            add = add.index_put((rows, pos), delta.to(h.dtype))
        return _replace(out, h + add)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def log_probs_at(
    model: Any,
    batch: Batch,
    rows: torch.Tensor,
    pos: torch.Tensor,
    *,
    loss_layer: int | None = None,
) -> torch.Tensor:
    """log-softmax of the next-token logits at (rows[i], pos[i]) only: the final norm and
    lm_head run on those hidden states alone (the full-vocabulary projection at every
    position would dominate the cost of a small model's v* optimisation)."""
    base = model.base_model
    if loss_layer is None:
        h = base(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state[rows, pos]
    else:
        hs = base(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            output_hidden_states=True,
        ).hidden_states
        h = _final_norm(base)(hs[loss_layer + 1][rows, pos])
    logits = model.get_output_embeddings()(h).float()
    return torch.log_softmax(logits, dim=-1)


def _final_norm(base: Any) -> Any:
    for name in ("norm", "ln_f", "final_layernorm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise ValueError(f"no final norm found on {type(base).__name__}")
