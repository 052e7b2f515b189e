"""The lineage of an artifact version: the graph of its parents, back through earlier
artifacts (merges, edits, uploads) to the models it started from (hub commits, ``s3://``
prefixes, local paths), as ``GET /v1/artifacts/{name}/versions/{version}/lineage`` returns it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

NodeKind = Literal["artifact", "hub", "s3", "local", "unknown"]


class LineageNode(BaseModel):
    """One model in the graph. ``id`` is its pinned reference (``artifact://name@3``,
    ``org/repo@<sha>``, ``s3://bucket/prefix``, a path): the edges name nodes by it."""

    id: str
    kind: NodeKind
    name: str | None = Field(default=None, description="artifact name or hub repo id")
    version: int | None = Field(default=None, description="artifact version")
    revision: str | None = Field(default=None, description="hub commit the input was pinned to")
    made_by: str | None = Field(
        default=None, description="artifacts: the manifest's kind (merge, edit, upload, …)"
    )
    method: str | None = Field(default=None, description="artifacts: merge or edit method")
    job_id: str | None = None
    flagged: bool = Field(default=False, description="an edit published despite its gate")
    missing: bool = Field(
        default=False, description="an artifact parent this tenant has no version of (any more)"
    )


class LineageEdge(BaseModel):
    child: str = Field(description="the node made from the parent")
    parent: str
    role: str = Field(description="the parent's role in the child's recipe (base, model, …)")


class Lineage(BaseModel):
    root: str
    nodes: list[LineageNode] = Field(description="the root first, then breadth first")
    edges: list[LineageEdge]
    truncated: bool = Field(
        default=False, description="the walk stopped at the node limit; some parents are left out"
    )
