"""The routers' initial weights: one row per expert and layer, from the experts' prompts.

mergekit-moe's three gate modes (mergekit/moe/router.py), each giving a (layers, experts +
shared experts, hidden) float32 tensor: slice ``[l, :E]`` is layer l's router (Mixtral's
``block_sparse_moe.gate.weight``, Qwen2-MoE's ``mlp.gate.weight``), ``[l, E:]`` the shared
expert's sigmoid gate (Qwen2-MoE's ``mlp.shared_expert_gate.weight``), made the same way:

- ``hidden`` (mergekit's default, = ``hidden_last``) and ``hidden_avg``: the base model
  runs on each prompt (BOS when the tokenizer has one + the prompt's tokens, one prompt at a
  time, so no padding enters). For layer l, h_l(p) is ``hidden_states[l]`` — the residual
  stream entering layer l (embeddings for l = 0), which is what mergekit takes
  (``output.hidden_states[:-1]``) — at the prompt's last token (``hidden``, ``hidden_last``)
  or its mean over the prompt's tokens (``hidden_avg``). The expert's row is

      g_l = (mean_p h_l(p) over positive prompts − mean_p h_l(p) over negative prompts)
            / ‖ · ‖₂

  mergekit runs the prompts as one padded batch, so its "last token" is a pad for the
  shorter prompts when the tokenizer pads on the right, and its average counts the pads;
  here each prompt's own tokens are used (the same result for prompts of equal length, or
  left padding for ``hidden``). A router logit is then the cosine-like similarity of a
  token's state with the expert's prompts.
- ``cheap_embed``: e(P) = Σ of the token embeddings of every token of the prompts P,
  normalised; the row is (e(positive) − e(negative)) / ‖ · ‖₂, the same for every layer.
- ``random``: standard normal entries from a generator seeded with the recipe's ``seed``.

Only ``hidden`` loads a whole model: the base, once — in its stored dtype on a GPU, in float32
on the CPU (memory: its parameters at that width plus one prompt's activations); the means
accumulate in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from schemas.moe_recipe import MoeRecipe
from workers.errors import CancelledError, InputError
from workers.merge.inputs import TensorSource

_EMBED_SUFFIX = "embed_tokens.weight"


def load_tokenizer(base_path: Path, label: str) -> Any:
    from transformers import AutoTokenizer

    folder = base_path if base_path.is_dir() else base_path.parent
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many kinds for missing or bad files
        raise InputError(
            f"its tokenizer cannot be loaded ({type(e).__name__}: {str(e)[:200]}); gate_mode "
            "hidden and cheap_embed tokenize the experts' prompts with the base's tokenizer",
            field="base_model",
            model=label,
        ) from None


def prompt_ids(tokenizer: Any, prompt: str, field: str, max_tokens: int | None) -> list[int]:
    """BOS (when the tokenizer has one) and the prompt's tokens, as mergekit tokenizes them."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InputError(f"the prompt {prompt[:60]!r} has no tokens", field=field)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[0] != bos:
        ids = [int(bos), *ids]
    if max_tokens is not None and len(ids) > max_tokens:
        raise InputError(
            f"the prompt has {len(ids)} tokens, more than the base's max_position_embeddings "
            f"({max_tokens}); shorten it",
            field=field,
        )
    return ids


