"""Forward hooks: read a module's input/output at chosen positions, add a vector to its
output, stop the forward pass after the last module of interest, and compute logits only
where a loss needs them."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from workers.edit.prompts import Batch, SplitBatch


class StopForward(Exception):
    """Raised from a hook once everything needed has been captured."""


def _tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace(out: Any, t: torch.Tensor) -> Any:
    return (t, *out[1:]) if isinstance(out, tuple) else t


def module_io(
    model: Any,
    module_name: str,
    batch: Batch | SplitBatch,
    rows: torch.Tensor,
    pos: torch.Tensor,
    *,
    prefix: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [n, d_in], outputs [n, d_out]) of a module at (rows[i], pos[i]), in float32;
    the forward pass stops right after the module. For a split batch the positions are
    suffix positions and ``prefix`` is its cache."""
    return input_and_output(model, module_name, module_name, batch, rows, pos, prefix=prefix)


@torch.no_grad()
def input_and_output(
    model: Any,
    input_of: str,
    output_of: str,
    batch: Batch | SplitBatch,
    rows: torch.Tensor,
    pos: torch.Tensor,
    *,
    prefix: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs of ``input_of``, outputs of ``output_of``) at (rows[i], pos[i]) in float32, in
    one forward pass that stops after ``output_of`` (which must run after ``input_of``, or be
    the same module)."""
    got: dict[str, torch.Tensor] = {}

    def read_input(_m: Any, args: tuple[Any, ...]) -> None:
        got["in"] = args[0][rows, pos].float()

    def read_output(_m: Any, _args: tuple[Any, ...], out: Any) -> None:
        got["out"] = _tensor(out)[rows, pos].float()
        raise StopForward

    handles = [
        model.get_submodule(input_of).register_forward_pre_hook(read_input),
        model.get_submodule(output_of).register_forward_hook(read_output),
    ]
    inputs = inputs_of(batch, prefix)
    try:
        model(**inputs, use_cache=_CACHE_ARG in inputs)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if "in" not in got:
        raise ValueError(f"{output_of} ran before {input_of}")
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


def inputs_of(batch: Batch | SplitBatch, prefix: Any = None) -> dict[str, Any]:
    """Forward keyword arguments: a whole batch, or the suffixes of a split batch after its
    cached prefixes (``prefix`` from :func:`prefix_cache`; copied, a forward appends to it)."""
    if isinstance(batch, Batch):
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if prefix is None:  # every subject at position 0: nothing before it
        return {
            "input_ids": batch.suffix_ids,
            "attention_mask": batch.suffix_mask,
            "position_ids": batch.position_ids,
        }
    return {
        "input_ids": batch.suffix_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
        _CACHE_ARG: copy.deepcopy(prefix),
    }


def _cache_arg() -> str:
    """Newer transformers call ``past_key_values`` (argument and output field) ``cache``."""
    from transformers import LlamaModel

    params = inspect.signature(LlamaModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_CACHE_ARG = _cache_arg()


def decode_step(model: Any, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """One incremental step of the decoder: ``ids`` [B, n] after the tokens in ``cache``
    (None at the start, no padding). Returns the last position's final hidden state [B, d]
    and the grown cache."""
    out = model.base_model(input_ids=ids, use_cache=True, **{_CACHE_ARG: cache})
    return out.last_hidden_state[:, -1], getattr(out, _CACHE_ARG)


@torch.no_grad()
def prefix_cache(model: Any, batch: SplitBatch) -> Any:
    """The key/value cache of the split batch's prefixes (None when they are all empty).

    The prefixes run unmasked: they are right-padded, so a real token only attends to real
    tokens before it and its keys and values are exact; the pad positions' are finite and
    masked out when the suffixes attend to the cache."""
    if batch.prefix_ids.shape[1] == 0:
        return None
    out = model.base_model(input_ids=batch.prefix_ids, use_cache=True)
    return getattr(out, _CACHE_ARG)


def log_probs_at(
    model: Any,
    batch: Batch | SplitBatch,
    rows: torch.Tensor,
    pos: torch.Tensor,
    *,
    loss_layer: int | None = None,
    prefix: Any = None,
) -> torch.Tensor:
    """log-softmax of the next-token logits at (rows[i], pos[i]) only: the final norm and
    lm_head run on those hidden states alone (the full-vocabulary projection at every
    position would dominate the cost of a small model's v* optimisation). For a split batch
    the positions are suffix positions and ``prefix`` is its cache."""
    base = model.base_model
    inputs = inputs_of(batch, prefix)
    use_cache = _CACHE_ARG in inputs
    if loss_layer is None:
        h = base(**inputs, use_cache=use_cache).last_hidden_state[rows, pos]
    else:
        hs = base(**inputs, use_cache=use_cache, output_hidden_states=True).hidden_states
        h = _final_norm(base)(hs[loss_layer + 1][rows, pos])
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-2: the model's own logits are cap · tanh(logits / cap)
        logits = cap * torch.tanh(logits / cap)
    return torch.log_softmax(logits, dim=-1)


def _final_norm(base: Any) -> Any:
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise ValueError(f"no final norm found on {type(base).__name__}")
