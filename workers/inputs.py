"""A job's inputs as local files, read for the job's tenant only (service.tenancy): hub
downloads with the tenant's token, its own artifact versions, ``s3://`` prefixes under its
grants (with each grant's credentials), local paths where the operator allows them, and an
edit's covariance corpora. Every reference is checked here again, whatever the API checked
at submission (a grant may have been revoked since, or the job recorded some other way).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from infra.artifacts import (
    LATEST,
    MANIFEST,
    ArtifactError,
    download_artifact,
    input_manifest,
    resolve_artifact,
)
from infra.secrets import SecretBox
from infra.storage import (
    AccessDenied,
    BucketNotFound,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    StorageError,
)
from schemas.edit_recipe import CorpusPath, EditRecipe, parse_corpus_path
from schemas.references import ModelReference, ReferenceKind
from schemas.tenants import GrantError, TenantAccess
from service.tenancy import LocalPathRefused, check_local_path, open_granted_store, s3_refusal

if TYPE_CHECKING:
    from infra.db import JobStore
    from infra.settings import Settings
    from infra.storage.s3 import S3ObjectStore
    from schemas.lora_recipe import ExtractLoraRecipe
    from schemas.moe_recipe import MoeRecipe
    from schemas.recipe import MergeRecipe
    from workers.sources import ResolvedModel, SourceSettings
    from workers.watch import JobWatch


class FetchWatch(Protocol):
    """What fetching a job's inputs reports to and asks (a job's watch, or a part's)."""

    def report_inputs(self, fetched: int, total: int, nbytes: int) -> None: ...

    def check(self) -> None: ...


def source_settings(
    settings: Settings, access: TenantAccess, *, allow_pickle: bool
) -> SourceSettings:
    """How this worker resolves the job's references: the operator's hub endpoint and the
    tenant's Hub token (its own, or the service's where granted, else none at all)."""
    from workers.sources import SourceSettings

    return SourceSettings(
        hub_endpoint=settings.hf_endpoint,
        hub_token=access.hub_token or False,
        allow_local=settings.allow_local_paths,
        allow_pickle=allow_pickle and settings.allow_pickle,
    )


def tenant_access(store: JobStore, settings: Settings, tenant_id: int) -> TenantAccess:
    """The job's tenant with its grants and Hub token (service.tenancy), secrets opened."""
    from infra.db.tenants import TenantStore

    token = settings.hf_token.get_secret_value() if settings.hf_token is not None else None
    tenants = TenantStore(store.engine, SecretBox.from_settings(settings))
    return tenants.access(tenant_id, operator_hub_token=token)


def references(
    recipe: MergeRecipe | EditRecipe | ExtractLoraRecipe | MoeRecipe,
) -> list[ModelReference]:
    """The recipe's model references, each once (in recipe order)."""
    unique: dict[str, ModelReference] = {}
    for _, ref in recipe.references():
        unique.setdefault(str(ref), ref)
    return list(unique.values())


def resolve_inputs(
    recipe: MergeRecipe | EditRecipe | ExtractLoraRecipe | MoeRecipe,
    sources: SourceSettings,
    settings: Settings,
    object_store: ObjectStore,
    access: TenantAccess,
    work: Path,
    watch: FetchWatch,
) -> dict[str, ResolvedModel]:
    """Every reference of the recipe as local files: hub downloads, artifacts, s3, paths,
    each checked again against what the tenant may read (service.tenancy)."""
    from workers.errors import InputError
    from workers.sources import resolve_reference

    resolved: dict[str, ResolvedModel] = {}
    refs = references(recipe)
    fetched = 0
    for i, ref in enumerate(refs):
        watch.report_inputs(i, len(refs), fetched)
        watch.check()
        if ref.kind is ReferenceKind.ARTIFACT:
            dest = work / f"input-{i}"
            resolved[str(ref)] = _resolve_artifact(ref, object_store, access.name, dest)
        elif ref.kind is ReferenceKind.S3:
            resolved[str(ref)] = _resolve_s3(ref, settings, access, sources, work / f"input-{i}")
        else:
            if ref.kind is ReferenceKind.LOCAL:
                try:
                    check_local_path(ref.location, settings)
                except LocalPathRefused as e:
                    raise InputError(str(e), model=str(ref)) from None
            resolved[str(ref)] = resolve_reference(ref, sources)
        fetched += resolved[str(ref)].total_size
    watch.report_inputs(len(refs), len(refs), fetched)
    return resolved


