"""Value types shared by the source backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from schemas.references import ModelReference
from workers.errors import SourceError


@dataclass(frozen=True)
class FileInfo:
    """One checkpoint file: its size in bytes and sha256 (``None`` where not computed)."""

    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference turned into local files at a fixed revision."""

    reference: ModelReference  # as written in the recipe
    pinned: ModelReference  # hub: revision = 40-char commit sha; local: absolute path
    path: Path  # local directory holding the checkpoint files
    revision: str | None  # commit sha for hub models, None for local
    files: dict[str, FileInfo]  # relative name -> size, sha256

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())


@dataclass(frozen=True)
class SourceSettings:
    """Where and how references resolve. ``hub_token`` is never logged nor put in errors."""

    hub_endpoint: str | None = None  # None = huggingface_hub default / HF_ENDPOINT at import
    # None: huggingface_hub's own (HF_TOKEN, a saved login), for the local CLI; False: no
    # token at all (the service's anonymous tenants: never the operator's by accident).
    hub_token: str | Literal[False] | None = field(default=None, repr=False)
    cache_dir: Path | None = None  # HF cache dir for downloads (None = HF_HUB_CACHE)
    allow_local: bool = True
    allow_pickle: bool = False
    max_download_bytes: int | None = None  # refuse hub checkpoints bigger than this


class SourceUnavailable(SourceError):
    """The source could not be reached or answered with a transient failure: retry later.

    A ``SourceError`` is an input problem that retrying will not fix; this subclass is the
    exception (endpoint down, 5xx, rate limit, a download that arrived corrupted).
    """

    retryable = True
