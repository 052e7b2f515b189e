"""The merge recipe: mergekit's YAML vocabulary plus weightsmith's extensions.

A recipe is validated here once, by the API, the CLI and the worker alike, against the
methods' own declarations (merging/methods/: parameters and any rule of a method's own,
read without torch); every error points at the field to change. Parameter values
follow mergekit: a scalar, a per-layer gradient list, or a list of ``{filter, value}``
entries where the first entry whose filter is a substring of the tensor name wins
(``*`` or no filter matches everything). Precedence, highest first: the model's own
``parameters``, the top level ``parameters``, the method's default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from merging import METHODS
from merging.method import MergeMethod, ModelSettings, RecipeRuleError, RecipeSettings
from merging.parameters import ParameterSpec, ParamScope
from schemas.chat_templates import NAMED_TEMPLATES
from schemas.limits import (
    FLOAT32_MAX,
    MAX_CHAT_TEMPLATE_CHARS,
    MAX_FILTER_CHARS,
    MAX_LAYER_INDEX,
    MAX_MERGE_PARALLELISM,
    MAX_MODELS_PER_RECIPE,
    MAX_NAME_CHARS,
    MAX_SETTING_ITEMS,
    MAX_SHARD_BYTES,
    MAX_SLICES,
    MAX_TOKEN_CHARS,
    MAX_TOKENIZER_TOKENS,
    limit_error,
)
from schemas.references import Location, ModelReference

Scalar = float | int | bool | str
_M = TypeVar("_M", bound=BaseModel)
DType = Literal["float32", "float16", "bfloat16"]
_DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "half": "float16",
    "float": "float32",
}


# For the OpenAPI document (and the fuzzer generating from it): the names a recipe may use.
_PARAMETER_NAMES = sorted({p.name for m in METHODS.values() for p in m.parameters})


def _in_name_order(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """A ``parameters`` map with its names in sorted order: what it means does not depend
    on the order they were written in, and neither do the recipe's dumps (model card,
    manifest), whether it was read from a file or came back from the job store (PostgreSQL
    keeps JSON objects in an order of its own)."""
    return None if params is None else dict(sorted(params.items()))


Parameters = Annotated[
    dict[str, "ParameterSetting"] | None,
    Field(json_schema_extra={"propertyNames": {"enum": _PARAMETER_NAMES}}),
    AfterValidator(_in_name_order),
]


class FilterValue(BaseModel):
    """One entry of a ``{filter, value}`` list: applies when ``filter`` is in the tensor name."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[Scalar]


ParameterSetting = Scalar | list[Scalar] | FilterValue | list[FilterValue]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelReference
    parameters: Parameters = None


class SliceSource(BaseModel):
    """One model's layers [start, end) in a slice (mergekit's ``layer_range``)."""

    model_config = ConfigDict(extra="forbid")
    model: ModelReference
    layer_range: tuple[
        Annotated[int, Field(ge=0, le=MAX_LAYER_INDEX)],
        Annotated[int, Field(ge=1, le=MAX_LAYER_INDEX + 1)],
    ]
    parameters: Parameters = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[1] <= v[0]:
            raise ValueError(
                f"[{v[0]}, {v[1]}] is empty: a layer range is [first, end) with end > first"
            )
        return v

    @property
    def layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(BaseModel):
    """Consecutive output layers, each merged from one layer of every source (mergekit's
    ``slices`` entry): output layer k of the slice comes from layer ``layer_range[0] + k``
    of each source."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1, max_length=MAX_MODELS_PER_RECIPE)
    base_model: ModelReference | None = None
    parameters: Parameters = None

    @property
    def layers(self) -> int:
        return self.sources[0].layers


@dataclass(frozen=True)
class InputGroup:
    """Inputs merged together: the recipe's ``models``, or one slice's ``sources``. Each
    entry has ``model`` and ``parameters``; ``parameters`` of the group (a slice's own) come
    between an entry's and the top level's in precedence."""

    at: Location  # where the entries are: ("models",) or ("slices", i, "sources")
    entries: tuple[ModelEntry | SliceSource, ...]
    parameters: dict[str, ParameterSetting] | None
    parameters_at: Location | None  # where ``parameters`` is written (None: no group level)
    base: ModelReference | None

    def fine_tuned(self, method: MergeMethod) -> list[ModelEntry | SliceSource]:
        """The non-base entries, in order (an entry naming the base is the base)."""
        if self.base is None or not method.uses_base:
            return list(self.entries)
        return [e for e in self.entries if e.model != self.base]


_SIZE = re.compile(r"^\s*([0-9]{1,15}(?:\.[0-9]{1,15})?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(value: int | str) -> int:
    """'5GB' → 5·10⁹, '500MiB' → 500·2²⁰, 1000 → 1000."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 5GB, 500MB or a number of bytes")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a size; use e.g. 5GB, 500MB, 2GiB or bytes")
        unit = (m.group(2) or "").lower().rstrip("b")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1024:
        raise ValueError(f"shard size must be at least 1024 bytes, got {n}")
    if n > MAX_SHARD_BYTES:
        raise ValueError(f"shard size must be at most {MAX_SHARD_BYTES} bytes (1TiB), got {n}")
    return n


