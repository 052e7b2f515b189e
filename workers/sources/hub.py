"""Hugging Face Hub references: pin a branch or tag to a commit, download only what a merge needs.

The endpoint and token are passed explicitly to every huggingface_hub call: the library reads
``HF_ENDPOINT`` once, at import time, so the environment cannot be relied on.

Flow of ``resolve_hub``: ``model_info(files_metadata=True)`` gives the commit sha and each file's
size and hashes; the needed files are selected (``selection.py``; for a sharded checkpoint the
index is downloaded first to learn its shards); ``snapshot_download(revision=<sha>,
allow_patterns=<exact names>)`` fetches them; each file is then checked against the metadata
(size; sha256 for LFS files, git blob sha1 for small ones). A corrupt file is deleted from the
cache so that a retry downloads it again.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from infra.hub import HubFailureKind, classify_hub_error, is_network_error
from schemas.references import ModelReference
from workers.errors import SourceError

from .selection import NoWeightsError, Selection, select_files
from .types import FileInfo, ResolvedModel, SourceSettings, SourceUnavailable
from .verify import Expected, Mismatch, remove_cached, verify_file

logger = logging.getLogger(__name__)

DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class HubPlan:
    """What ``model_info`` told about a revision: its commit and the files to fetch."""

    repo_id: str
    sha: str
    selection: Selection
    expected: dict[str, Expected]  # every file of the revision


# ---------------------------------------------------------------------------- errors


def _endpoint(settings: SourceSettings) -> str:
    if settings.hub_endpoint:
        url = settings.hub_endpoint
    else:
        from huggingface_hub import constants

        url = constants.ENDPOINT
    parts = urlsplit(url)
    if parts.username or parts.password:  # never echo credentials embedded in the URL
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url.rstrip("/")


def _scrub(text: str, settings: SourceSettings) -> str:
    secrets = [settings.hub_token]
    try:
        from huggingface_hub import get_token

        secrets.append(get_token())
    except Exception:  # reading a saved token must never break error reporting
        pass
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _fail(
    ref: ModelReference,
    settings: SourceSettings,
    message: str,
    *,
    cause: BaseException | None = None,
    retryable: bool = False,
    file: str | None = None,
) -> NoReturn:
    cls = SourceUnavailable if retryable else SourceError
    error = cls(_scrub(message, settings), model=_scrub(str(ref), settings), file=file)
    raise error from cause


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(e).__name__


def _raise_hub_error(
    e: BaseException, ref: ModelReference, settings: SourceSettings, *, sha: str | None = None
) -> NoReturn:
    """Translate a huggingface_hub / network exception into a SourceError telling what to do
    (the failure's kind from infra.hub.classify_hub_error, worded for a download)."""
    repo = ref.location
    has_token = bool(settings.hub_token)
    failure = classify_hub_error(e)
    kind = failure.kind
    gated = (
        f"{repo} is gated or private: access needs a Hugging Face token with access to it "
        "(the tenant's own: PUT /v1/tenant/hub-token)"
        + (
            "; the token used has no access (accept the model's conditions on its Hub page "
            "with the token's account, or use another token)"
            if has_token
            else ""
        )
    )
    if kind in (HubFailureKind.GATED, HubFailureKind.UNAUTHORIZED, HubFailureKind.FORBIDDEN):
        _fail(ref, settings, gated, cause=e)
    if kind is HubFailureKind.REPO_NOT_FOUND:
        hint = (
            "check the repo id, or it is private and the token used has no access"
            if has_token
            else "check the repo id, or it is private: set a token"
        )
        _fail(ref, settings, f"repository {repo} not found on the Hub ({hint})", cause=e)
    if kind is HubFailureKind.REVISION_NOT_FOUND:
        rev = ref.revision or DEFAULT_REVISION
        _fail(
            ref,
            settings,
            f"revision {rev!r} not found in {repo} (check the branch, tag or commit sha)",
            cause=e,
        )
    if kind is HubFailureKind.DISABLED:
        _fail(ref, settings, f"{repo} has been disabled on the Hub", cause=e)
    if kind is HubFailureKind.ENTRY_NOT_FOUND:
        _fail(
            ref,
            settings,
            f"a file listed by the Hub is missing from {repo} at commit {sha}",
            cause=e,
        )
    if kind is HubFailureKind.BUSY:
        _fail(
            ref,
            settings,
            f"the Hub endpoint {_endpoint(settings)} answered HTTP {failure.status} for {repo}; "
            "try again later",
            cause=e,
            retryable=True,
        )
    if failure.status is not None:
        _fail(ref, settings, f"the Hub answered HTTP {failure.status} for {repo}", cause=e)
    if kind is HubFailureKind.OFFLINE:
        _fail(
            ref,
            settings,
            f"{repo} is not in the local cache and Hub access is disabled (HF_HUB_OFFLINE=1)",
            cause=e,
        )
    if kind is HubFailureKind.UNREACHABLE:
        _fail(
            ref,
            settings,
            f"the Hugging Face Hub endpoint {_endpoint(settings)} could not be reached to fetch "
            f"{repo} ({type(e).__name__}); check the network or the hub_endpoint setting and retry",
            cause=e,
            retryable=True,
        )
    if isinstance(e, OSError):
        _fail(
            ref,
            settings,
            f"downloading {repo} failed: {_first_line(e)}",
            cause=e,
            retryable=True,
        )
    raise e


# ---------------------------------------------------------------------------- metadata


def _api(settings: SourceSettings) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=settings.hub_endpoint, token=settings.hub_token)