def _normalised(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def random_gates(recipe: MoeRecipe, layers: int, hidden: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(recipe.seed)
    shape = (layers, len(recipe.gated()), hidden)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def cheap_embed_gates(
    recipe: MoeRecipe, tokenizer: Any, base: TensorSource, layers: int
) -> torch.Tensor:
    names = [n for n in base.names if n.endswith(_EMBED_SUFFIX)]
    if not names:
        raise InputError(
            f"gate_mode cheap_embed needs the token embeddings (a tensor ending in "
            f"'{_EMBED_SUFFIX}'), which the base lacks",
            field="gate_mode",
            model=base.label,
        )
    embed = base.read(names[0])  # stored dtype: only the prompts' rows go to float64
    rows = embed.shape[0]

    def embedded(prompts: Sequence[str], field: str) -> torch.Tensor:
        total = torch.zeros(embed.shape[1], dtype=torch.float64)
        for j, p in enumerate(prompts):
            ids = prompt_ids(tokenizer, p, f"{field}[{j}]", None)
            if max(ids) >= rows:
                raise InputError(
                    f"the prompt has token id {max(ids)} but the embeddings have {rows} rows: "
                    "the tokenizer does not belong to the base",
                    field=f"{field}[{j}]",
                    tensor=names[0],
                )
            total += embed[ids].to(torch.float64).sum(dim=0)
        return _normalised(total)

    out = []
    for field, e in recipe.gated():
        v = embedded(e.positive_prompts or [], f"{field}.positive_prompts")
        if e.negative_prompts:
            v = v - embedded(e.negative_prompts, f"{field}.negative_prompts")
        out.append(_normalised(v))
    return torch.stack(out).float().unsqueeze(0).repeat(layers, 1, 1)


def hidden_gates(
    recipe: MoeRecipe,
    tokenizer: Any,
    base_path: Path,
    label: str,
    layers: int,
    device: torch.device,
    is_cancelled: Callable[[], bool],
    on_prompt: Callable[[], None],
) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    folder = base_path if base_path.is_dir() else base_path.parent
    try:
        # the stored dtype on a GPU; float32 on the CPU, whose half-precision matmuls are
        # many times slower (and the means are accumulated in float64 either way)
        dtype = "auto" if device.type == "cuda" else torch.float32
        # safetensors only, as the tensor readers: never a pickle checkpoint next to them
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
        model.to(device)  # type: ignore[arg-type]
    except Exception as err:  # transformers raises many kinds for a model it cannot build
        raise InputError(
            f"the base cannot be loaded with transformers to compute hidden states "
            f"({type(err).__name__}: {str(err)[:200]}); use gate_mode cheap_embed or random",
            field="base_model",
            model=label,
        ) from None
    model.eval()
    max_tokens = getattr(model.config, "max_position_embeddings", None)

    last = recipe.gate_mode != "hidden_avg"

    def mean_states(prompts: Sequence[str], field: str) -> torch.Tensor:
        """(layers, hidden) float64: the mean over prompts of each prompt's last token's
        state (hidden, hidden_last) or of its mean over its tokens (hidden_avg)."""
        total: torch.Tensor | None = None
        for j, p in enumerate(prompts):
            if is_cancelled():
                raise CancelledError("the job was cancelled")
            ids = prompt_ids(tokenizer, p, f"{field}[{j}]", max_tokens)
            with torch.no_grad():
                out = model(
                    input_ids=torch.tensor([ids], device=device),
                    output_hidden_states=True,
                    use_cache=False,
                )
            states = out.hidden_states[:-1]  # the input of each layer; the last is after norm
            if len(states) != layers:
                raise InputError(
                    f"the model returned {len(states)} layer inputs for {layers} layers",
                    field="base_model",
                    model=label,
                )
            means = (
                torch.stack(
                    [h[0, -1] if last else h[0].to(torch.float64).mean(dim=0) for h in states]
                )
                .to(torch.float64)
                .cpu()
            )
            total = means if total is None else total + means
            on_prompt()
        assert total is not None  # the recipe requires at least one positive prompt
        return total / len(prompts)

    out = []
    for field, e in recipe.gated():
        v = mean_states(e.positive_prompts or [], f"{field}.positive_prompts")
        if e.negative_prompts:
            v = v - mean_states(e.negative_prompts, f"{field}.negative_prompts")
        out.append(_normalised(v))
    return torch.stack(out, dim=1).float()  # (layers, experts + shared, hidden)


def prompt_count(recipe: MoeRecipe) -> int:
    """Forward passes of gate_mode hidden (for progress)."""
    lists = [(e.positive_prompts or [], e.negative_prompts or []) for _, e in recipe.gated()]
    return sum(len(p) + len(n) for p, n in lists)


def condition_numbers(gates: torch.Tensor) -> list[float]:
    """Per layer, the condition number of the (experts, hidden) router matrix: large when
    rows are nearly parallel (mergekit warns above 5: experts will be underused)."""
    return [float(torch.linalg.cond(g.double())) for g in gates]
