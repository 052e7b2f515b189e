"""Where an edit writes, per architecture: one table, no guessing.

The edited weight is the MLP output projection of a layer; its input at the subject's last
token is the key, its output the value (ROME §3, MEMIT §4). Each method's default layers
are the published ones for Llama-2-7B (32 layers) scaled to the model's depth
(:func:`scaled_layer`).

Each row is one module layout; the model types that share it are listed on it (names as
transformers 5 builds the ``*ForCausalLM`` classes). Phi-3 fuses gate/up and q/k/v, but its
down projection, the edited module, is a plain nn.Linear whose input is the key, as in
Llama. Gemma-2, Gemma-3 (text) and OLMo-2 normalise the MLP's output before adding it to
the residual stream (``post_mlp_norm``): ROME's algebra is about the projection's output
and still holds; MEMIT's spreading of a residual-stream target does not (docs/editing.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from workers.errors import CancelledError, InputError


@dataclass(frozen=True)
class EditArchitecture:
    """Module paths of one architecture family (``{}`` is the layer index)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str  # the list of decoder layers (MEMIT's residual stream is their output)
    mlp_out: str  # the edited module
    transposed: bool  # weight stored [in, out] (GPT-2 Conv1D) instead of nn.Linear's [out, in]
    num_layers_key: str  # config attribute with the number of layers
    # the norm applied to the edited module's output before the residual add, if any
    post_mlp_norm: str | None = None
    # What feeds a layer's key (the edited module's input), for the covariance cache key
    # (:func:`feeding_tensors`): modules after the last layer (final norm, output head)
    # never do; in the key's own layer the modules in ``after_key`` run after it; with the
    # config flag ``parallel_mlp`` set, the MLP reads the layer's input beside attention,
    # so the layer's ``attention_path`` does not feed it either.
    head: tuple[str, ...] = ("model.norm", "lm_head")
    after_key: tuple[str, ...] = ("mlp.down_proj",)
    parallel_mlp: str | None = None
    attention_path: tuple[str, ...] = ()

    def module_name(self, layer: int) -> str:
        return self.mlp_out.format(layer)

    def weight_name(self, layer: int) -> str:
        return self.module_name(layer) + ".weight"

    def block_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def oriented(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` moved between nn.Linear's [d_out, d_in] and the stored orientation: a
        transpose for Conv1D (its own inverse), ``t`` itself otherwise."""
        return t.T if self.transposed else t


ARCHITECTURES: tuple[EditArchitecture, ...] = (
    EditArchitecture(
        name="llama",
        # Llama 1–3.x (RoPE scaling changes attention only), Mistral, Qwen2, Qwen3 (q/k
        # norms), Gemma (scaled embeddings, (1 + w) norms), Phi-3 (fused gate_up_proj)
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"),
        blocks="model.layers",
        mlp_out="model.layers.{}.mlp.down_proj",
        transposed=False,
        num_layers_key="num_hidden_layers",
    ),
    EditArchitecture(
        name="post-norm",
        # the MLP output goes through post_feedforward_layernorm before the residual add
        model_types=("gemma2", "gemma3_text", "olmo2"),
        blocks="model.layers",
        mlp_out="model.layers.{}.mlp.down_proj",
        transposed=False,
        num_layers_key="num_hidden_layers",
        post_mlp_norm="model.layers.{}.post_feedforward_layernorm",
        after_key=("mlp.down_proj", "post_feedforward_layernorm"),
    ),
    EditArchitecture(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        mlp_out="transformer.h.{}.mlp.c_proj",
        transposed=True,
        num_layers_key="n_layer",
        head=("transformer.ln_f", "lm_head"),
        after_key=("mlp.c_proj",),
    ),
    EditArchitecture(
        name="gpt_neox",
        # Pythia and GPT-NeoX: the MLP (dense_4h_to_h, with a bias) and attention read the
        # same residual in parallel by default; either way the MLP output is added as is
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        transposed=False,
        num_layers_key="num_hidden_layers",
        head=("gpt_neox.final_layer_norm", "embed_out"),
        after_key=("mlp.dense_4h_to_h",),
        parallel_mlp="use_parallel_residual",
        attention_path=("input_layernorm", "attention"),
    ),
)

# Depth of the model the published default layers are for (Llama-2-7B).
_REFERENCE_DEPTH = 32

# MEMIT's λ for Llama-2-7B, whose down_proj keys are 11,008 wide.
_REFERENCE_LAMBDA = 15000.0
_REFERENCE_KEY_WIDTH = 11008


def supported_model_types() -> list[str]:
    return [t for a in ARCHITECTURES for t in a.model_types]


def architecture_for(config: Any, *, model: str | None = None) -> EditArchitecture:
    """The table row for a transformers config; InputError naming the supported types."""
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise InputError(
        f"cannot edit architecture {model_type!r}: supported model types are "
        f"{', '.join(supported_model_types())}",
        model=model,
    )


def num_layers(arch: EditArchitecture, config: Any) -> int:
    return int(getattr(config, arch.num_layers_key))


def feeding_tensors(
    arch: EditArchitecture, config: Any, names: Iterable[str], layer: int
) -> list[str]:
    """The stored tensors (of ``names``) that the key of ``layer`` is computed from: the
    embeddings, every earlier layer, and ``layer``'s own tensors that run before its key.
    A tensor outside the decoder layers counts unless the table says it comes after them
    (so an unknown one makes the cache miss rather than hit wrongly)."""
    prefix = arch.blocks + "."
    own = f"{prefix}{layer}."
    skipped = arch.after_key
    if arch.parallel_mlp is not None and getattr(config, arch.parallel_mlp, False):
        skipped = (*skipped, *arch.attention_path)

    def under(name: str, modules: Iterable[str]) -> bool:
        return any(name == m or name.startswith(m + ".") for m in modules)

    out = []
    for name in names:
        if not name.startswith(prefix):
            if not under(name, arch.head):
                out.append(name)
            continue
        index = name[len(prefix) :].split(".", 1)[0]
        earlier = not index.isdigit() or int(index) < layer
        if earlier or (name.startswith(own) and not under(name[len(own) :], skipped)):
            out.append(name)
    return sorted(out)


def scaled_layer(layer: int, depth: int) -> int:
    """A published layer index of the 32-layer Llama-2-7B at the same relative depth of a
    model with ``depth`` layers."""
    return min(depth - 1, max(0, round(layer * depth / _REFERENCE_DEPTH)))


def default_mom2_update_weight(d_in: int) -> float:
    """MEMIT's λ scaled by the key width d_in.

    C is the mean of kkᵀ over the corpus, so kᵀC⁻¹k averages d_in over corpus keys, and
    the share of a request's residual that ΔW = R Kᵀ(λC + KKᵀ)⁻¹ writes for a key is
    s / (1 + s) with s = kᵀ(λC)⁻¹k ≈ d_in / λ. Holding d_in / λ at the published setting
    holds that share; λ = 15,000 unscaled writes about a tenth of it on a 1,536-wide key."""
    return _REFERENCE_LAMBDA * d_in / _REFERENCE_KEY_WIDTH


@dataclass(frozen=True)
class EditModel:
    """The model under edit: a transformers causal LM (eval mode; float32 on the CPU, its
    stored dtype on a GPU: ``workers.edit.engine.load_dtype``), its tokenizer and its row of
    the architecture table."""

    model: Any
    tokenizer: Any
    arch: EditArchitecture

    @property
    def device(self) -> torch.device:
        """Where the model computes; every tensor the edit makes goes there."""
        return torch.device(self.model.device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in."""
        dtype: torch.dtype = self.model.dtype
        return dtype

    @property
    def depth(self) -> int:
        return num_layers(self.arch, self.model.config)

    def weight(self, layer: int) -> torch.nn.Parameter:
        """The weight an edit of ``layer`` writes, in its stored orientation."""
        w: torch.nn.Parameter = self.model.get_submodule(self.arch.module_name(layer)).weight
        return w

    def key_width(self, layer: int) -> int:
        """d_in of the edited module of ``layer``: the width of its keys."""
        return int(self.arch.oriented(self.weight(layer)).shape[1])

    @torch.no_grad()
    def apply(self, layer: int, delta: torch.Tensor) -> None:
        """W ← W + ΔW in place (ΔW in nn.Linear orientation, [d_out, d_in]), added in float32
        and rounded once to W's dtype: the same bytes the written checkpoint gets for a
        bf16/fp16 model (``workers.edit.checkpoint``); for float32 weights, W + ΔW itself."""
        w = self.weight(layer)
        w.copy_((w.float() + self.arch.oriented(delta).to(w.device, torch.float32)).to(w.dtype))

    @contextmanager
    def cancel_points(self, cancelled: Callable[[], bool] | None) -> Iterator[None]:
        """While active, ``cancelled()`` is checked before every decoder layer's forward
        (CancelledError when it says so): every forward pass of an edit (sampling,
        statistics, v* optimisation, probes) stops within one layer's compute."""
        if cancelled is None:
            yield
            return

        def check(_m: Any, _args: tuple[Any, ...]) -> None:
            if cancelled():
                raise CancelledError("the job was cancelled")

        blocks = self.model.get_submodule(self.arch.blocks)
        handles = [block.register_forward_pre_hook(check) for block in blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def restored(self, layers: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Copies of the weights of ``layers`` (stored orientation); whatever happens inside,
        the weights are copied back on exit, bit for bit."""
        originals = {layer: self.weight(layer).detach().clone() for layer in layers}
        try:
            yield originals
        finally:
            with torch.no_grad():
                for layer, w in originals.items():
                    self.weight(layer).copy_(w)