def _dtype(value: Any) -> Any:
    if isinstance(value, str):
        return _DTYPE_ALIASES.get(value.lower(), value.lower())
    return value


class OutputOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[
        str | None,
        Field(max_length=MAX_NAME_CHARS, description="name of the merged model (model card title)"),
    ] = None
    dtype: DType | None = None
    shard_size: Annotated[int, Field(description="bytes per shard; accepts '5GB', '500MB'")] = (
        5 * 10**9
    )

    _norm_dtype = field_validator("dtype", mode="before")(_dtype)

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)


class ModelTokenSource(BaseModel):
    """A token's row taken from one input's own embedding (mergekit's ``model_token``): the
    row of its token ``token`` or its row ``token_id`` (exactly one of them)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: ModelReference
    token_id: int | None = Field(default=None, ge=0, lt=2**31)
    token: str | None = Field(default=None, max_length=MAX_TOKEN_CHARS)

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of 'token' (a token of the model) or 'token_id'")
        return self


def _token_source_kind(v: Any) -> str:
    """Which form a token's ``source`` is in: a mapping with ``kind``, else a model."""
    if isinstance(v, dict):
        return "kind=zero" if v.get("kind") == "zero" else "kind=model_token"
    if isinstance(v, ZeroSource):
        return "kind=zero"
    return "kind=model_token" if isinstance(v, ModelTokenSource) else "kind=model"


class ZeroSource(BaseModel):
    """A row of zeros (mergekit's ``zero``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenEmbedding(BaseModel):
    """Where a token's embedding and output-head rows come from for the inputs that lack it
    (or, with ``force``, for every input): a model's row of that token, a ``model_token``
    row, or zeros. Without ``source`` the automatic rule applies (docs/recipes.md)."""

    model_config = ConfigDict(extra="forbid")
    source: (
        Annotated[
            Annotated[ModelTokenSource, Tag("kind=model_token")]
            | Annotated[ZeroSource, Tag("kind=zero")]
            | Annotated[ModelReference, Tag("kind=model")],
            Discriminator(_token_source_kind),
        ]
        | None
    ) = None
    force: bool = False

    @property
    def source_model(self) -> ModelReference | None:
        if isinstance(self.source, ModelTokenSource):
            return self.source.model
        return self.source if isinstance(self.source, ModelReference) else None


class TokenizerOptions(BaseModel):
    """mergekit's ``tokenizer:``: the output vocabulary (``source``), tokens to add or whose
    rows to set (``tokens``) and the row count rounded up to a multiple."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["union", "base"] | ModelReference = "union"
    tokens: Annotated[dict[str, TokenEmbedding], Field(max_length=MAX_TOKENIZER_TOKENS)] | None = (
        None
    )
    pad_to_multiple_of: int | None = Field(default=None, ge=1, le=2**20)

    @field_validator("tokens")
    @classmethod
    def _token_names(cls, v: dict[str, TokenEmbedding] | None) -> Any:
        for tok in v or {}:
            if not tok or len(tok) > MAX_TOKEN_CHARS:
                raise ValueError(
                    f"{tok[:40]!r}: a token is 1 to {MAX_TOKEN_CHARS} characters, got {len(tok)}"
                )
        return v


# mergekit's bundled chat templates (LGPL-3.0, not shipped here): named so that the error
# can say what to write instead.
MERGEKIT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


