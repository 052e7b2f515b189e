"""Walk an artifact version's manifests back to the models it started from.

Each published manifest lists its ``parents`` with the reference each was pinned to. An
``artifact://name@N`` parent has a manifest of its own (read from the same tenant's
artifacts only: another tenant's names are never looked up), so the walk goes on through it;
a hub commit, an ``s3://`` prefix or a local path ends the walk. Artifacts are immutable and a
version can only name versions published before it, so the graph has no cycles; the walk
still visits each node once and stops at :data:`MAX_LINEAGE_NODES`.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from infra.artifacts import ArtifactError, read_manifest
from infra.storage import ObjectStore
from schemas.lineage import Lineage, LineageEdge, LineageNode
from schemas.references import ReferenceKind, parse_reference

MAX_LINEAGE_NODES = 200


def artifact_lineage(store: ObjectStore, tenant: str, name: str, version: int) -> Lineage:
    """The lineage graph of ``tenant``'s ``name`` version ``version`` (which must exist:
    its manifest is read first, and :class:`infra.artifacts.ArtifactNotFound` propagates)."""
    root_manifest = read_manifest(store, tenant, name, version)
    root = _artifact_node(name, version, root_manifest)
    nodes: dict[str, LineageNode] = {root.id: root}
    edges: list[LineageEdge] = []
    queue: deque[tuple[LineageNode, dict[str, Any]]] = deque([(root, root_manifest)])
    truncated = False
    while queue:
        child, manifest = queue.popleft()
        for role, pinned in _parents(manifest):
            node = nodes.get(pinned)
            if node is None:
                if len(nodes) >= MAX_LINEAGE_NODES:
                    truncated = True
                    continue
                node, parent_manifest = _parent_node(store, tenant, pinned)
                nodes[node.id] = node
                if parent_manifest is not None:
                    queue.append((node, parent_manifest))
            edges.append(LineageEdge(child=child.id, parent=node.id, role=role))
    return Lineage(root=root.id, nodes=list(nodes.values()), edges=edges, truncated=truncated)


def _parents(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for entry in manifest.get("parents") or []:
        if not isinstance(entry, dict):
            continue
        pinned = entry.get("pinned") or entry.get("reference")
        if isinstance(pinned, str) and pinned:
            found.append((str(entry.get("role") or "model"), pinned))
    return found


def _artifact_node(name: str, version: int, manifest: dict[str, Any]) -> LineageNode:
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    method = manifest.get("method") or (recipe or {}).get("edit_method")
    record = manifest.get("artifact") if isinstance(manifest.get("artifact"), dict) else {}
    return LineageNode(
        id=f"artifact://{name}@{version}",
        kind="artifact",
        name=name,
        version=version,
        made_by=str(manifest.get("kind") or "merge"),
        method=str(method) if method else None,
        job_id=str((record or {}).get("job_id")) if (record or {}).get("job_id") else None,
        flagged=manifest.get("flagged") is True,
    )


def _parent_node(
    store: ObjectStore, tenant: str, pinned: str
) -> tuple[LineageNode, dict[str, Any] | None]:
    try:
        ref = parse_reference(pinned)
    except ValueError:
        return LineageNode(id=pinned, kind="unknown"), None
    if ref.adapter is not None:  # BASE+ADAPTER as one parent: shown as written
        return LineageNode(id=pinned, kind="unknown", name=pinned), None
    if ref.kind is ReferenceKind.ARTIFACT:
        version = ref.revision or "latest"
        try:
            manifest = read_manifest(store, tenant, ref.location, version)
        except ArtifactError:
            number = int(version) if version.isdigit() else None
            return LineageNode(
                id=pinned, kind="artifact", name=ref.location, version=number, missing=True
            ), None
        number = int(manifest.get("artifact", {}).get("version") or version)
        return _artifact_node(ref.location, number, manifest), manifest
    if ref.kind is ReferenceKind.HUB:
        return LineageNode(id=pinned, kind="hub", name=ref.location, revision=ref.revision), None
    if ref.kind is ReferenceKind.S3:
        return LineageNode(id=pinned, kind="s3", name=f"s3://{ref.location}"), None
    return LineageNode(id=pinned, kind="local", name=ref.location), None