def _model_info(ref: ModelReference, settings: SourceSettings) -> Any:
    try:
        info = _api(settings).model_info(
            ref.location, revision=ref.revision or DEFAULT_REVISION, files_metadata=True
        )
    except Exception as e:
        _raise_hub_error(e, ref, settings)
    if not info.sha:
        _fail(ref, settings, f"the Hub returned no commit sha for {ref.location}")
    return info


def pin_hub(ref: ModelReference, settings: SourceSettings) -> ModelReference:
    """The reference with its branch/tag replaced by the commit it points to now (no download).

    A reference already pinned to a sha is checked too: the repo and commit must exist.
    """
    info = _model_info(ref, settings)
    if ref.revision != info.sha:
        logger.info("pinned %s to commit %s", ref, info.sha)
    return ref.with_revision(str(info.sha))


def _expected_files(info: Any) -> dict[str, Expected]:
    expected: dict[str, Expected] = {}
    for s in info.siblings or []:
        if s.lfs is not None:
            expected[s.rfilename] = Expected(size=s.lfs.size, sha256=s.lfs.sha256)
        else:
            expected[s.rfilename] = Expected(size=s.size, blob_id=s.blob_id)
    return expected


# ---------------------------------------------------------------------------- download


def _glob_escape(name: str) -> str:
    """``allow_patterns`` are fnmatch patterns: make a file name match only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _cache_dir(settings: SourceSettings) -> Path:
    if settings.cache_dir is not None:
        return Path(settings.cache_dir).expanduser().resolve()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().resolve()


def _snapshot_dir(settings: SourceSettings, repo_id: str, sha: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    return _cache_dir(settings) / folder / "snapshots" / sha


def _check(
    ref: ModelReference, settings: SourceSettings, path: Path, name: str, expected: Expected
) -> str:
    """Verify one downloaded file; a corrupt one is removed from the cache."""
    try:
        return verify_file(path, expected)
    except FileNotFoundError as e:
        _fail(
            ref, settings, f"{name} is missing after download", cause=e, retryable=True, file=name
        )
    except Mismatch as e:
        remove_cached(path)
        _fail(
            ref,
            settings,
            f"{name} is corrupt: its {e.what} is {e.actual} but the Hub lists {e.expected}; the "
            "cached copy was deleted, retry to download it again",
            cause=e,
            retryable=True,
            file=name,
        )


def _download_index(
    ref: ModelReference, settings: SourceSettings, plan_sha: str, name: str, expected: Expected
) -> Any:
    from huggingface_hub import hf_hub_download

    try:
        path = Path(
            hf_hub_download(
                ref.location,
                name,
                revision=plan_sha,
                cache_dir=settings.cache_dir,
                endpoint=settings.hub_endpoint,
                token=settings.hub_token,
            )
        )
    except Exception as e:
        _raise_hub_error(e, ref, settings, sha=plan_sha)
    _check(ref, settings, path, name, expected)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(ref, settings, f"{name} is not valid JSON: {e}", cause=e, file=name)


def plan_hub(ref: ModelReference, settings: SourceSettings) -> HubPlan:
    """Pin the revision and select the files to fetch (downloads at most a weight index)."""
    info = _model_info(ref, settings)
    sha = str(info.sha)
    expected = _expected_files(info)

    def load_index(name: str) -> Any:
        return _download_index(ref, settings, sha, name, expected[name])

    try:
        selection = select_files(
            expected, allow_pickle=settings.allow_pickle, load_index=load_index
        )
    except NoWeightsError as e:
        _fail(ref, settings, f"{ref.location} at commit {sha}: {e}", cause=e)
    return HubPlan(repo_id=ref.location, sha=sha, selection=selection, expected=expected)


def _manifest_path(settings: SourceSettings, repo_id: str, sha: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    return _cache_dir(settings) / ".weightsmith" / folder / f"{sha}.json"


def _write_manifest(
    settings: SourceSettings,
    repo_id: str,
    sha: str,
    names: list[str],
    expected: dict[str, Expected],
) -> None:
    """Record which files a verified revision needs, to resolve it later without the Hub."""
    path = _manifest_path(settings, repo_id, sha)
    doc = {
        "repo_id": repo_id,
        "sha": sha,
        "files": {
            n: {
                "size": expected[n].size,
                "sha256": expected[n].sha256,
                "blob_id": expected[n].blob_id,
            }
            for n in names
        },
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # the cache may be read-only: offline reuse is a bonus
        logger.warning("could not record the file list of %s@%s: %s", repo_id, sha, e)


def _resolve_from_cache(ref: ModelReference, settings: SourceSettings) -> ResolvedModel | None:
    """A pinned revision verified earlier, from the cache alone (the Hub is unreachable)."""
    if not ref.is_immutable or ref.revision is None:
        return None
    sha = ref.revision
    try:
        doc = json.loads(_manifest_path(settings, ref.location, sha).read_text(encoding="utf-8"))
        expected = {
            n: Expected(size=f["size"], sha256=f.get("sha256"), blob_id=f.get("blob_id"))
            for n, f in doc["files"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    folder = _snapshot_dir(settings, ref.location, sha)
    if not all((folder / n).is_file() for n in expected):
        return None
    files = {
        n: FileInfo(
            size=(folder / n).stat().st_size, sha256=_check(ref, settings, folder / n, n, e)
        )
        for n, e in expected.items()
    }
    logger.warning("the Hub could not be reached: using the cached copy of %s", ref)
    return ResolvedModel(reference=ref, pinned=ref, path=folder, revision=sha, files=files)


def resolve_hub(ref: ModelReference, settings: SourceSettings) -> ResolvedModel:
    """Download the files a merge needs from the Hub at a pinned commit and verify them.

    When the Hub cannot be reached, a reference pinned to a commit that was resolved before with
    the same cache is served from the cache (after checking the files again).
    """
    from huggingface_hub import snapshot_download

    try:
        plan = plan_hub(ref, settings)
    except SourceUnavailable:
        cached = _resolve_from_cache(ref, settings)
        if cached is None:
            raise
        return cached
    names = list(plan.selection.files)
    total = sum(plan.expected[n].size or 0 for n in names)
    limit = settings.max_download_bytes
    if limit is not None and total > limit:
        _fail(
            ref,
            settings,
            f"the checkpoint files of {ref.location} total {total} bytes, above this server's "
            f"limit of {limit} bytes (max_download_bytes)",
        )
    logger.info(
        "fetching %d file(s), %d bytes, of %s at commit %s",
        len(names),
        total,
        ref.location,
        plan.sha,
    )
    try:
        folder = Path(
            snapshot_download(
                plan.repo_id,
                revision=plan.sha,
                allow_patterns=[_glob_escape(n) for n in names],
                cache_dir=settings.cache_dir,
                endpoint=settings.hub_endpoint,
                token=settings.hub_token,
            )
        )
    except Exception as e:
        snapshot = _snapshot_dir(settings, plan.repo_id, plan.sha)
        missing = [n for n in names if not (snapshot / n).is_file()]
        if missing and not is_network_error(e) and type(e) is OSError:
            # huggingface_hub's size check ("Consistency check failed") is a bare OSError
            _fail(
                ref,
                settings,
                f"downloading {', '.join(missing[:5])} failed: {_first_line(e)}; "
                "retry the job to download it again",
                cause=e,
                retryable=True,
                file=missing[0],
            )
        _raise_hub_error(e, ref, settings, sha=plan.sha)

    files: dict[str, FileInfo] = {}
    for name in names:
        expected = plan.expected[name]
        sha256 = _check(ref, settings, folder / name, name, expected)
        files[name] = FileInfo(size=(folder / name).stat().st_size, sha256=sha256)
    _write_manifest(settings, plan.repo_id, plan.sha, names, plan.expected)
    return ResolvedModel(
        reference=ref,
        pinned=ref.with_revision(plan.sha),
        path=folder,
        revision=plan.sha,
        files=files,
    )