class MergeRecipe(BaseModel):
    """What to merge and how. See docs/recipes.md for every field."""

    model_config = ConfigDict(extra="forbid")

    merge_method: Annotated[str, Field(json_schema_extra={"enum": list(METHODS)})]
    base_model: ModelReference | None = None
    models: list[ModelEntry] = Field(default_factory=list, max_length=MAX_MODELS_PER_RECIPE)
    slices: list[OutputSlice] | None = Field(default=None, min_length=1, max_length=MAX_SLICES)
    parameters: Parameters = None
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: Literal["base", "union"] | ModelReference | None = None
    tokenizer: TokenizerOptions | None = None
    chat_template: str | None = Field(default=None, max_length=MAX_CHAT_TEMPLATE_CHARS)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    allow_pickle: bool = False
    output: OutputOptions = Field(default_factory=OutputOptions)
    # How the merge runs, not what it makes: left out of every dump (manifest, model card,
    # reuse), so the artifact is the same whatever the split (docs/recipes.md, "parallelism").
    parallelism: StrictInt | None = Field(
        default=None,
        ge=1,
        le=MAX_MERGE_PARALLELISM,
        exclude=True,
        description="split the merge into this many parts (ranges of output shards) run by "
        "any workers at once; 1: one worker",
    )

    _norm_dtypes = field_validator("dtype", "out_dtype", mode="before")(_dtype)

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_without_adapter(cls, v: Any) -> Any:
        if isinstance(v, ModelReference) and v.adapter is not None:
            raise ValueError(
                "a LoRA adapter has no tokenizer of its own to take: name the model alone "
                f"({v.base}), or 'base'"
            )
        return v

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        """mergekit's forms: ``auto`` (the template most inputs have), a named template
        (schemas/chat_templates.py), or a Jinja template."""
        if v is None or v == "auto":
            return v
        if v in NAMED_TEMPLATES:
            return v
        if v in MERGEKIT_TEMPLATE_NAMES:
            raise ValueError(
                f"the named template {v!r} is not one weightsmith has; named templates: "
                f"{', '.join(sorted(NAMED_TEMPLATES))}; or write the Jinja template itself "
                "here, or 'auto' (the template most input models have)"
            )
        if len(v) < 20 or "{" not in v:
            raise ValueError(
                "a chat template is 'auto' (the template most input models have) or a Jinja "
                "template (at least 20 characters, with '{'); got "
                f"{v[:40]!r}"
            )
        return v

    @property
    def vocabulary(self) -> TokenizerOptions | None:
        """The output vocabulary plan (``tokenizer``, or ``tokenizer_source`` alone), or None
        when the inputs' embeddings are merged row for row as stored."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_source is not None:
            return TokenizerOptions(source=self.tokenizer_source)
        return None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("slices") is not None and data.get("models"):
                raise limit_error(
                    "MergeRecipe",
                    ("slices",),
                    "a recipe lists either whole 'models' or layer 'slices', not both",
                )
            if "modules" in data:
                raise limit_error(
                    "MergeRecipe",
                    ("modules",),
                    "per-module recipes (multimodal models) are not supported; use 'models' "
                    "or 'slices'",
                )
            method = data.get("merge_method")
            if isinstance(method, str) and method not in METHODS:
                raise limit_error(
                    "MergeRecipe",
                    ("merge_method",),
                    f"unknown method {method!r}; valid: {', '.join(METHODS)}",
                    method,
                )
        return data

    @property
    def method(self) -> MergeMethod:
        return METHODS[self.merge_method]

    @property
    def base_as_model(self) -> bool:
        """Whether ``base_model`` is merged as one more model: mergekit 0.1.5's planner
        (``plan.py``, ``normalize_config``) adds a base that ``models`` does not list to the
        inputs of every method, so a method that takes no base (``linear``,
        ``passthrough``) merges it like the listed models, with the top-level parameters.
        Not with ``slices``, whose sources are the inputs as listed."""
        return (
            self.slices is None
            and self.base_model is not None
            and not self.method.uses_base
            and all(m.model != self.base_model for m in self.models)
        )

    @property
    def fine_tuned(self) -> list[ModelEntry]:
        """The non-base inputs, in recipe order (an entry equal to base_model is the base);
        then the base itself where it is merged as one more model (``base_as_model``)."""
        if self.base_model is None or not self.method.uses_base:
            extra = [ModelEntry(model=self.base_model)] if self.base_as_model else []
            return list(self.models) + extra
        return [m for m in self.models if m.model != self.base_model]

    def groups(self) -> list[InputGroup]:
        """The inputs merged together: the ``models``, or each slice's ``sources``."""
        if self.slices is None:
            entries = tuple(self.fine_tuned) if self.base_as_model else tuple(self.models)
            return [InputGroup(("models",), entries, None, None, self.base_model)]
        return [
            InputGroup(
                ("slices", i, "sources"),
                tuple(s.sources),
                s.parameters,
                ("slices", i, "parameters"),
                s.base_model or self.base_model,
            )
            for i, s in enumerate(self.slices)
        ]

    def references(self) -> list[tuple[Location, ModelReference]]:
        """Every model reference of the recipe and where it stands, in recipe order: the
        base model, each model (or each slice's base and sources), the tokenizer source
        (when it names a model). A ``BASE+ADAPTER`` reference counts as its two parts, each
        fetched, pinned and checked on its own, at its location plus ``"base"`` or
        ``"adapter"``."""
        found: list[tuple[Location, ModelReference]] = []
        if self.base_model is not None:
            found += self.base_model.parts(("base_model",))
        for i, m in enumerate(self.models):
            found += m.model.parts(("models", i, "model"))
        for i, piece in enumerate(self.slices or ()):
            if piece.base_model is not None:
                found += piece.base_model.parts(("slices", i, "base_model"))
            for j, src in enumerate(piece.sources):
                found += src.model.parts(("slices", i, "sources", j, "model"))
        if isinstance(self.tokenizer_source, ModelReference):
            found.append((("tokenizer_source",), self.tokenizer_source))
        if self.tokenizer is not None:
            if isinstance(self.tokenizer.source, ModelReference):
                found.append((("tokenizer", "source"), self.tokenizer.source))
            for tok, emb in (self.tokenizer.tokens or {}).items():
                at: Location = ("tokenizer", "tokens", tok, "source")
                if isinstance(emb.source, ModelTokenSource):
                    found += emb.source.model.parts((*at, "model"))
                elif isinstance(emb.source, ModelReference):
                    found += emb.source.parts(at)
        return found

    def input_references(self) -> list[ModelReference]:
        """The models whose tensors are merged: the base, the models or every slice's
        sources (mergekit's referenced models), each once, in recipe order."""
        seen: dict[str, ModelReference] = {}
        for ref in [
            *([self.base_model] if self.base_model is not None else []),
            *(m.model for m in self.models),
            *(src.model for piece in self.slices or () for src in piece.sources),
        ]:
            seen.setdefault(str(ref), ref)
        return list(seen.values())

    @property
    def base_entry(self) -> ModelEntry | None:
        if self.base_model is None:
            return None
        for m in self.models:
            if m.model == self.base_model:
                return m
        return ModelEntry(model=self.base_model)

    @property
    def output_dtype(self) -> DType | None:
        return self.output.dtype or self.out_dtype or self.dtype

    @model_validator(mode="after")
    def _check_against_method(self) -> MergeRecipe:
        spec = self.method
        if self.slices is None and not self.models:
            raise limit_error(
                "MergeRecipe", ("models",), "list the models to merge (or layer 'slices')"
            )
        if self.slices is not None:
            self._check_slices()
        for group in self.groups():
            self._check_group(group)
        if self.base_as_model:
            self._check_base_as_model()
        if self.output.dtype and self.out_dtype and self.output.dtype != self.out_dtype:
            raise ValueError(
                f"output.dtype ({self.output.dtype}) and out_dtype ({self.out_dtype}) disagree; "
                "set one of them"
            )
        self._check_tokenizer()
        self._check_setting_sizes()
        for at, params in self._scopes():
            self._check_parameters(at, params)
        self._check_float32_range()
        for group in self.groups():
            try:
                spec.check_recipe(self._settings(group))
            except RecipeRuleError as e:
                raise limit_error(
                    "MergeRecipe", self._locate(group, e.location), e.message
                ) from None
        return self

    def _check_tokenizer(self) -> None:
        """Not both ``tokenizer_source`` and ``tokenizer`` (as mergekit); a tokenizer taken
        from a model is a model's own (no adapter); a token's rows come from an input."""
        if self.tokenizer is None:
            return
        if self.tokenizer_source is not None:
            raise limit_error(
                "MergeRecipe",
                ("tokenizer",),
                "set either 'tokenizer_source' or 'tokenizer' (whose 'source' says the same), "
                "not both",
            )
        src = self.tokenizer.source
        if isinstance(src, ModelReference) and src.adapter is not None:
            raise limit_error(
                "MergeRecipe",
                ("tokenizer", "source"),
                "a LoRA adapter has no tokenizer of its own to take: name the model alone "
                f"({src.base}), 'base' or 'union'",
            )
        inputs = {str(r): r for r in self.input_references()}
        for tok, emb in (self.tokenizer.tokens or {}).items():
            if emb.force and emb.source is None:
                raise limit_error(
                    "MergeRecipe",
                    ("tokenizer", "tokens", tok, "force"),
                    "a forced token needs a 'source' (a model, a model_token row or zero) to "
                    "take its rows from",
                )
            model = emb.source_model
            if model is not None and str(model) not in inputs:
                at: Location = ("tokenizer", "tokens", tok, "source")
                if isinstance(emb.source, ModelTokenSource):
                    at = (*at, "model")
                raise limit_error(
                    "MergeRecipe",
                    at,
                    f"{str(model)!r} is not an input of the merge: a token's rows come from "
                    f"one of {', '.join(repr(k) for k in inputs)}",
                )

    def _check_group(self, group: InputGroup) -> None:
        """The method's base and model count, for the models or one slice."""
        spec = self.method
        if spec.needs_base and group.base is None:
            raise limit_error(
                "MergeRecipe",
                ("base_model",),
                f"method {spec.name!r} needs a base model (the task vectors are differences "
                "from it)",
            )
        in_slice = group.parameters_at is not None and spec.uses_base
        if (
            in_slice
            and group.base is not None
            and all(e.model != group.base for e in group.entries)
        ):
            raise limit_error(
                "MergeRecipe",
                group.at,
                f"the base model {str(group.base)!r} must be one of the slice's sources: "
                "its layers are the base of this slice's tensors",
            )
        n = len(group.fine_tuned(spec))
        if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
            want = (
                f"exactly {spec.min_models}"
                if spec.max_models == spec.min_models
                else f"at least {spec.min_models}"
                if spec.max_models is None
                else f"{spec.min_models} to {spec.max_models}"
            )
            what = "model(s)" if group.parameters_at is None else "source(s)"
            besides = " besides the base" if spec.needs_base else ""
            counted = ""
            if group.parameters_at is None and self.base_as_model:
                counted = (
                    " (base_model counts: models does not list it, so it is merged as one "
                    "more model, as mergekit does; remove base_model or list it)"
                )
            raise limit_error(
                "MergeRecipe",
                group.at if group.parameters_at is not None else ("models",),
                f"{spec.name!r} needs {want} {what}{besides}, got {n}{counted}",
            )

    def _check_slices(self) -> None:
        """Sources of a slice span as many layers; few distinct models; no whole-model
        statistics (they are statistics of whole models, which slices are not)."""
        assert self.slices is not None
        distinct: set[str] = set()
        for i, piece in enumerate(self.slices):
            n = piece.layers
            for j, src in enumerate(piece.sources):
                distinct.add(str(src.model))
                if src.layers != n:
                    raise limit_error(
                        "MergeRecipe",
                        ("slices", i, "sources", j, "layer_range"),
                        f"spans {src.layers} layers but the slice's first source spans {n}: "
                        "every source of a slice gives one layer to each output layer",
                        list(src.layer_range),
                    )
            if piece.base_model is not None:
                distinct.add(str(piece.base_model))
        if len(distinct) > MAX_MODELS_PER_RECIPE:
            raise limit_error(
                "MergeRecipe",
                ("slices",),
                f"the slices name {len(distinct)} different models; at most "
                f"{MAX_MODELS_PER_RECIPE} are accepted",
            )
        defaults = {p.name: p.default for p in self.method.parameters}
        for group in self.groups():
            shared = {**defaults, **(self.parameters or {}), **(group.parameters or {})}
            if self.method.whole_model_statistic(shared) is None:
                continue
            if "scope" in (group.parameters or {}) and group.parameters_at is not None:
                loc: Location = (*group.parameters_at, "scope")
            elif "scope" in (self.parameters or {}):
                loc = ("parameters", "scope")
            else:
                loc = ("merge_method",)
            raise limit_error(
                "MergeRecipe",
                loc,
                f"{self.merge_method!r} with these settings computes statistics over whole "
                "models, which slices are not: merge whole models (models:), or use a "
                "per-tensor scope",
            )

    def _check_base_as_model(self) -> None:
        """mergekit gives the added base only the top-level parameters and refuses a recipe
        where they set no weight for it; where the listed models set their own weights, the
        default weight (1) would be a silent guess, so it is refused here too."""
        spec = self.method
        top = self.parameters or {}
        own = [i for i, m in enumerate(self.models) if "weight" in (m.parameters or {})]
        if spec.parameter("weight") is not None and own and "weight" not in top:
            raise limit_error(
                "MergeRecipe",
                ("base_model",),
                f"{spec.name!r} merges base_model {str(self.base_model)!r} as one more model "
                "(as mergekit does when models does not list it), and no weight applies to "
                f"it while models[{own[0]}] sets its own: list the base among models with "
                "its weight, set a top-level parameters.weight, or remove base_model",
            )

    def _settings(self, group: InputGroup) -> RecipeSettings:
        """The parameter settings as written, for the method's own rules: a slice's
        parameters count as the top level's (``_locate`` maps the locations back)."""
        fine = {id(e) for e in group.fine_tuned(self.method)}
        return RecipeSettings(
            method=self.method,
            parameters={**(self.parameters or {}), **(group.parameters or {})},
            models=tuple(
                ModelSettings(i, e.parameters or {}, id(e) in fine)
                for i, e in enumerate(group.entries)
            ),
        )

    @staticmethod
    def _locate(group: InputGroup, loc: Location) -> Location:
        """A method rule's location (relative to ``models`` and the top level) in the recipe."""
        if group.parameters_at is None:
            return loc
        if loc and loc[0] == "models":
            return (*group.at, *loc[1:])
        if len(loc) >= 2 and loc[0] == "parameters" and loc[1] in (group.parameters or {}):
            return (*group.parameters_at, *loc[1:])
        return loc

    def _scopes(self) -> list[tuple[tuple[str | int, ...], dict[str, ParameterSetting] | None]]:
        """Each parameters mapping with its location in the recipe."""
        scopes: list[tuple[tuple[str | int, ...], dict[str, ParameterSetting] | None]] = [
            (("parameters",), self.parameters)
        ]
        for group in self.groups():
            if group.parameters_at is not None:
                scopes.append((group.parameters_at, group.parameters))
            scopes += [
                ((*group.at, i, "parameters"), e.parameters) for i, e in enumerate(group.entries)
            ]
        return scopes

    def _check_setting_sizes(self) -> None:
        """Gradient and filter lists are short (a value per layer at most) and filters are
        substrings of tensor names: cap both, pointing at the list or filter."""
        for at, params in self._scopes():
            for name, setting in (params or {}).items():
                loc = (*at, name)
                if isinstance(setting, list) and len(setting) > MAX_SETTING_ITEMS:
                    raise limit_error(
                        "MergeRecipe",
                        loc,
                        f"has {len(setting)} entries; at most {MAX_SETTING_ITEMS} are accepted",
                    )
                entries = setting if isinstance(setting, list) else [setting]
                for k, entry in enumerate(entries):
                    if not isinstance(entry, FilterValue):
                        continue
                    where = (*loc, k) if isinstance(setting, list) else loc
                    if entry.filter is not None and len(entry.filter) > MAX_FILTER_CHARS:
                        raise limit_error(
                            "MergeRecipe",
                            (*where, "filter"),
                            f"a filter is a substring of tensor names: at most "
                            f"{MAX_FILTER_CHARS} characters, got {len(entry.filter)}",
                        )
                    if isinstance(entry.value, list) and len(entry.value) > MAX_SETTING_ITEMS:
                        raise limit_error(
                            "MergeRecipe",
                            (*where, "value"),
                            f"has {len(entry.value)} entries; at most {MAX_SETTING_ITEMS} "
                            "are accepted",
                        )

    def _magnitudes(self, group: InputGroup, i: int | None, name: str) -> list[float]:
        """|value| of every number parameter ``name`` may take for entry ``i`` of ``group``
        (None: the shared level only), in precedence order: its own setting, the group's,
        the top level's, the default. A filter list whose entries may all miss a tensor
        falls through to the next."""
        scopes = [group.parameters, self.parameters]
        if i is not None:
            scopes.insert(0, group.entries[i].parameters)
        found: list[float] = []
        for scope in scopes:
            if not scope or name not in scope:
                continue
            setting = scope[name]
            found += [
                abs(float(v))
                for v in _scalars(setting)
                if isinstance(v, int | float) and not isinstance(v, bool)
            ]
            if _covers_every_tensor(setting):
                return found
        p = self.method.parameter(name)
        if p is not None and isinstance(p.default, int | float):
            found.append(abs(float(p.default)))
        return found

    def _check_float32_range(self) -> None:
        """Refuse a merge whose parameters alone make its float32 arithmetic overflow.

        Every method here sums the inputs' task vectors (or the models themselves, for
        linear) scaled by factors the recipe sets: wi for linear and PCB, λ·wi for the
        task-vector family, and λ·wi/density where DARE rescales by inverse_p. With those
        factors summing past the largest float32 (3.4e38), the float32 sum overflows for
        inputs of magnitude 1, and a factor past it is infinite in float32 on its own; any
        ordinary recipe (weights and λ near 1) is far inside the bound. Each value a
        setting may take (gradients, filter lists) counts at its largest; each slice is a
        merge of its own.
        """
        spec = self.method
        if spec.parameter("weight") is None:
            return  # model_stock, slerp: convex combinations, nothing to overflow
        for group in self.groups():
            self._check_group_range(group)

    def _check_group_range(self, group: InputGroup) -> None:
        spec = self.method
        lam = max(self._magnitudes(group, None, "lambda"), default=1.0)
        shared = {**(self.parameters or {}), **(group.parameters or {})}
        inverse_p = shared.get("rescale_mode") == "inverse_p"
        fine = {id(e) for e in group.fine_tuned(spec)}
        factors: list[tuple[float, int, str]] = []  # factor, entry, the setting driving it
        for i in (i for i, e in enumerate(group.entries) if id(e) in fine):
            weight = max(self._magnitudes(group, i, "weight"), default=1.0)
            scale = 1.0
            if inverse_p:
                densities = [d for d in self._magnitudes(group, i, "density") if 0 < d < 1]
                scale = 1 / min(densities) if densities else 1.0
            factors.append((weight * scale, i, "density" if scale > weight else "weight"))
        if not factors:
            return
        total = lam * sum(f for f, _, _ in factors)
        if total <= FLOAT32_MAX:
            return
        largest, i, name = max(factors)
        own = group.entries[i].parameters
        if lam > largest:
            in_group = group.parameters_at is not None and "lambda" in (group.parameters or {})
            loc: tuple[str | int, ...] = (
                (*group.parameters_at, "lambda")
                if in_group and group.parameters_at
                else ("parameters", "lambda")
            )
        elif own and name in own:
            loc = (*group.at, i, "parameters", name)
        elif group.parameters_at is not None and name in (group.parameters or {}):
            loc = (*group.parameters_at, name)
        else:
            loc = ("parameters", name)
        what = "|λ|·|weight|" if spec.parameter("lambda") is not None else "|weight|"
        if inverse_p:
            what += "/density"
        raise limit_error(
            "MergeRecipe",
            loc,
            f"the merge scales each model by {what}; summed over the models that is "
            f"{total:.3g}, past the largest float32 ({FLOAT32_MAX:.4g}) that the merge computes "
            "in, so its result would overflow: use weights and lambda of ordinary size",
        )

    def _check_parameters(
        self, at: tuple[str | int, ...], params: dict[str, ParameterSetting] | None
    ) -> None:
        """Each setting against the method's declared parameter; errors point at it."""
        if not params:
            return
        spec = self.method
        top_level = at == ("parameters",) or (
            at[0] == "slices" and at[-1] == "parameters" and len(at) == 3
        )
        for name, setting in params.items():
            loc = (*at, name)
            p = spec.parameter(name)
            if p is None:
                valid = ", ".join(spec.parameter_names) or "none"
                raise limit_error(
                    "MergeRecipe", loc, f"unknown parameter for {spec.name!r}; valid: {valid}"
                )
            if p.scope is ParamScope.SHARED and not top_level:
                raise limit_error(
                    "MergeRecipe",
                    loc,
                    f"{name!r} applies to the whole merge; set it under the top-level "
                    "'parameters'" + (" or a slice's 'parameters'" if self.slices else ""),
                )
            if not p.per_tensor and not isinstance(setting, Scalar):
                raise limit_error(
                    "MergeRecipe",
                    loc,
                    "must be a single value for the whole model (no gradient or filter list)",
                )
            for value in _scalars(setting):
                try:
                    p.check(value)
                except ValueError as e:
                    raise limit_error("MergeRecipe", loc, str(e), value) from None
            if isinstance(setting, list) and not setting:
                raise limit_error("MergeRecipe", loc, "an empty list sets nothing")
            if (
                isinstance(setting, list)
                and setting
                and all(isinstance(v, Scalar) for v in setting)
                and p.kind is not float
            ):
                raise limit_error("MergeRecipe", loc, "a gradient list needs numeric values")


