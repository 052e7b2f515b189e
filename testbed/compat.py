"""The mergekit compatibility set: recipes shaped like the ones people run, on tiny models.

Each recipe is written like a real one (mergekit 0.1.5's ``examples/``, the LazyMergekit
templates, frankenmerges, LoRA inputs, different vocabularies), scaled to the 4-layer tiny
Llama (3-layer GPT-2) of :mod:`testbed.tiny_models`. Model names are ``$``-placeholders
(``$base``, ``$ft1`` … ``$ft3``, ``$lora1`` for a PEFT adapter of ``$base``, ``$alt1`` for a
fine-tune with a vocabulary of its own) filled in with the paths of one *family* of
checkpoints, stored in the dtype the recipe's original asks for (``dtype: float16`` recipes
run on float16 checkpoints, as they would in practice).

``tests/test_mergekit_compat.py`` checks that weightsmith accepts and merges each one;
``bench/mergekit_compat.py`` runs each through weightsmith and mergekit 0.1.5 and compares.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import yaml

# family name → (kind, storage dtype, seed, fine-tunes)
FAMILIES: dict[str, tuple[str, str, int, int]] = {
    "llama": ("llama", "float32", 11, 3),
    "llama-fp16": ("llama", "float16", 12, 3),
    "llama-bf16": ("llama", "bfloat16", 13, 3),
    "gpt2": ("gpt2", "float32", 22, 2),
}
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
BUILD_VERSION = 1  # bump when the models change, so caches are rebuilt


@dataclass(frozen=True)
class CompatRecipe:
    """One recipe of the set.

    ``random``: the method draws at random (DARE, DELLA): compared by tensor names, shapes
    and dtypes only. ``pending``: weightsmith refuses it for now, for the reason given.
    ``layers``: the output's layer count. ``difference``: a documented, deliberate
    difference from mergekit that the comparison may show (docs/merge-methods.md).
    ``ulp_tol``: float32 rounding allowed against mergekit, in ulps of the operands.
    """

    name: str
    shaped_like: str
    family: str
    text: str
    layers: int = 4
    random: bool = False
    pending: str | None = None
    difference: str | None = None
    ulp_tol: float = 4.0  # float32 outputs: the rounding allowed, in ulps of the operands

    def render(self, paths: dict[str, Path], **overrides: Any) -> dict[str, Any]:
        """The recipe with the family's paths filled in (``overrides`` set top-level keys;
        a value None removes the key)."""
        text = Template(self.text).substitute({k: str(v) for k, v in paths.items()})
        recipe = yaml.safe_load(text)
        for key, value in overrides.items():
            if value is None:
                recipe.pop(key, None)
            else:
                recipe[key] = value
        return recipe

    @property
    def dtype(self) -> str | None:
        return yaml.safe_load(self.text).get("dtype")


def _r(name: str, shaped_like: str, family: str, text: str, **kw: Any) -> CompatRecipe:
    return CompatRecipe(name, shaped_like, family, text.strip() + "\n", **kw)


_FP_MATH = "mergekit computes this method in the working dtype (fp16/bf16), we in float32"

RECIPES: tuple[CompatRecipe, ...] = (
    # ---- mergekit 0.1.5 examples/ ---------------------------------------------------------
    _r(
        "ex_linear",
        "mergekit examples/linear.yml",
        "llama-fp16",
        """
models:
  - model: $ft1
    parameters: {weight: 1.0}
  - model: $ft2
    parameters: {weight: 0.3}
  - model: $ft3
    parameters: {weight: 0.5}
merge_method: linear
dtype: float16
""",
    ),
    _r(
        "ex_ties",
        "mergekit examples/ties.yml",
        "llama-fp16",
        """
