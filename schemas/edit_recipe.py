"""The edit recipe: ROME / MEMIT / AlphaEdit knowledge edits of one model (docs/editing.md).

Validated once here (no torch) for the API, the CLI and the worker. What only the model can
tell — the number of layers, the architecture — is checked by the worker at run time.
Every default is declared once, on its field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.limits import (
    FLOAT32_MAX,
    MAX_CONTEXT_TEMPLATES,
    MAX_CORPUS_PATHS,
    MAX_COVARIANCE_TOKENS,
    MAX_EDIT_REQUESTS,
    MAX_LAYER_INDEX,
    MAX_LAYERS,
    MAX_NAME_CHARS,
    MAX_PROMPTS_PER_REQUEST,
    MAX_REFERENCE_CHARS,
    MAX_TEMPLATE_COUNT,
    MAX_TEMPLATE_TOKENS,
    MAX_TEXT_CHARS,
    MAX_TRACE_SAMPLES,
)
from schemas.recipe import validate_document
from schemas.references import VERSION_NUMBER, Location, ModelReference

EditMethod = Literal["rome", "memit", "alphaedit"]
EDIT_METHODS: tuple[str, ...] = ("rome", "memit", "alphaedit")
# AlphaEdit's published settings (Fang et al. 2025; the reference code's hparams for GPT-2 XL,
# GPT-J and Llama-3-8B): eigenvalues of C below the threshold span the null space
DEFAULT_NULLSPACE_THRESHOLD = 2e-2
DEFAULT_ALPHAEDIT_L2 = 10.0


MAX_KEEP_PROMPTS = MAX_PROMPTS_PER_REQUEST
# Prompts and targets are sentences; every float is finite and within float32's range (the
# model the edit runs in computes in it or narrower).
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Prompts = Annotated[list[Text], Field(max_length=MAX_PROMPTS_PER_REQUEST)]
_NUMBERS = ConfigDict(extra="forbid", allow_inf_nan=False)


class EditRequest(BaseModel):
    """One fact to rewrite: ``prompt`` contains ``subject``; the model should continue it
    with ``target_new`` (instead of ``target_true``)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text
    subject: Text
    target_new: Text
    target_true: Text | None = None
    paraphrase_prompts: Prompts = Field(default_factory=list)
    neighborhood_prompts: Prompts = Field(default_factory=list)
    keep_prompts: Annotated[
        list[Text],
        Field(
            max_length=MAX_KEEP_PROMPTS,
            description="prompts whose predictions the edit must leave unchanged: the edited "
            "module's input at every token of each is held fixed (ΔW k = 0), so their whole "
            "forward pass is unchanged. Scored as keep_unchanged; a prompt listed here and in "
            "neighborhood_prompts is no longer a held-out test of specificity",
        ),
    ] = Field(default_factory=list)

    @field_validator("prompt", "subject", "target_new")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("target_true")
    @classmethod
    def _non_empty_opt(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty (leave it out instead)")
        return v

    @model_validator(mode="after")
    def _subject_in_prompt(self) -> EditRequest:
        if self.subject not in self.prompt:
            raise ValueError(
                f"subject: {self.subject!r} does not occur in the prompt {self.prompt!r} "
                "(the key is read at the subject's last token, so the prompt must contain it "
                "verbatim)"
            )
        for i, p in enumerate(self.paraphrase_prompts):
            if self.subject not in p:
                raise ValueError(
                    f"paraphrase_prompts[{i}]: {p!r} does not contain the subject {self.subject!r}"
                )
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise ValueError("target_new: equals target_true; nothing would change")
        for i, p in enumerate(self.keep_prompts):
            if not p.strip():
                raise ValueError(f"keep_prompts[{i}]: must not be empty")
            if p.strip() == self.prompt.strip():
                raise ValueError(
                    f"keep_prompts[{i}]: {p!r} is the prompt being edited; it cannot also "
                    "keep its answer"
                )
        return self


LN2 = math.log(2)
DEFAULT_EDIT_MARGIN = 2.0


class EditHyperparameters(BaseModel):
    """Defaults follow EasyEdit's Llama settings (ROME) and the MEMIT paper. The layers are
    by default the published ones scaled by depth (``layers: null``); ``auto`` chooses them
    by a causal trace. ``None`` elsewhere means "the default for this model"."""

    model_config = _NUMBERS

    layers: Annotated[
        Literal["auto"]
        | Annotated[list[Annotated[int, Field(le=MAX_LAYER_INDEX)]], Field(max_length=MAX_LAYERS)]
        | None,
        Field(
            description="edited layers: null (default), auto, or a list of indices. auto: "
            "chosen by a causal trace of the requests' prompts (the MLP output at the "
            "subject's last token with the largest indirect effect among layers 1 … ⌊depth/2⌋; "
            "MEMIT: a band starting there, as wide as the null default). A list: those "
            "layers (ROME exactly one). null: ROME layer 1; MEMIT and AlphaEdit the published "
            "band scaled to the model's depth (layers 4–8 of 32); auto is not the default "
            "because on SmolLM2 it edited less specifically than layer 1 (docs/editing.md)",
        ),
    ] = None
    trace_samples: Annotated[
        int,
        Field(
            ge=1,
            le=MAX_TRACE_SAMPLES,
            description="layers: auto: corrupted runs (noise draws) per prompt of the trace",
        ),
    ] = 10
    trace_noise: Annotated[
        float,
        Field(
            gt=0,
            le=100,
            description="layers: auto: the noise added to the subject's token embeddings has "
            "standard deviation trace_noise × the std of the model's input embedding matrix "
            "(ROME: 3 × the std of subject embeddings)",
        ),
    ] = 3.0
    v_num_grad_steps: Annotated[int, Field(ge=1, le=1000)] = 25
    v_lr: Annotated[float, Field(gt=0, le=FLOAT32_MAX)] = 0.5
    v_loss_layer: Annotated[
        int | None,
        Field(
            ge=0, le=MAX_LAYER_INDEX, description="layer whose output feeds the loss; default last"
        ),
    ] = None
    v_weight_decay: Annotated[float, Field(ge=0, le=FLOAT32_MAX)] = 1e-3
    v_early_stop_loss: Annotated[
        float, Field(ge=0, le=FLOAT32_MAX, description="stop the v* optimisation below this loss")
    ] = 0.05
    sufficient_loss: Annotated[
        float | None,
        Field(
            gt=0,
            lt=LN2,
            description="ROME, opt-in: scale the update down to the least multiple (to 1/128) "
            "under which every rewrite prompt's mean target NLL is at most this, measured on "
            "the edited model; below ln 2 target_new keeps most of the probability on every "
            "rewrite prompt, the bare prompt included. A smaller edit spills less onto "
            "similar subjects and generalises less to paraphrases (docs/editing.md). null: "
            "the whole optimised update, as published. Not for memit",
        ),
    ] = None
    edit_margin: Annotated[
        float | None,
        Field(
            gt=0,
            le=100,
            description="ROME: scale the update down to the least multiple (to 1/128) under "
            "which the prompt prefers target_new to target_true (mean per-token log-prob) by "
            "this many times the margin m₀ (at least 1 nat) by which the unedited model "
            "preferred target_true: 1 turns the preference around by as much as the model "
            "held it. The whole optimised update often moves the margin by 2–4 × m₀, and "
            "the excess spills onto subjects with similar keys (docs/editing.md). null: the "
            "whole update, as published. Default 2 for rome; not for memit",
        ),
    ] = DEFAULT_EDIT_MARGIN
    clamp_norm_factor: Annotated[
        float | None,
        Field(gt=0, le=FLOAT32_MAX, description="ROME: ‖δ‖ ≤ factor·‖v_init‖; default 4"),
    ] = None
    kl_factor: Annotated[float, Field(ge=0, le=FLOAT32_MAX)] = 0.0625
    mom2_adjustment: Annotated[
        bool, Field(description="ROME: u = C⁻¹k̄ (true) or u = k̄ (false, C = I)")
    ] = True
    mom2_update_weight: Annotated[
        float | None,
        Field(
            gt=0,
            le=FLOAT32_MAX,
            description="MEMIT λ in ΔW = R Kᵀ(λC + KKᵀ)⁻¹. Default: the MEMIT paper's 15,000 "
            "for Llama's 11,008-wide keys, scaled by the model's key width d_in",
        ),
    ] = None
    nullspace_threshold: Annotated[
        float | None,
        Field(
            gt=0,
            le=FLOAT32_MAX,
            description="alphaedit: the null space of the preserved keys is spanned by the "
            "eigenvectors of C whose eigenvalue is below this (absolute, C = the keys' "
            "uncentered second moment); the update is projected onto it. Default 2e-2 (the "
            "paper's). Not for rome or memit",
        ),
    ] = None
    alphaedit_l2: Annotated[
        float | None,
        Field(
            gt=0,
            le=FLOAT32_MAX,
            description="alphaedit: the weight of ‖ΔP‖² in Δ = R K₁ᵀP(KₚKₚᵀP + K₁K₁ᵀP + "
            "l2·I)⁻¹; default 10 (the paper's code). Not for rome or memit",
        ),
    ] = None
    memit_clamp_norm_factor: Annotated[
        float, Field(gt=0, le=FLOAT32_MAX, description="MEMIT: ‖δ‖ ≤ factor·‖z_init‖")
    ] = 0.75
    context_template_counts: Annotated[
        list[tuple[int, int]],
        Field(
            max_length=MAX_CONTEXT_TEMPLATES,
            description="(number of prefixes, tokens each) sampled from the model",
        ),
    ] = Field(default_factory=lambda: [(10, 5), (10, 10)])
    key_mode: Annotated[
        Literal["consistent", "original"],
        Field(
            description="consistent: numerator and denominator use the prefix-averaged key "
            "(r-ROME); original: the unprefixed key as in kmeng01/rome"
        ),
    ] = "consistent"

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_form(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "auto":
            raise ValueError(
                f"{v!r} is not valid: write auto (chosen by a causal trace), a list of layer "
                "indices such as [1], or null (the published layers scaled to the depth)"
            )
        if v is not None and not isinstance(v, (str, list)):
            raise ValueError(
                f"{v!r} is not valid: write auto, a list of layer indices such as [1], or null"
            )
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | str | None) -> list[int] | str | None:
        if v is None or isinstance(v, str):
            return v
        if not v:
            raise ValueError("an empty list edits nothing; write auto or leave it out")
        if any(x < 0 for x in v):
            raise ValueError(f"layer indices start at 0, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"layer indices repeat: {v}")
        return sorted(v)

    @field_validator("context_template_counts")
    @classmethod
    def _counts(cls, v: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if any(n < 0 or length < 1 for n, length in v):
            raise ValueError("each entry is (count ≥ 0, tokens ≥ 1)")
        if any(n > MAX_TEMPLATE_COUNT or length > MAX_TEMPLATE_TOKENS for n, length in v):
            raise ValueError(
                f"each entry is (count ≤ {MAX_TEMPLATE_COUNT}, tokens ≤ {MAX_TEMPLATE_TOKENS})"
            )
        return v


_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_ARTIFACT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,99}$")
CORPUS_FORMS = (
    "s3://BUCKET/KEY, artifact://NAME@VERSION/PATH (a pinned version number) or a local path "
    "(only where the operator allows local paths)"
)


@dataclass(frozen=True)
class CorpusPath:
    """One covariance text file: ``kind`` s3 (``container`` = bucket, ``path`` = key),
    artifact (``container`` = artifact name, ``version``, ``path`` inside it) or local."""

    kind: Literal["s3", "artifact", "local"]
    path: str
    container: str | None = None
    version: int | None = None

    def __str__(self) -> str:
        if self.kind == "s3":
            return f"s3://{self.container}/{self.path}"
        if self.kind == "artifact":
            return f"artifact://{self.container}@{self.version}/{self.path}"
        return self.path


def _relative_key(raw: str, key: str, what: str) -> str:
    parts = key.split("/")
    if not key or key.endswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"{raw!r}: the {what} must name one file (no empty, '.' or '..' segments, no "
            f"trailing '/'); valid forms: {CORPUS_FORMS}"
        )
    return key


def parse_corpus_path(raw: str) -> CorpusPath:
    """Parse one entry of ``covariance.paths``; raises ValueError saying what is valid."""
    s = raw.strip()
    if not s:
        raise ValueError(f"an empty path; valid forms: {CORPUS_FORMS}")
    if s.startswith("s3://"):
        bucket, _, key = s[len("s3://") :].partition("/")
        if not _S3_BUCKET.match(bucket):
            raise ValueError(
                f"{raw!r}: {bucket!r} is not an S3 bucket name (3-63 lowercase letters, digits, "
                "'.' and '-'); write s3://BUCKET/KEY"
            )
        return CorpusPath("s3", _relative_key(raw, key, "object key"), container=bucket)
    if s.startswith("artifact://"):
        head, _, path = s[len("artifact://") :].partition("/")
        name, at, version = head.partition("@")
        if not _ARTIFACT_NAME.match(name):
            raise ValueError(
                f"{raw!r}: {name!r} is not an artifact name (lowercase letters, digits, '.', "
                "'_' and '-'); write artifact://NAME@VERSION/PATH"
            )
        if not at or not VERSION_NUMBER.match(version) or int(version) < 1:
            raise ValueError(
                f"{raw!r}: a corpus in an artifact needs a pinned version number, e.g. "
                f"artifact://{name}@1/{path or 'corpus.txt'} (a corpus must not move under a "
                "cached covariance)"
            )
        return CorpusPath(
            "artifact",
            _relative_key(raw, path, "path inside the artifact"),
            container=name,
            version=int(version),
        )
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", s):
        raise ValueError(f"{raw!r}: unsupported scheme; valid forms: {CORPUS_FORMS}")
    return CorpusPath("local", s)


def _corpus_path(raw: str) -> str:
    parse_corpus_path(raw)
    return raw


class CovarianceSource(BaseModel):
    """Where the keys' second moment C comes from. ``model_samples``: text sampled from the
    model itself with ``seed`` (no download needed); ``text``: UTF-8 files the user gives."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["model_samples", "text"] = "model_samples"
    tokens: Annotated[
        int | None,
        Field(
            ge=256,
            le=MAX_COVARIANCE_TOKENS,
            description="tokens to accumulate; default 10 × the key dimension",
        ),
    ] = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    paths: Annotated[
        list[Annotated[str, Field(max_length=MAX_REFERENCE_CHARS), AfterValidator(_corpus_path)]],
        Field(
            max_length=MAX_CORPUS_PATHS,
            description="text: local paths, s3:// or artifact:// references",
        ),
    ] = Field(default_factory=list)
    max_length: Annotated[int, Field(ge=16, le=8192, description="tokens per sequence")] = 256

    @model_validator(mode="after")
    def _paths(self) -> CovarianceSource:
        if self.source == "text" and not self.paths:
            raise ValueError("paths: source 'text' needs at least one text file")
        if self.source == "model_samples" and self.paths:
            raise ValueError("paths: only used with source 'text'")
        return self


class GateThresholds(BaseModel):
    """The safety gate: an edit breaking one of these fails the job (see on_gate_failure)."""

    model_config = _NUMBERS

    max_perplexity_ratio: Annotated[float, Field(gt=1.0, le=FLOAT32_MAX)] = 1.10
    max_relative_update_norm: Annotated[
        float | None,
        Field(
            gt=0,
            le=FLOAT32_MAX,
            description="‖ΔW‖/‖W‖ per layer; default 0.5 (ROME, MEMIT and AlphaEdit)",
        ),
    ] = None
    min_denominator: Annotated[
        float, Field(ge=0, le=FLOAT32_MAX, description="ROME: |uᵀk̄| floor (relative to ‖u‖·‖k̄‖)")
    ] = 1e-3


class EditOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str | None, Field(max_length=MAX_NAME_CHARS)] = None


DEFAULT_MAX_RELATIVE_UPDATE = {"rome": 0.5, "memit": 0.5, "alphaedit": 0.5}


class EditRecipe(BaseModel):
    """What to edit and how. See docs/editing.md for every field."""

    model_config = ConfigDict(extra="forbid")

    edit_method: EditMethod
    model: ModelReference
    requests: Annotated[
        list[EditRequest], Field(max_length=MAX_EDIT_REQUESTS, json_schema_extra={"minItems": 1})
    ]
    hyperparameters: EditHyperparameters = Field(default_factory=EditHyperparameters)
    covariance: CovarianceSource = Field(default_factory=CovarianceSource)
    gate: GateThresholds = Field(default_factory=GateThresholds)
    on_gate_failure: Literal["fail", "publish_flagged"] = "fail"
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    output: EditOutput = Field(default_factory=EditOutput)

    @field_validator("model")
    @classmethod
    def _model_without_adapter(cls, v: ModelReference) -> ModelReference:
        if v.adapter is not None:
            raise ValueError(
                "an edit applies to one checkpoint; a LoRA adapter (BASE+ADAPTER) is a merge "
                f"input only: merge {v} first (e.g. a linear merge of it alone), then edit the "
                "artifact"
            )
        return v

    def references(self) -> list[tuple[Location, ModelReference]]:
        """Every model reference of the recipe and where it stands: the edited model.
        (Covariance corpora are files, not models: see ``covariance.paths``.)"""
        return [(("model",), self.model)]

    @model_validator(mode="before")
    @classmethod
    def _known_method(cls, data: Any) -> Any:
        if isinstance(data, dict):
            m = data.get("edit_method")
            if isinstance(m, str) and m not in EDIT_METHODS:
                raise ValueError(
                    f"edit_method: unknown method {m!r}; valid: {', '.join(EDIT_METHODS)}"
                )
        return data

    @model_validator(mode="after")
    def _check(self) -> EditRecipe:
        if not self.requests:
            raise ValueError("requests: at least one edit request is needed")
        if self.edit_method == "rome":
            if len(self.requests) != 1:
                raise ValueError(
                    f"requests: rome edits one fact per run, got {len(self.requests)}; use "
                    "memit for a batch"
                )
            layers = self.hyperparameters.layers
            if isinstance(layers, list) and len(layers) != 1:
                raise ValueError(
                    f"hyperparameters.layers: rome edits exactly one layer, got {layers}"
                )
            h = self.hyperparameters
            if (
                h.sufficient_loss is not None
                and h.edit_margin is not None
                and "edit_margin" in h.model_fields_set
            ):
                raise ValueError(
                    "hyperparameters.edit_margin: set either edit_margin or sufficient_loss "
                    "(both scale the update); sufficient_loss alone replaces the default "
                    "edit_margin"
                )
            if h.sufficient_loss is not None:
                h.edit_margin = None  # sufficient_loss replaces the default
        else:
            h = self.hyperparameters
            for name in ("sufficient_loss", "edit_margin"):
                if name in h.model_fields_set and getattr(h, name) is not None:
                    raise ValueError(
                        f"hyperparameters.{name}: applies to rome only; {self.edit_method} "
                        "spreads its update over layers and keeps the whole update"
                    )
            h.edit_margin = None  # the rome default does not apply
        h = self.hyperparameters
        if self.edit_method == "alphaedit":
            if h.nullspace_threshold is None:
                h.nullspace_threshold = DEFAULT_NULLSPACE_THRESHOLD
            if h.alphaedit_l2 is None:
                h.alphaedit_l2 = DEFAULT_ALPHAEDIT_L2
        else:
            for name in ("nullspace_threshold", "alphaedit_l2"):
                if getattr(h, name) is not None:
                    raise ValueError(
                        f"hyperparameters.{name}: applies to alphaedit only, not {self.edit_method}"
                    )
        edited = {r.prompt.strip(): i for i, r in enumerate(self.requests)}
        for i, r in enumerate(self.requests):
            for j, p in enumerate(r.keep_prompts):
                if p.strip() in edited:
                    raise ValueError(
                        f"requests[{i}].keep_prompts[{j}]: {p!r} is the prompt of "
                        f"requests[{edited[p.strip()]}], which this batch edits"
                    )
        return self

    @property
    def max_relative_update(self) -> float:
        bound = self.gate.max_relative_update_norm
        return bound if bound is not None else DEFAULT_MAX_RELATIVE_UPDATE[self.edit_method]

    @property
    def clamp_norm_factor(self) -> float:
        h = self.hyperparameters
        if h.clamp_norm_factor is not None:
            return h.clamp_norm_factor
        return 4.0 if self.edit_method == "rome" else h.memit_clamp_norm_factor


def parse_edit_recipe(data: dict[str, Any] | str) -> EditRecipe:
    """Validate an edit recipe given as a mapping or YAML/JSON text. Raises RecipeError."""
    return validate_document(
        EditRecipe, data, "an edit recipe is a mapping with 'edit_method', 'model', 'requests'"
    )