def _covers_every_tensor(setting: ParameterSetting) -> bool:
    """False for a filter list that some tensor may match no entry of (then the next level
    of precedence applies to it)."""
    entries = setting if isinstance(setting, list) else [setting]
    filters = [e for e in entries if isinstance(e, FilterValue)]
    return not filters or any(f.filter in (None, "*") for f in filters)


def _scalars(setting: ParameterSetting) -> list[Scalar]:
    if isinstance(setting, FilterValue):
        return _scalars(setting.value)
    if isinstance(setting, list):
        out: list[Scalar] = []
        for s in setting:
            out.extend(_scalars(s))
        return out
    return [setting]


# ---------------------------------------------------------------------------------------------
# Parameter resolution (mergekit's rules), shared by the engine and the docs' examples.


def layer_position(layer: int | None, num_layers: int) -> float:
    """mergekit's gradient position t: i/(n−1) for layer i of n, 1 when n == 1, 0 outside."""
    if layer is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return layer / (num_layers - 1)


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float) -> Scalar | None:
    """Value of one setting for a tensor; None when no filter entry matches."""
    if isinstance(setting, FilterValue):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(s, FilterValue) for s in setting):
            for cond in setting:
                assert isinstance(cond, FilterValue)
                if cond.filter in (None, "*") or cond.filter in tensor_name:
                    return evaluate_setting(cond.value, tensor_name, t)
            return None
        values = [s for s in setting if not isinstance(s, FilterValue)]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        a, b = values[i0], values[i1]
        if isinstance(a, bool | str) or isinstance(b, bool | str):
            return values[i0]
        return (1 - frac) * float(a) + frac * float(b)
    return setting