models:
  - model: $ft1
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: $ft2
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: $ft3
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: $base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
        difference=_FP_MATH + "; equal |τ| at the top-k cut kept in another order",
    ),
    _r(
        "ex_bio_merge",
        "mergekit examples/bio-merge.yml",
        "llama-fp16",
        """
models:
  - model: $ft1
    parameters: {density: 0.5, weight: 0.5}
  - model: $ft2
    parameters: {density: 0.5, weight: 0.5}
merge_method: ties
base_model: $base
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
        difference=_FP_MATH + "; equal |τ| at the top-k cut kept in another order",
    ),
    _r(
        "ex_gradient_slerp",
        "mergekit examples/gradient-slerp.yml",
        "llama-fp16",
        """
slices:
  - sources:
      - model: $ft1
        layer_range: [0, 4]
      - model: $ft2
        layer_range: [0, 4]
merge_method: slerp
base_model: $ft1
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
""",
    ),
    _r(
        "ex_orcamini_platy",
        "mergekit examples/orcamini-platy-44layer.yml",
        "llama-fp16",
        """
slices:
  - sources:
    - model: $ft1
      layer_range: [0, 3]
  - sources:
    - model: $ft2
      layer_range: [1, 4]
merge_method: passthrough
dtype: float16
""",
        layers=6,
    ),
    _r(
        "ex_arcee_fusion",
        "mergekit examples/arcee_fusion.yml",
        "llama-bf16",
        """
models:
  - model: $ft1
  - model: $ft2
merge_method: arcee_fusion
base_model: $ft1
dtype: bfloat16
""",
        difference=_FP_MATH + "; mergekit writes it in float32 without out_dtype",
    ),
    # ---- LazyMergekit templates (mlabonne) ------------------------------------------------
    _r(
        "lazy_slerp",
        "LazyMergekit SLERP template",
        "llama-bf16",
        """
slices:
  - sources:
      - model: $ft1
        layer_range: [0, 4]
      - model: $ft2
        layer_range: [0, 4]
merge_method: slerp
base_model: $ft1
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    ),
    _r(
        "lazy_ties",
        "LazyMergekit TIES template",
        "llama-fp16",
        """
models:
  - model: $base
    # no parameters necessary for base model
  - model: $ft1
    parameters: {density: 0.5, weight: 0.5}
  - model: $ft2
    parameters: {density: 0.5, weight: 0.3}
merge_method: ties
base_model: $base
parameters:
  normalize: true
dtype: float16
""",
        difference=_FP_MATH + "; equal |τ| at the top-k cut kept in another order",
    ),
    _r(
        "lazy_dare_ties",
        "LazyMergekit DARE TIES template",
        "llama-bf16",
        """
models:
  - model: $base
    # No parameters necessary for base model
  - model: $ft1
    parameters: {density: 0.53, weight: 0.4}
  - model: $ft2
    parameters: {density: 0.53, weight: 0.3}
  - model: $ft3
    parameters: {density: 0.53, weight: 0.3}
merge_method: dare_ties
base_model: $base
parameters:
  int8_mask: true
dtype: bfloat16
""",
        random=True,
    ),
    _r(
        "lazy_passthrough",
        "LazyMergekit passthrough template",
        "llama-bf16",
        """
slices:
  - sources:
    - model: $ft1
      layer_range: [0, 4]
  - sources:
    - model: $ft2
      layer_range: [2, 4]
merge_method: passthrough
dtype: bfloat16
""",
        layers=6,
    ),
    _r(
        "lazy_model_stock",
        "LazyMergekit Model Stock template",
        "llama-bf16",
        """
models:
  - model: $ft1
  - model: $ft2
  - model: $ft3
merge_method: model_stock
base_model: $base
dtype: bfloat16
""",
        difference=_FP_MATH + "; t clamped to [0, 1]",
    ),
    _r(
        "lazy_della",
        "LazyMergekit DELLA template",
        "llama-bf16",
        """
models:
  - model: $base
  - model: $ft1
    parameters: {density: 0.7, weight: 0.5, epsilon: 0.2}
  - model: $ft2
    parameters: {density: 0.6, weight: 0.5, epsilon: 0.1}
merge_method: della
base_model: $base
parameters:
  normalize: true
  int8_mask: true
  lambda: 1.0
dtype: bfloat16
""",
        random=True,
    ),
    # ---- frankenmerges ----------------------------------------------------------------------
    _r(
        "franken_depth_upscale",
        "SOLAR depth up-scaling (passthrough, overlapping ranges)",
        "llama",
        """
slices:
  - sources:
    - model: $base
      layer_range: [0, 3]
  - sources:
    - model: $base
      layer_range: [1, 4]
merge_method: passthrough
dtype: float32
""",
        layers=6,
    ),
    _r(
        "franken_interleave",
        "Goliath-style interleaved frankenmerge",
        "llama",
        """
slices:
  - sources:
    - model: $ft1
      layer_range: [0, 2]
  - sources:
    - model: $ft2
      layer_range: [1, 3]
  - sources:
    - model: $ft1
      layer_range: [2, 4]
merge_method: passthrough
dtype: float32
""",
        layers=6,
    ),
    _r(
        "franken_scaled",
        "passthrough with scale 0 on the repeated layers' output projections",
        "llama",
        """
slices:
  - sources:
    - model: $ft1
      layer_range: [0, 4]
  - sources:
    - model: $ft1
      layer_range: [2, 4]
      parameters:
        scale:
          - filter: o_proj
            value: 0.0
          - filter: down_proj
            value: 0.0
          - value: 1.0
merge_method: passthrough
dtype: float32
""",
        layers=6,
    ),
    _r(
        "franken_linear_slices",
        "per-range linear merge over slices",
        "llama",
        """
slices:
  - sources:
    - model: $ft1
      layer_range: [0, 2]
      parameters: {weight: 0.7}
    - model: $ft2
      layer_range: [0, 2]
      parameters: {weight: 0.3}
  - sources:
    - model: $ft1
      layer_range: [2, 4]
      parameters: {weight: 0.2}
    - model: $ft2
      layer_range: [2, 4]
      parameters: {weight: 0.8}
merge_method: linear
dtype: float32
""",
    ),
    # ---- the other methods, float32 -------------------------------------------------------
    _r(
        "task_arithmetic",
        "task arithmetic with lambda and a filtered weight",
        "llama",
        """
models:
  - model: $ft1
    parameters: {weight: 0.5}
  - model: $ft2
    parameters:
      weight: [{filter: self_attn, value: 0.6}, {value: 0.3}]
  - model: $ft3
    parameters: {weight: 0.2}
merge_method: task_arithmetic
base_model: $base
parameters:
  lambda: 0.8
dtype: float32
""",
    ),
    _r(
        "ties_f32",
        "TIES, float32 checkpoints",
        "llama",
        """
models:
  - model: $ft1
    parameters: {density: 0.5, weight: 1.0}
  - model: $ft2
    parameters: {density: 0.3, weight: 0.7}
  - model: $ft3
    parameters: {density: 0.7, weight: 0.4}
merge_method: ties
base_model: $base
dtype: float32
""",
    ),
    _r(
        "breadcrumbs_ties",
        "Model Breadcrumbs with TIES",
        "llama",
        """
models:
  - model: $ft1
    parameters: {density: 0.9, gamma: 0.01, weight: 0.5}
  - model: $ft2
    parameters: {density: 0.8, gamma: 0.05, weight: 0.5}
merge_method: breadcrumbs_ties
base_model: $base
dtype: float32
""",
    ),
    _r(
        "dare_linear",
        "DARE linear",
        "llama",
        """
models:
  - model: $ft1
    parameters: {density: 0.5, weight: 0.5}
  - model: $ft2
    parameters: {density: 0.5, weight: 0.5}
merge_method: dare_linear
base_model: $base
dtype: float32
""",
        random=True,
    ),
    _r(
        "nearswap",
        "NearSwap",
        "llama",
        """
models:
  - model: $ft1
merge_method: nearswap
base_model: $base
parameters:
  t: 0.001
dtype: float32
""",
    ),
    _r(
        "nuslerp",
        "NuSLERP with a base",
        "llama",
        """
models:
  - model: $ft1
    parameters: {weight: 0.3}
  - model: $ft2
    parameters: {weight: 0.7}
merge_method: nuslerp
base_model: $base
dtype: float32
""",
    ),
    _r(
        "multislerp",
        "Multi-SLERP with a base",
        "llama",
        """
models:
  - model: $ft1
    parameters: {weight: 0.5}
  - model: $ft2
    parameters: {weight: 0.3}
  - model: $ft3
    parameters: {weight: 0.2}
merge_method: multislerp
base_model: $base
dtype: float32
""",
    ),
    _r(
        "karcher",
        "Karcher mean",
        "llama",
        """
models:
  - model: $ft1
  - model: $ft2
  - model: $ft3
merge_method: karcher
parameters:
  max_iter: 10
dtype: float32
""",
        ulp_tol=8.0,  # ten fixed-point steps, each rounded in float32: the rounding compounds
    ),
    _r(
        "sce",
        "SCE",
        "llama",
        """
models:
  - model: $ft1
  - model: $ft2
  - model: $ft3
merge_method: sce
base_model: $base
parameters:
  select_topk: 0.5
dtype: float32
""",
    ),
    _r(
        "ramplus_tl",
        "RAM+ (tensor-local)",
        "llama",
        """
models:
  - model: $ft1
  - model: $ft2
  - model: $ft3
merge_method: ramplus_tl
base_model: $base
parameters:
  epsilon: 0.0005
  r: 0.5
  alpha: 0.3
dtype: float32
""",
    ),
    _r(
        "gpt2_slerp",
        "SLERP of a GPT-2 (tied embeddings)",
        "gpt2",
        """
models:
  - model: $ft1
  - model: $ft2
merge_method: slerp
base_model: $ft1
parameters:
  t: 0.3
dtype: float32
""",
        layers=3,
    ),
    _r(
        "linear_with_base",
        "linear with a base_model not listed among the models",
        "llama",
        """
models:
  - model: $ft1
  - model: $ft2
merge_method: linear
base_model: $base
parameters:
  weight: 0.5
dtype: float32
""",
    ),
    # ---- LoRA inputs ----------------------------------------------------------------------
    _r(
        "lora_linear",
        "linear of a BASE+LORA input and a fine-tune",
        "llama",
        """
models:
  - model: $base+$lora1
    parameters: {weight: 0.6}
  - model: $ft1
    parameters: {weight: 0.4}
merge_method: linear
dtype: float32
""",
    ),
    _r(
        "lora_task_arithmetic",
        "task arithmetic of BASE+LORA inputs",
        "llama",
        """
models:
  - model: $base+$lora1
    parameters: {weight: 1.0}
  - model: $ft2+$lora2
    parameters: {weight: 0.5}
merge_method: task_arithmetic
base_model: $base
dtype: float32
""",
    ),
    # ---- different vocabularies ------------------------------------------------------------
    _r(
        "vocab_union",
        "linear with tokenizer_source: union",
        "llama",
        """
models:
  - model: $ft1
    parameters: {weight: 0.5}
  - model: $alt1
    parameters: {weight: 0.5}
merge_method: linear
tokenizer_source: union
dtype: float32
""",
    ),
    _r(
        "vocab_tokenizer_block",
        "TIES with a tokenizer: block (union, a token's source)",
        "llama",
        """
models:
  - model: $ft1
    parameters: {density: 0.5, weight: 0.5}
  - model: $alt1
    parameters: {density: 0.5, weight: 0.5}
merge_method: ties
base_model: $base
tokenizer:
  source: union
  tokens:
    <s>:
      source: $base
dtype: float32
""",
    ),
    _r(
        "vocab_source_model",
        "tokenizer_source naming a model with another vocabulary",
        "llama",
        """
models:
  - model: $ft1
    parameters: {weight: 0.5}
  - model: $alt1
    parameters: {weight: 0.5}
merge_method: linear
tokenizer_source: $alt1
dtype: float32
""",
    ),
)