def _local_checkpoint(
    ref: ModelReference, pinned: ModelReference, path: Path, revision: str | None
) -> ResolvedModel:
    """A downloaded folder as a resolved model that keeps its remote identity."""
    from dataclasses import replace

    from workers.sources import SourceSettings
    from workers.sources.local import resolve_local

    local = resolve_local(ref, SourceSettings(allow_local=True), path=path)
    return replace(local, pinned=pinned, revision=revision)


def _resolve_artifact(
    ref: ModelReference, object_store: ObjectStore, tenant: str, dest: Path
) -> ResolvedModel:
    from workers.errors import SourceError

    try:
        # The service pins "latest" at submission; an unpinned reference is pinned here.
        version = resolve_artifact(object_store, tenant, ref.location, ref.revision or LATEST)
        download_artifact(object_store, tenant, ref.location, version.version, dest)
    except ArtifactError as e:
        raise SourceError(str(e), model=str(ref), file=e.file) from None
    # the artifact's own record, not a model file: kept beside it (an edit of an edited
    # artifact reads which covariance samples its edit counted)
    if (dest / MANIFEST).exists():
        (dest / MANIFEST).replace(input_manifest(dest))
    pinned = ref.with_revision(str(version.version))
    return _local_checkpoint(ref, pinned, dest, str(version.version))


def _granted_store(
    raw: str,
    bucket: str,
    key: str,
    settings: Settings,
    access: TenantAccess,
    *,
    field: str | None = None,
) -> S3ObjectStore:
    """A client for ``s3://bucket/key`` with the credentials of the tenant's grant covering
    it; InputError (the same words as at submission) when no grant covers it."""
    from workers.errors import InputError

    grant = access.s3_grant_for(bucket, key)
    if grant is None:
        raise InputError(s3_refusal(raw), field=field, model=None if field else raw)
    try:
        return open_granted_store(grant, settings)
    except GrantError:
        raise InputError(s3_refusal(raw), field=field, model=None if field else raw) from None


def _resolve_s3(
    ref: ModelReference,
    settings: Settings,
    access: TenantAccess,
    sources: SourceSettings,
    dest: Path,
) -> ResolvedModel:
    """Fetch a checkpoint folder from an S3 location granted to the tenant, with that
    grant's credentials; only the files a merge needs."""
    from workers.errors import SourceError
    from workers.sources import SourceUnavailable, select_files
    from workers.sources.selection import NoWeightsError

    bucket, _, prefix = ref.location.partition("/")
    remote = _granted_store(str(ref), bucket, prefix, settings, access)
    try:
        base = f"{prefix}/" if prefix else ""
        listing = {info.key[len(base) :]: info for info in remote.list(base)}

        def load_index(name: str) -> Any:
            import json

            return json.loads(remote.get_bytes(base + name))

        selection = select_files(listing, allow_pickle=sources.allow_pickle, load_index=load_index)
        dest.mkdir(parents=True)
        for name in selection.files:
            remote.download_file(base + name, dest / name)
    except NoWeightsError as e:
        raise SourceError(f"{ref}: {e}", model=str(ref)) from None
    except (ObjectNotFound, BucketNotFound, AccessDenied, InvalidKey):
        raise SourceError(s3_refusal(str(ref)), model=str(ref)) from None
    except StorageError as e:
        raise SourceUnavailable(f"cannot read {ref}: {e}", model=str(ref)) from None
    return _local_checkpoint(ref, ref, dest, None)


# ---- merge ----------------------------------------------------------------------------------


MAX_CORPUS_FILE_BYTES = 1 << 30  # a covariance text file is read into memory whole