def resolve_parameter(
    p: ParameterSpec,
    scopes: list[dict[str, ParameterSetting] | None],
    tensor_name: str,
    t: float,
) -> Any:
    for scope in scopes:
        if scope and p.name in scope:
            v = evaluate_setting(scope[p.name], tensor_name, t)
            if v is not None:
                return p.check(v)
    return p.default


class RecipeError(ValueError):
    """A recipe that failed validation; ``str()`` lists each problem as 'field: what is valid'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def format_location(loc: tuple[Any, ...]) -> str:
    """A location as the recipe field it names: ("slices", 0, "sources") → slices[0].sources
    (pydantic's own union and type steps left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (
            part.startswith(("function-", "union[", "literal[", "kind="))
            or part in ("str", "int", "float", "bool", "list[", "FilterValue", "ModelReference")
        ):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def format_validation_error(err: ValidationError) -> list[str]:
    seen: dict[str, str] = {}
    for e in err.errors():
        where = format_location(tuple(e["loc"]))
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        if where and msg.startswith(where + ":"):
            text = msg
        elif where:
            text = f"{where}: {msg}"
        else:
            text = msg
        seen.setdefault(where or msg, text)
    return list(seen.values())


def validate_document(model: type[_M], data: dict[str, Any] | str, shape_hint: str) -> _M:
    """Validate a recipe-like document given as a mapping or YAML/JSON text into ``model``.

    Raises RecipeError with one 'field: what is valid' line per problem; ``shape_hint`` says
    what the top level must look like when it is not a mapping.
    """
    if isinstance(data, str):
        try:
            data = yaml.safe_load(data)
        except yaml.YAMLError as e:
            raise RecipeError([f"recipe is not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise RecipeError([shape_hint])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e)) from None


def parse_recipe(data: dict[str, Any] | str) -> MergeRecipe:
    """Validate a merge recipe given as a mapping or YAML/JSON text. Raises RecipeError."""
    return validate_document(
        MergeRecipe, data, "recipe must be a mapping with at least 'merge_method' and 'models'"
    )