def by_name() -> dict[str, CompatRecipe]:
    return {r.name: r for r in RECIPES}


def build_families(root: Path, families: set[str] | None = None) -> dict[str, dict[str, Path]]:
    """Build (or reuse, cached under ``root``) the checkpoint families the recipes name:
    family → placeholder → path. The float32 Llama family also has ``lora1`` (an adapter of
    its base), ``lora2`` (of its ft2) and ``alt1`` (a fine-tune with another vocabulary)."""
    import torch

    from testbed import tiny_models

    wanted = families or set(FAMILIES)
    out: dict[str, dict[str, Path]] = {}
    for fam in sorted(wanted):
        kind, dtype, seed, n = FAMILIES[fam]
        folder = Path(root) / fam
        marker = folder / ".built.json"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("version") == BUILD_VERSION:
                out[fam] = {k: Path(v) for k, v in saved["paths"].items()}
                continue
        shutil.rmtree(folder, ignore_errors=True)
        kw: dict[str, Any] = {}
        if dtype != "float32":
            kw["dtype"] = getattr(torch, dtype)
        paths = tiny_models.build_family(kind, folder, seed, n, **kw)
        if fam == "llama":
            paths["lora1"] = tiny_models.build_lora_adapter(
                paths["base"], folder / "lora1", 101, **LORA
            )
            paths["lora2"] = tiny_models.build_lora_adapter(
                paths["ft2"], folder / "lora2", 102, **LORA
            )
            paths["alt1"] = tiny_models.build_finetune(
                paths["base"], folder / "alt1", 103, shared_seed=seed * 1000, tokenizer_variant=1
            )
        marker.write_text(
            json.dumps({"version": BUILD_VERSION, "paths": {k: str(v) for k, v in paths.items()}})
        )
        out[fam] = paths
    return out
