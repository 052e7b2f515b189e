"""Dispatch from a reference kind to the backend that resolves (or pins) it.

A backend is a function ``(ref, settings, base_dir) -> ResolvedModel`` and optionally a pinning
function ``(ref, settings, base_dir) -> ModelReference``. ``s3://`` and ``artifact://`` resolve
only inside the service for now: the service plugs its backends in with ``register_backend``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from schemas.references import ModelReference, ReferenceKind
from workers.errors import SourceError

from .hub import pin_hub, resolve_hub
from .local import LOCAL_DISABLED, hub_shadow_dir, resolve_local
from .types import ResolvedModel, SourceSettings

Resolver = Callable[[ModelReference, SourceSettings, Path | None], ResolvedModel]
Pinner = Callable[[ModelReference, SourceSettings, Path | None], ModelReference]


def _resolve_hub(
    ref: ModelReference, settings: SourceSettings, base_dir: Path | None
) -> ResolvedModel:
    if settings.allow_local:
        shadow = hub_shadow_dir(ref, base_dir)
        if shadow is not None:
            return resolve_local(ref, settings, base_dir=base_dir, path=shadow)
    return resolve_hub(ref, settings)


def _pin_hub(
    ref: ModelReference, settings: SourceSettings, base_dir: Path | None
) -> ModelReference:
    if settings.allow_local and hub_shadow_dir(ref, base_dir) is not None:
        return ref  # a local directory: nothing to pin
    return pin_hub(ref, settings)


def _resolve_local(
    ref: ModelReference, settings: SourceSettings, base_dir: Path | None
) -> ResolvedModel:
    return resolve_local(ref, settings, base_dir=base_dir)


def _pin_local(
    ref: ModelReference, settings: SourceSettings, base_dir: Path | None
) -> ModelReference:
    if not settings.allow_local:
        raise SourceError(LOCAL_DISABLED, model=str(ref))
    return ref


def _service_only(
    ref: ModelReference, settings: SourceSettings, base_dir: Path | None
) -> ResolvedModel:
    raise SourceError(
        f"{ref} resolves only inside the weightsmith service (submit the recipe as a job)",
        model=str(ref),
    )


def _unchanged(
    ref: ModelReference, settings: SourceSettings, base_dir: Path | None
) -> ModelReference:
    return ref


_RESOLVERS: dict[ReferenceKind, Resolver] = {
    ReferenceKind.HUB: _resolve_hub,
    ReferenceKind.LOCAL: _resolve_local,
    ReferenceKind.S3: _service_only,
    ReferenceKind.ARTIFACT: _service_only,
}
_PINNERS: dict[ReferenceKind, Pinner] = {
    ReferenceKind.HUB: _pin_hub,
    ReferenceKind.LOCAL: _pin_local,
    ReferenceKind.S3: _unchanged,
    ReferenceKind.ARTIFACT: _unchanged,
}


def register_backend(kind: ReferenceKind, resolve: Resolver, pin: Pinner | None = None) -> None:
    """Install the backend for a kind of reference (the service does this for s3/artifact)."""
    _RESOLVERS[kind] = resolve
    if pin is not None:
        _PINNERS[kind] = pin


def resolve_reference(
    ref: ModelReference, settings: SourceSettings, *, base_dir: Path | None = None
) -> ResolvedModel:
    """Turn a reference into local files at a fixed revision (downloading hub files if needed).

    ``base_dir``: the directory relative local paths start from (the recipe's), else the cwd.
    Raises ``SourceError`` (``SourceUnavailable`` when retrying later may help).
    """
    return _RESOLVERS[ref.kind](ref, settings, base_dir)


def pin_reference(
    ref: ModelReference, settings: SourceSettings, *, base_dir: Path | None = None
) -> ModelReference:
    """The reference with a hub branch/tag replaced by its current commit sha (no download).

    Other kinds come back unchanged (a local path is refused when ``allow_local`` is off).
    """
    return _PINNERS[ref.kind](ref, settings, base_dir)
