"""Jobs: what a client submits, what it reads back, and how errors are reported.

The REST API, the job store and the worker all speak these models; nothing here does I/O.

- ``JobCreate`` — the body of ``POST /v1/jobs``: ``{"kind", "recipe", "artifact_name",
  "callback_url"?}``. The recipe is validated here against the kind's recipe model
  (:data:`RECIPE_TYPES`: a merge, an edit, a LoRA extraction, a MoE assembly), so a bad
  recipe is refused with the location of each problem (``recipe.models[0].model``).
- ``JobView`` — one job as the API returns it: state, progress, timestamps, attempts, the
  error (what was wrong and where) or the published artifact, and the recipe with every
  reference pinned (hub commit sha, artifact version).
- ``JobList`` — one page of jobs, newest first, with an opaque ``next_cursor``.
- ``ProblemDetail`` — an ``application/problem+json`` error body (RFC 9457) with an
  ``errors`` list for per-field problems.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from schemas.edit_recipe import EditRecipe
from schemas.limits import (
    MAX_RECIPE_BYTES,
    MAX_URL_CHARS,
    DocumentRefused,
    check_document,
    limit_error,
)
from schemas.lora_recipe import ExtractLoraRecipe
from schemas.moe_recipe import MoeRecipe
from schemas.recipe import MergeRecipe
from schemas.references import _ARTIFACT_NAME, _REVISION  # the one rule for each

PROBLEM_JSON = "application/problem+json"


class JobKind(StrEnum):
    MERGE = "merge"
    EDIT = "edit"
    EXTRACT_LORA = "extract_lora"
    MOE = "moe"


Recipe = MergeRecipe | EditRecipe | ExtractLoraRecipe | MoeRecipe
RECIPE_TYPES: dict[
    JobKind, type[MergeRecipe] | type[EditRecipe] | type[ExtractLoraRecipe] | type[MoeRecipe]
] = {
    JobKind.MERGE: MergeRecipe,
    JobKind.EDIT: EditRecipe,
    JobKind.EXTRACT_LORA: ExtractLoraRecipe,
    JobKind.MOE: MoeRecipe,
}
_RECIPE_DOCS = {
    JobKind.MERGE: "docs/recipes.md",
    JobKind.EDIT: "docs/editing.md",
    JobKind.EXTRACT_LORA: "docs/extract-lora.md",
    JobKind.MOE: "docs/moe.md",
}


def parse_job_recipe(kind: JobKind, recipe: Mapping[str, Any]) -> Recipe:
    """The recipe of a job of ``kind``, validated (raises pydantic's ValidationError)."""
    return RECIPE_TYPES[kind].model_validate(recipe)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


_HUB_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def _url_length(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_URL_CHARS:
        raise ValueError(f"a URL has at most {MAX_URL_CHARS} characters, got {len(value)}")
    return value


HttpUrl = Annotated[AnyHttpUrl, BeforeValidator(_url_length)]
"""An http(s) URL of at most MAX_URL_CHARS characters (webhook receivers, callbacks)."""


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined (none of these models is
    recursive), so it can sit anywhere in an OpenAPI document."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return {**resolve(defs[ref.removeprefix("#/$defs/")]), **resolve(rest)}
            return {k: resolve(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    out: dict[str, Any] = resolve(schema)
    return out


def _recipe_json_schema(schema: dict[str, Any]) -> None:
    # The recipe is kept as a mapping (its hash identifies the request); on the wire it is a
    # recipe of one of the kinds, which the OpenAPI document says.
    schema["anyOf"] = [inline_refs(recipe.model_json_schema()) for recipe in RECIPE_TYPES.values()]


def job_create_json_schema() -> dict[str, Any]:
    """The body of ``POST /v1/jobs`` as one self-contained JSON Schema: one variant per job
    kind (``merge`` with a merge recipe, ``edit``, ``extract_lora``, ``moe``), for the OpenAPI
    document."""
    variants = []
    for kind, recipe in RECIPE_TYPES.items():
        schema = inline_refs(JobCreate.model_json_schema())
        schema["properties"]["kind"] = {"type": "string", "enum": [kind.value]}
        schema["properties"]["recipe"] = {
            **inline_refs(recipe.model_json_schema()),
            "description": f"a {kind.value} recipe ({_RECIPE_DOCS[kind]})",
        }
        variants.append(schema)
    return {"oneOf": variants}


def canonical_json_bytes(document: Any) -> int:
    """Size of ``document`` as stored: JSON with sorted keys, no whitespace, UTF-8."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return len(text.encode())


class PublishOptions(BaseModel):
    """Where else a job's artifact goes once it is published in object storage."""

    model_config = ConfigDict(extra="forbid")

    hub_repo: str | None = Field(
        default=None,
        description="a Hugging Face model repo 'org/name' the artifact is pushed to "
        "(created if missing) with its model card, in one commit",
        examples=["my-org/llama-ties"],
    )
    private: bool = Field(default=False, description="create the hub repo as private")
    branch: str = Field(
        default="main", max_length=255, description="the hub branch the commit goes to"
    )

    @field_validator("branch")
    @classmethod
    def _branch(cls, branch: str) -> str:
        if not _REVISION.match(branch):
            raise ValueError(
                "a branch name is letters, digits, '.', '_', '-' and '/', starting with a "
                "letter or digit"
            )
        return branch

    @field_validator("hub_repo")
    @classmethod
    def _hub_repo(cls, repo: str | None) -> str | None:
        if repo is not None and not _HUB_REPO.match(repo):
            raise ValueError(
                "a hub repo is 'org/name': letters, digits, '.', '_' or '-', "
                "each part at most 96 characters"
            )
        return repo


class HubCommit(BaseModel):
    """The Hub commit a job's artifact was pushed as (written by the worker, read-only)."""

    repo: str = Field(examples=["my-org/llama-ties"])
    branch: str
    commit_sha: str = Field(description="the commit that holds the artifact's files")
    commit_url: str
    artifact: str = Field(description="the artifact version pushed, artifact://name@version")
    pushed_at: datetime


class PublishView(PublishOptions):
    """``publish`` as a job reports it: the options sent, and what the push did."""

    hub_commit: HubCommit | None = Field(
        default=None, description="set once the artifact is on the Hub (the job then succeeds)"
    )


class JobCreate(BaseModel):
    """Body of ``POST /v1/jobs``. Moving references in ``recipe`` are pinned by the API."""

    model_config = ConfigDict(extra="forbid")

    kind: JobKind
    recipe: dict[str, Any] = Field(
        description="a merge recipe (see docs/recipes.md), an edit recipe (docs/editing.md), "
        "a LoRA extraction recipe (docs/extract-lora.md) or a MoE recipe (docs/moe.md), as a "
        "JSON object",
        json_schema_extra=_recipe_json_schema,
    )
    artifact_name: str = Field(
        description="name the result is published under; each successful job adds a version",
        examples=["llama-ties"],
        json_schema_extra={"pattern": _ARTIFACT_NAME.pattern},
    )
    callback_url: HttpUrl | None = Field(
        default=None, description="called (Standard Webhooks) when the job reaches a final state"
    )
    publish: PublishOptions | None = Field(
        default=None, description="also push the artifact elsewhere (the Hugging Face Hub)"
    )
    reuse: bool = Field(
        default=True,
        description="when a version of this artifact was already built from the same pinned "
        "recipe and seed (a merge whose inputs are hub commits or artifact versions), answer "
        "with it at once (the job succeeds with phase 'reused') instead of running again; "
        "a job with publish.hub_repo always runs",
    )

    @field_validator("recipe")
    @classmethod
    def _recipe_matches_kind(cls, recipe: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Validating here (errors nested under 'recipe.…') keeps one source of truth for the
        # recipe; the mapping itself is kept as sent, so its hash identifies the request.
        # It is stored and returned as JSON: it must be plain JSON, and small.
        try:
            check_document(recipe)
        except DocumentRefused as e:
            raise limit_error("JobCreate", _location(e.pointer), e.message) from None
        size = canonical_json_bytes(recipe)
        if size > MAX_RECIPE_BYTES:
            raise ValueError(
                f"the recipe is {size} bytes as JSON; at most {MAX_RECIPE_BYTES} are accepted"
            )
        kind = info.data.get("kind")
        if isinstance(kind, JobKind):
            parse_job_recipe(kind, recipe)
        return recipe

    @field_validator("artifact_name")
    @classmethod
    def _artifact_name(cls, name: str) -> str:
        if "@" in name:
            raise ValueError("an artifact name has no version; the service assigns versions")
        if not _ARTIFACT_NAME.match(name):
            raise ValueError(
                "an artifact name is 1 to 100 lowercase letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return name


class JobProgress(BaseModel):
    phase: str | None = Field(
        default=None, description="what the worker is doing: resolving, downloading, merging, …"
    )
    tensors_done: int = Field(default=0, ge=0)
    tensors_total: int | None = Field(default=None, ge=0)
    bytes_done: int = Field(default=0, ge=0)
    bytes_total: int | None = Field(default=None, ge=0)


class JobError(BaseModel):
    """Why a job failed, and where: the same fields as the engine's ``WeightsmithError``."""

    message: str
    field: str | None = None
    model: str | None = None
    tensor: str | None = None
    file: str | None = None
    detail: str | None = Field(default=None, description="the message with its location")
    metrics: dict[str, Any] | None = Field(
        default=None,
        description="edit jobs stopped by the safety gate: the measured metrics, with "
        "metrics.gate.failures naming each threshold broken and its value",
    )


class ArtifactRef(BaseModel):
    """A published, immutable artifact version (``artifact://name@version``)."""

    name: str
    version: int = Field(ge=1)
    uri: str = Field(description="where the artifact's files are, e.g. s3://bucket/name/3/")


class JobView(BaseModel):
    """One job as the API returns it."""

    id: str
    kind: JobKind
    state: JobState
    artifact_name: str
    recipe: dict[str, Any] = Field(description="the recipe with every reference pinned")
    progress: JobProgress = Field(default_factory=JobProgress)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = Field(default=0, ge=0, description="times a worker has started the job")
    max_attempts: int = Field(ge=1)
    cancel_requested: bool = False
    error: JobError | None = None
    artifact: ArtifactRef | None = None
    callback_url: str | None = None
    publish: PublishView | None = None
    schedule_id: str | None = Field(default=None, description="the schedule that started it")


class JobList(BaseModel):
    """One page of jobs, newest first. Pass ``next_cursor`` back as ``cursor`` for the next."""

    items: list[JobView]
    next_cursor: str | None = None


class ProblemItem(BaseModel):
    """One problem in a request (RFC 9457 §3 example): what is wrong, and where."""

    detail: str
    pointer: str | None = Field(
        default=None, description="JSON Pointer (RFC 6901) into the request body, e.g. /recipe"
    )


class ProblemDetail(BaseModel):
    """An ``application/problem+json`` body (RFC 9457). Extension members are allowed."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int = Field(ge=400, le=599)
    detail: str | None = None
    instance: str | None = None
    errors: list[ProblemItem] = Field(default_factory=list)

    @classmethod
    def from_validation_error(
        cls,
        err: ValidationError,
        *,
        status: int = 422,
        title: str = "Invalid request",
        instance: str | None = None,
    ) -> ProblemDetail:
        """One ``errors`` entry per pydantic error, located by a JSON Pointer into the body."""
        return cls.from_errors(err.errors(), status=status, title=title, instance=instance)

    @classmethod
    def from_errors(
        cls,
        errors: Sequence[Mapping[str, Any]],
        *,
        status: int = 422,
        title: str = "Invalid request",
        instance: str | None = None,
        loc_root: str | None = None,
    ) -> ProblemDetail:
        """Like from_validation_error, for error dicts such as FastAPI's
        ``RequestValidationError.errors()``; ``loc_root`` (e.g. ``"body"``) is dropped from
        the start of each location."""
        items = []
        for e in errors:
            loc = tuple(e.get("loc", ()))
            if loc_root is not None and loc[:1] == (loc_root,):
                loc = loc[1:]
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            items.append(ProblemItem(detail=msg, pointer=_json_pointer(loc)))
        shown = [f"{item.pointer or '/'}: {item.detail}" for item in items[:3]]
        detail = "; ".join(shown) + ("; …" if len(items) > 3 else "")
        return cls(title=title, status=status, detail=detail, instance=instance, errors=items)


def _location(pointer: str) -> tuple[str | int, ...]:
    """A JSON Pointer back as a location (digits as list indices)."""
    if not pointer:
        return ()
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]
    return tuple(int(p) if p.isascii() and p.isdigit() else p for p in parts)


def _json_pointer(loc: tuple[Any, ...]) -> str:
    # RFC 6901 escaping; pydantic adds union/function tags to locations, which are not keys.
    parts = [
        str(p).replace("~", "~0").replace("/", "~1")
        for p in loc
        if not (isinstance(p, str) and p.startswith(("function-", "union[", "literal[")))
    ]
    return "/" + "/".join(parts) if parts else ""