def fetch_corpus(
    recipe: EditRecipe,
    settings: Settings,
    object_store: ObjectStore,
    access: TenantAccess,
    dest: Path,
    watch: JobWatch,
) -> list[Path]:
    """The covariance text files of ``covariance.paths`` as local files, in order.

    ``s3://`` reads a location granted to the tenant with that grant's credentials,
    ``artifact://`` this tenant's artifacts (the file's sha256 checked against the
    manifest), a local path only where the operator allows local paths (service.tenancy).
    Missing or refused files fail the job (InputError)."""
    from workers.errors import InputError
    from workers.sources import SourceUnavailable

    dest.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for i, raw in enumerate(recipe.covariance.paths):
        watch.check()
        where = f"covariance.paths[{i}]"
        loc = parse_corpus_path(raw)  # validated with the recipe
        target = dest / f"{i}.txt"
        try:
            if loc.kind == "local":
                files.append(_local_corpus(raw, settings, where))
                continue
            if loc.kind == "s3":
                _s3_corpus(raw, loc.container or "", loc.path, settings, access, target, where)
            else:
                _artifact_corpus(object_store, access.name, loc, target)
        except ArtifactError as e:
            raise InputError(f"{raw}: {e}", field=where) from None
        except FileNotFoundError as e:
            raise InputError(f"{raw}: {e}", field=where) from None
        except StorageError as e:
            raise SourceUnavailable(f"cannot read {raw}: {e}", field=where) from None
        files.append(target)
    return files


def _local_corpus(raw: str, settings: Settings, where: str) -> Path:
    from workers.errors import InputError

    try:
        path = check_local_path(raw, settings)
    except LocalPathRefused as e:
        raise InputError(str(e), field=where) from None
    if not path.is_file():
        raise InputError(f"{raw!r} is not a text file", field=where)
    _check_corpus_size(raw, path.stat().st_size, where)
    return path


def _check_corpus_size(raw: str, size: int, where: str) -> None:
    from workers.errors import InputError

    if size > MAX_CORPUS_FILE_BYTES:
        raise InputError(
            f"{raw} has {size} bytes; a covariance text file may have at most "
            f"{MAX_CORPUS_FILE_BYTES} (split it into several files)",
            field=where,
        )


def _s3_corpus(
    raw: str,
    bucket: str,
    key: str,
    settings: Settings,
    access: TenantAccess,
    target: Path,
    where: str,
) -> None:
    """s3://bucket/key from a location granted to the tenant; InputError, with the words
    used at submission, when it is absent or not granted."""
    from workers.errors import InputError

    remote = _granted_store(raw, bucket, key, settings, access, field=where)
    try:
        info = remote.stat(key)
        if info is not None:
            _check_corpus_size(raw, info.size, where)
            remote.download_file(key, target)
    except (ObjectNotFound, BucketNotFound, AccessDenied, InvalidKey):
        info = None
    if info is None:
        raise InputError(s3_refusal(raw), field=where)


def _artifact_corpus(object_store: ObjectStore, tenant: str, loc: CorpusPath, target: Path) -> None:
    """One file of a published artifact version, checked against its manifest's sha256."""
    from infra.artifacts import read_manifest

    assert loc.container is not None and loc.version is not None
    manifest = read_manifest(object_store, tenant, loc.container, loc.version)
    files = [f for f in manifest.get("files") or [] if isinstance(f, dict)]
    entry = next((f for f in files if f.get("path") == loc.path), None)
    if entry is None:
        listed = ", ".join(str(f.get("path")) for f in files[:10])
        raise FileNotFoundError(
            f"artifact {loc.container!r} version {loc.version} has no file {loc.path!r} "
            f"(it has: {listed})"
        )
    _check_corpus_size(str(loc), int(entry.get("size", 0)), "covariance.paths")
    version = resolve_artifact(object_store, tenant, loc.container, loc.version)
    object_store.download_file(version.prefix + loc.path, target, sha256=str(entry["sha256"]))
