"""Model references: where a checkpoint comes from, parsed without any I/O.

Forms accepted (the same string works in a recipe, on the CLI and in the API):

- ``org/name`` or ``org/name@revision`` — a Hugging Face Hub repository (``hf://`` prefix optional)
- ``/abs/path``, ``./rel/path``, ``../rel``, ``~/path`` or ``file:///abs/path`` — a local directory
  or ``.safetensors`` file
- ``s3://bucket/prefix`` — a checkpoint folder in S3-compatible storage (service only)
- ``artifact://name[@version]`` — an earlier weightsmith artifact (service only)
- ``BASE+ADAPTER`` — a PEFT LoRA adapter (any form above but another ``+``) applied to
  BASE tensor by tensor as it is read, as mergekit writes it (``org/base+org/adapter``);
  a reference has at most one ``+``, so a path containing ``+`` cannot be named
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, model_serializer, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from schemas.limits import MAX_REFERENCE_CHARS

_HUB_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,254}$")
_ARTIFACT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,99}$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# An artifact version: ASCII digits only (str.isdigit() also accepts '²' and '①', which
# int() refuses), at most 18 of them (a 64-bit integer).
VERSION_NUMBER = re.compile(r"^[0-9]{1,18}$")


# The forms of parse_reference as JSON Schema patterns (ECMA regex), for the OpenAPI document.
JSON_SCHEMA_PATTERNS = (
    r"^(hf://)?[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}"
    r"(@[A-Za-z0-9][A-Za-z0-9_.\-/]{0,254})?$",
    r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?$",
    r"^artifact://[a-z0-9][a-z0-9_.\-]{0,99}(@([0-9]{1,18}|latest))?$",
    r"^(/|\./|\.\./|~|file:///)",
    r"^[^+\s]+\+[^+\s]+$",  # BASE+ADAPTER, each part one of the forms above
)

# The parts of a BASE+ADAPTER reference, as the last element of a Location.
BASE_PART = "base"
ADAPTER_PART = "adapter"
PARTS = (BASE_PART, ADAPTER_PART)


class ReferenceKind(StrEnum):
    HUB = "hub"
    LOCAL = "local"
    S3 = "s3"
    ARTIFACT = "artifact"


Location = tuple[str | int, ...]
"""Where a reference stands in a recipe: keys and list indices, e.g. ("models", 0, "model")."""


class ReferenceError_(ValueError):
    """A model reference string that matches none of the accepted forms."""


def _fail(raw: str, why: str) -> ReferenceError_:
    return ReferenceError_(
        f"invalid model reference {raw!r}: {why}. Valid forms: 'org/name[@revision]' "
        "(Hugging Face Hub, 'hf://' optional), a local path starting with '/', './', '../' or "
        "'~', 's3://bucket/prefix', 'artifact://name[@version]', and 'BASE+ADAPTER' (a PEFT "
        "LoRA adapter applied to BASE, each part one of the other forms)"
    )


class ModelReference(BaseModel):
    """A parsed model reference. ``str(ref)`` gives back its canonical string."""

    model_config = ConfigDict(frozen=True)

    kind: ReferenceKind
    # hub: repo id; local: path as written; s3: "bucket/prefix"; artifact: name
    location: str
    # hub: branch, tag or commit; artifact: version number as a string or "latest"
    revision: str | None = None
    # BASE+ADAPTER: the PEFT LoRA adapter applied to the model the fields above name
    adapter: ModelReference | None = None

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # On the wire a reference is a string in one of the forms of this module.
        return {
            "type": "string",
            "maxLength": MAX_REFERENCE_CHARS,
            "description": "a model reference: org/name[@revision], s3://bucket/prefix, "
            "artifact://name[@version], or a local path (where the operator allows them); "
            "BASE+ADAPTER applies a PEFT LoRA adapter to BASE",
            "anyOf": [{"pattern": p} for p in JSON_SCHEMA_PATTERNS],
            "examples": [
                "org/name@main",
                "s3://models/base",
                "artifact://soup@1",
                "org/base+org/lora-adapter",
            ],
        }

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            ref = parse_reference(data)
            return {
                "kind": ref.kind,
                "location": ref.location,
                "revision": ref.revision,
                "adapter": ref.adapter,
            }
        return data

    @model_validator(mode="after")
    def _one_adapter(self) -> ModelReference:
        if self.adapter is not None and self.adapter.adapter is not None:
            raise ValueError("a LoRA adapter cannot itself have an adapter (one '+' at most)")
        return self

    @model_serializer
    def _to_string(self) -> str:
        return str(self)

    @property
    def is_immutable(self) -> bool:
        """True when the reference names bytes that cannot change: a hub commit sha or an
        artifact version number. A branch, ``latest``, an ``s3://`` prefix or a local path
        can change under the same name. BASE+ADAPTER: both parts."""
        if self.adapter is not None:
            return self.base.is_immutable and self.adapter.is_immutable
        if self.kind is ReferenceKind.HUB:
            return self.revision is not None and bool(COMMIT_SHA.match(self.revision))
        if self.kind is ReferenceKind.ARTIFACT:
            return self.revision is not None and bool(VERSION_NUMBER.match(self.revision))
        return False

    def with_revision(self, revision: str) -> ModelReference:
        return ModelReference(
            kind=self.kind, location=self.location, revision=revision, adapter=self.adapter
        )

    @property
    def base(self) -> ModelReference:
        """The model itself, without its adapter (itself when it has none)."""
        if self.adapter is None:
            return self
        return ModelReference(kind=self.kind, location=self.location, revision=self.revision)

    def parts(self, at: Location) -> list[tuple[Location, ModelReference]]:
        """The references to fetch, pin and check for this one standing at ``at``: itself,
        or for BASE+ADAPTER each part, its location ending with ``"base"``/``"adapter"``."""
        if self.adapter is None:
            return [(at, self)]
        return [((*at, BASE_PART), self.base), ((*at, ADAPTER_PART), self.adapter)]

    def __str__(self) -> str:
        if self.adapter is not None:
            return f"{self.base}+{self.adapter}"
        if self.kind is ReferenceKind.HUB:
            return self.location + (f"@{self.revision}" if self.revision else "")
        if self.kind is ReferenceKind.S3:
            return f"s3://{self.location}"
        if self.kind is ReferenceKind.ARTIFACT:
            return f"artifact://{self.location}" + (f"@{self.revision}" if self.revision else "")
        return self.location


def split_parts(raw: str) -> tuple[str, str] | None:
    """``(BASE, ADAPTER)`` of a ``BASE+ADAPTER`` string as written (stripped), else None."""
    s = raw.strip()
    if "+" not in s:
        return None
    base, _, adapter = s.partition("+")
    return base.strip(), adapter.strip()


def part_of(raw: str, part: str) -> str:
    """The ``base`` or ``adapter`` part of a ``BASE+ADAPTER`` string, as written."""
    parts = split_parts(raw)
    if parts is None or part not in PARTS:
        raise ValueError(f"{raw!r} has no {part!r} part")
    return parts[PARTS.index(part)]


def with_part(raw: str, part: str, value: str) -> str:
    """``raw`` (``BASE+ADAPTER``) with its ``part`` replaced by ``value``."""
    parts = list(split_parts(raw) or ())
    if not parts or part not in PARTS:
        raise ValueError(f"{raw!r} has no {part!r} part")
    parts[PARTS.index(part)] = value
    return "+".join(parts)


def parse_reference(raw: str) -> ModelReference:
    """Classify a reference string by its syntax alone (no file system or network access)."""
    if not isinstance(raw, str) or not raw.strip():
        raise _fail(str(raw), "it is empty")
    if len(raw) > MAX_REFERENCE_CHARS:
        raise _fail(raw[:60] + "…", f"it is longer than {MAX_REFERENCE_CHARS} characters")
    parts = split_parts(raw)
    if parts is None:
        return _parse_single(raw, raw.strip())
    if "+" in parts[1]:
        raise _fail(raw, "a reference has at most one '+' (BASE+ADAPTER)")
    for part, value in zip(PARTS, parts, strict=True):
        if not value:
            raise _fail(raw, f"the {part} part of BASE+ADAPTER is empty")
    base = _parse_single(raw, parts[0], BASE_PART)
    adapter = _parse_single(raw, parts[1], ADAPTER_PART)
    return ModelReference(
        kind=base.kind, location=base.location, revision=base.revision, adapter=adapter
    )


def _parse_single(raw: str, s: str, part: str | None = None) -> ModelReference:
    """One reference without '+'; errors name the ``part`` of BASE+ADAPTER it is."""
    what = f"its {part} {s!r}: " if part is not None else ""

    def fail(raw: str, why: str) -> ReferenceError_:
        return _fail(raw, what + why)

    if s.startswith("file://"):
        path = s[len("file://") :]
        if not path.startswith("/"):
            raise fail(raw, "a file:// reference needs an absolute path")
        return ModelReference(kind=ReferenceKind.LOCAL, location=path)
    if s.startswith(("/", "./", "../", "~")) or s in (".", ".."):
        return ModelReference(kind=ReferenceKind.LOCAL, location=s)
    if s.startswith("s3://"):
        rest = s[len("s3://") :].strip("/")
        bucket, _, prefix = rest.partition("/")
        if not _S3_BUCKET.match(bucket):
            raise fail(raw, f"{bucket!r} is not a valid bucket name")
        prefix = prefix.rstrip("/")
        if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
            # a server that normalises paths could resolve them outside a granted prefix
            raise fail(raw, "an s3:// prefix has no empty, '.' or '..' segments")
        return ModelReference(kind=ReferenceKind.S3, location=f"{bucket}/{prefix}".rstrip("/"))
    if s.startswith("artifact://"):
        rest = s[len("artifact://") :]
        name, at, version = rest.partition("@")
        if not _ARTIFACT_NAME.match(name):
            raise fail(raw, "an artifact name uses lowercase letters, digits, '.', '_' and '-'")
        if at and not (VERSION_NUMBER.match(version) and int(version) > 0) and version != "latest":
            raise fail(raw, f"artifact version {version!r} is not a positive integer or 'latest'")
        return ModelReference(kind=ReferenceKind.ARTIFACT, location=name, revision=version or None)
    if "://" in s and not s.startswith("hf://"):
        scheme = s.split("://", 1)[0]
        raise fail(raw, f"unknown scheme {scheme!r}")
    if s.startswith("hf://"):
        s = s[len("hf://") :]
    repo, at, revision = s.partition("@")
    if not _HUB_REPO.match(repo):
        raise fail(raw, "a hub repository id is 'org/name'")
    if at and not _REVISION.match(revision):
        raise fail(raw, f"revision {revision!r} is not a valid branch, tag or commit")
    return ModelReference(kind=ReferenceKind.HUB, location=repo, revision=revision or None)
