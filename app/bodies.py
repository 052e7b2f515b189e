"""Request bodies as the API reads them: ``POST /v1/jobs`` as JSON or YAML, parsed within
the caps of :mod:`schemas.limits` (the size was checked while the body was read:
:mod:`app.limits`)."""

from __future__ import annotations

from pydantic import ValidationError

from app.limits import refused
from schemas.jobs import JobCreate, ProblemDetail
from schemas.limits import DocumentRefused, load_json_document, load_yaml_document
from service.errors import Problem

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def parse_job_request(body: bytes, content_type: str | None) -> JobCreate:
    """The request body as a JobCreate; raises Problem (415 or 422).

    The body's size was checked while it was read (app.limits); here it is parsed within
    the caps of schemas.limits: nesting, string and list sizes, no YAML anchors, aliases or
    tags, finite numbers.
    """
    media = (content_type or "application/json").split(";")[0].strip().lower()
    try:
        if media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json")):
            data = load_json_document(body)
        elif media in YAML_TYPES:
            data = load_yaml_document(body)
        else:
            raise Problem(
                415,
                f"unsupported content type {media[:100]!r}: send application/json or "
                "application/yaml",
            )
    except DocumentRefused as e:
        raise refused(e) from None
    if not isinstance(data, dict):
        raise Problem(
            422,
            "the body must be an object with 'kind', 'recipe' and 'artifact_name'",
            title="Invalid request",
        )
    try:
        return JobCreate.model_validate(data)
    except ValidationError as e:
        raise Problem.from_detail(ProblemDetail.from_validation_error(e)) from None
