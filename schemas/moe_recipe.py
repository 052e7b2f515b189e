"""The mixture-of-experts recipe: dense fine-tunes of one base assembled into a Mixtral MoE
(Llama/Mistral inputs) or a Qwen2-MoE (Qwen2 inputs) (docs/moe.md), in mergekit-moe's
vocabulary (``base_model``, ``experts`` with ``source_model`` / ``positive_prompts`` /
``negative_prompts``, ``gate_mode``, ``experts_per_token``, ``dtype``, ``shared_experts``).

Validated once here (no torch) for the API, the CLI and the worker. What only the models can
tell — their architecture, whether an expert's MLP has the base's shapes — is checked by the
worker when it opens them. Every default is declared once, on its field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.limits import MAX_MODELS_PER_RECIPE, MAX_NAME_CHARS, MAX_TEXT_CHARS
from schemas.recipe import validate_document
from schemas.references import Location, ModelReference

MAX_EXPERT_PROMPTS = 256
"""Prompts per list (``positive_prompts`` or ``negative_prompts``) of one expert."""

GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random"]
HIDDEN_MODES = ("hidden", "hidden_last", "hidden_avg")  # the modes that run the base model
MoeDtype = Literal["float32", "float16", "bfloat16"]
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Prompts = Annotated[list[Prompt], Field(max_length=MAX_EXPERT_PROMPTS)]

OUTPUT_ARCHITECTURES = {"llama": "Mixtral", "mistral": "Mixtral", "qwen2": "Qwen2-MoE"}
"""Input model_type → the MoE architecture built from it (the worker refuses any other,
naming these). Only Qwen2-MoE has a shared expert, and always exactly one."""
SHARED_EXPERTS = {"Mixtral": 0, "Qwen2-MoE": 1}
"""How many ``shared_experts`` each output architecture takes."""


class MoeExpert(BaseModel):
    """One expert: the model whose MLPs become expert N of every layer, and the prompts its
    router row is made from."""

    model_config = ConfigDict(extra="forbid")

    source_model: ModelReference = Field(
        description="a fine-tune of base_model (same architecture and shapes); its MLP of "
        "each layer becomes this expert"
    )
    positive_prompts: Prompts | None = Field(
        default=None,
        description="text this expert should handle (required unless gate_mode is random)",
    )
    negative_prompts: Prompts | None = Field(
        default=None,
        description="text this expert should not handle: its representation is subtracted",
    )


class MoeOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str | None, Field(max_length=MAX_NAME_CHARS)] = None


class MoeRecipe(BaseModel):
    """Which base donates attention, norms and embeddings, which fine-tunes donate the
    experts' MLPs, and how the routers are initialised. See docs/moe.md for every field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_model: ModelReference = Field(
        description="donor of every tensor but the MLPs (attention, norms, embeddings, "
        "lm_head); with gate_mode hidden, the model whose hidden states make the routers"
    )
    experts: Annotated[list[MoeExpert], Field(min_length=1, max_length=MAX_MODELS_PER_RECIPE)]
    gate_mode: GateMode = Field(
        default="hidden",
        description="hidden (= hidden_last, mergekit's default): each router row is the "
        "normalised mean over the expert's prompts of the hidden state of each prompt's last "
        "token at that layer (base model); hidden_avg: of each prompt's mean over its tokens; "
        "cheap_embed: from the prompts' token "
        "embeddings, the same for every layer; random: seeded Gaussian",
    )
    experts_per_token: Annotated[
        int,
        Field(ge=1, description="experts each token is routed to (Mixtral's num_experts_per_tok)"),
    ] = 2
    dtype: MoeDtype | None = Field(
        default=None,
        description="dtype of every output tensor; default the base model's (config.json)",
    )
    shared_experts: Annotated[list[MoeExpert] | None, Field(max_length=1)] = Field(
        default=None,
        description="the expert every token also uses, gated by its own sigmoid router: "
        "exactly one for Qwen2 inputs (a Qwen2-MoE output), none for Llama/Mistral (Mixtral "
        "has no shared expert)",
    )
    seed: Annotated[
        int, Field(ge=0, lt=2**63, description="seed of the random routers (gate_mode random)")
    ] = 0
    output: MoeOutput = Field(default_factory=MoeOutput)

    @model_validator(mode="after")
    def _consistent(self) -> MoeRecipe:
        n = len(self.experts)
        if self.experts_per_token > n:
            raise ValueError(
                f"experts_per_token: {self.experts_per_token} is more than the {n} expert(s) "
                f"given; it must be between 1 and {n}"
            )
        if self.base_model.adapter is not None and self.gate_mode in HIDDEN_MODES:
            raise ValueError(
                "base_model: a BASE+ADAPTER base cannot make hidden-state routers (the base "
                "is run with transformers); merge the adapter first, or use gate_mode "
                "cheap_embed or random"
            )
        if self.gate_mode == "random":
            return self
        for field, e in self.gated():
            if not e.positive_prompts:
                raise ValueError(
                    f"{field}.positive_prompts: gate_mode {self.gate_mode} makes each "
                    "router row from its expert's prompts: give at least one (or use "
                    "gate_mode random)"
                )
        first = _prompt_key(self.experts[0])
        if n > 1 and all(_prompt_key(e) == first for e in self.experts[1:]):
            raise ValueError(
                "experts: every expert has the same prompts, so every router row would be "
                "the same and routing would not depend on the input; give each expert "
                "prompts of its own domain"
            )
        return self

    def gated(self) -> list[tuple[str, MoeExpert]]:
        """Every expert that gets a router row, with its field: the routed experts, then the
        shared ones (whose rows are their sigmoid gates)."""
        out = [(f"experts[{i}]", e) for i, e in enumerate(self.experts)]
        return out + [(f"shared_experts[{i}]", e) for i, e in enumerate(self.shared_experts or [])]

    def references(self) -> list[tuple[Location, ModelReference]]:
        """Every model reference of the recipe and where it stands: the base, then each
        expert's source model (a ``BASE+ADAPTER`` reference as its two parts)."""
        refs = [*self.base_model.parts(("base_model",))]
        for i, e in enumerate(self.experts):
            refs += e.source_model.parts(("experts", i, "source_model"))
        for i, e in enumerate(self.shared_experts or []):
            refs += e.source_model.parts(("shared_experts", i, "source_model"))
        return refs


def _prompt_key(e: MoeExpert) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())


def parse_moe_recipe(data: dict[str, Any] | str) -> MoeRecipe:
    """Validate a MoE recipe given as a mapping or YAML/JSON text. Raises RecipeError naming
    each field."""
    return validate_document(
        MoeRecipe, data, "a MoE recipe is a mapping with 'base_model' and 'experts'"
    )
