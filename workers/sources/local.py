"""Local references: a checkpoint directory or a single ``.safetensors`` file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.references import ModelReference, ReferenceKind
from workers.errors import SourceError

from .selection import NoWeightsError, select_files
from .types import FileInfo, ResolvedModel, SourceSettings

LOCAL_DISABLED = (
    "local paths are disabled on this server; use a hub, s3:// or artifact:// reference"
)


def local_path(location: str, base_dir: Path | None) -> Path:
    """The absolute path a local reference names (``~`` expanded, relative to ``base_dir``/cwd)."""
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    return path.resolve()


def hub_shadow_dir(ref: ModelReference, base_dir: Path | None) -> Path | None:
    """The local directory an ``org/name`` reference names, if one exists.

    transformers and mergekit prefer an existing directory over the Hub repo of the same name;
    so does weightsmith, but only without an explicit ``@revision``.
    """
    if ref.kind is not ReferenceKind.HUB or ref.revision is not None:
        return None
    candidate = (base_dir if base_dir is not None else Path.cwd()) / ref.location
    return candidate.resolve() if candidate.is_dir() else None


def resolve_local(
    ref: ModelReference,
    settings: SourceSettings,
    *,
    base_dir: Path | None = None,
    path: Path | None = None,
) -> ResolvedModel:
    """Resolve a local reference (``path`` overrides the location, for hub-shaped references)."""
    model = str(ref)
    if not settings.allow_local:
        raise SourceError(LOCAL_DISABLED, model=model)
    target = path if path is not None else local_path(ref.location, base_dir)
    if not target.exists():
        raise SourceError(
            f"no such file or directory: {target} (paths are relative to "
            f"{'the recipe directory' if base_dir is not None else 'the working directory'})",
            model=model,
        )
    pinned = ModelReference(kind=ReferenceKind.LOCAL, location=str(target))
    if target.is_file():
        return _single_file(ref, pinned, target, settings)
    if not target.is_dir():
        raise SourceError(f"{target} is neither a file nor a directory", model=model)

    listing = {p.name: p for p in target.iterdir() if p.is_file()}

    def load_index(name: str) -> Any:
        try:
            return json.loads(listing[name].read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(f"cannot read {name}: {e}", model=model, file=name) from e

    try:
        selection = select_files(listing, allow_pickle=settings.allow_pickle, load_index=load_index)
    except NoWeightsError as e:
        raise SourceError(f"{target}: {e}", model=model) from e
    files = {name: FileInfo(size=listing[name].stat().st_size) for name in selection.files}
    return ResolvedModel(reference=ref, pinned=pinned, path=target, revision=None, files=files)


def _single_file(
    ref: ModelReference, pinned: ModelReference, target: Path, settings: SourceSettings
) -> ResolvedModel:
    model = str(ref)
    if target.suffix == ".bin" and not settings.allow_pickle:
        raise SourceError(
            f"{target.name} is a pickle file, which can run arbitrary code when loaded and is "
            "refused on this server; convert it to .safetensors or enable allow_pickle",
            model=model,
            file=target.name,
        )
    if target.suffix not in (".safetensors", ".bin"):
        raise SourceError(
            f"{target.name} is not a checkpoint: a local reference names a directory or a "
            ".safetensors file",
            model=model,
            file=target.name,
        )
    files = {target.name: FileInfo(size=target.stat().st_size)}
    return ResolvedModel(
        reference=ref, pinned=pinned, path=target.parent, revision=None, files=files
    )
