"""The LoRA extraction recipe: a fine-tune turned into a PEFT LoRA adapter of its base
(docs/extract-lora.md).

Validated once here (no torch) for the API, the CLI and the worker. What only the models can
tell — which tensors exist, their shapes, whether a target name matches anything — is
checked by the worker when it opens them. Every default is declared once, on its field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.limits import MAX_NAME_CHARS
from schemas.recipe import validate_document
from schemas.references import Location, ModelReference

MAX_LORA_RANK = 65536
"""The largest ``rank`` / ``max_rank`` accepted (a rank is clamped to each matrix's
min(rows, columns) at run time)."""
MAX_TARGET_MODULES = 256
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,199}$")

SvdMethod = Literal["auto", "exact", "randomized"]
AdapterDtype = Literal["float32", "float16", "bfloat16"]


class ExtractOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str | None, Field(max_length=MAX_NAME_CHARS)] = None


class ExtractLoraRecipe(BaseModel):
    """Which fine-tune to turn into a LoRA adapter of which base, and at what rank. See
    docs/extract-lora.md for every field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base: ModelReference = Field(description="the model the adapter is applied to")
    model: ModelReference = Field(
        description="the fine-tune (or merge) of base whose difference the adapter holds"
    )
    rank: Annotated[
        int | None,
        Field(
            ge=1,
            le=MAX_LORA_RANK,
            description="the LoRA rank of every module (clamped to min(rows, columns) of a "
            "smaller matrix); give rank or energy",
        ),
    ] = None
    energy: Annotated[
        float | None,
        Field(
            gt=0,
            le=1,
            description="per module, keep the fewest singular values of ΔW whose squares hold "
            "this fraction of ‖ΔW‖²_F (at most max_rank); give rank or energy",
        ),
    ] = None
    max_rank: Annotated[
        int | None,
        Field(
            ge=1,
            le=MAX_LORA_RANK,
            description="with energy: no module's rank exceeds this (default: min(rows, "
            "columns), which needs an exact SVD of each matrix)",
        ),
    ] = None
    target_modules: Annotated[
        list[str] | None,
        Field(
            max_length=MAX_TARGET_MODULES,
            description="modules decomposed into LoRA factors: each name matches a module "
            "whose name equals it or ends with '.' + it (PEFT's rule), e.g. [q_proj, v_proj]. "
            "Default: every 2-D weight inside the numbered decoder layers",
        ),
    ] = None
    save_changed: bool = Field(
        default=True,
        description="tensors outside target_modules that the fine-tune changed (embeddings, "
        "lm_head, norms) are saved whole in the adapter's modules_to_save, as "
        "mergekit-extract-lora does; false leaves them out (the manifest lists them)",
    )
    svd: SvdMethod = Field(
        default="auto",
        description="exact: torch.linalg.svd; randomized: Halko et al. 2011 with a seeded "
        "Gaussian sketch; auto: exact unless the matrix is large and the rank small",
    )
    power_iterations: Annotated[
        int,
        Field(ge=0, le=20, description="randomized SVD: subspace (power) iterations"),
    ] = 4
    seed: Annotated[
        int, Field(ge=0, lt=2**63, description="seed of the randomized SVD's sketches")
    ] = 0
    dtype: AdapterDtype | None = Field(
        default=None,
        description="dtype of the adapter's tensors; default the fine-tune's dtype",
    )
    output: ExtractOutput = Field(default_factory=ExtractOutput)

    @field_validator("target_modules")
    @classmethod
    def _target_names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty list targets nothing; leave it out for the default")
        for i, name in enumerate(v):
            if not _MODULE_NAME.match(name) or name.endswith(".") or ".." in name:
                raise ValueError(
                    f"[{i}]: {name!r} is not a module name: letters, digits, '_' and '.' "
                    "between names, such as q_proj or model.layers.0.mlp.down_proj"
                )
        return v

    @model_validator(mode="after")
    def _rank_or_energy(self) -> ExtractLoraRecipe:
        if (self.rank is None) == (self.energy is None):
            raise ValueError(
                "rank: give either rank (a fixed LoRA rank, e.g. 16) or energy (the fraction "
                "of ‖ΔW‖² to keep, e.g. 0.9), not both and not neither"
            )
        if self.max_rank is not None and self.energy is None:
            raise ValueError("max_rank: caps the rank chosen by energy; with rank it is unused")
        if self.svd == "randomized" and self.rank is None and self.max_rank is None:
            raise ValueError(
                "svd: randomized computes the leading singular values only; it needs rank, or "
                "max_rank with energy (energy alone needs them all: svd auto or exact)"
            )
        if str(self.base) == str(self.model):
            raise ValueError(
                f"model: {self.model} is the base itself; ΔW would be zero. Name the fine-tune"
            )
        return self

    def references(self) -> list[tuple[Location, ModelReference]]:
        """Every model reference of the recipe and where it stands: the base, the model (a
        ``BASE+ADAPTER`` reference as its two parts)."""
        return [*self.base.parts(("base",)), *self.model.parts(("model",))]


def parse_extract_lora_recipe(data: dict[str, Any] | str) -> ExtractLoraRecipe:
    """Validate a LoRA extraction recipe given as a mapping or YAML/JSON text. Raises
    RecipeError naming each field."""
    return validate_document(
        ExtractLoraRecipe,
        data,
        "a LoRA extraction recipe is a mapping with 'base', 'model' and 'rank' or 'energy'",
    )
