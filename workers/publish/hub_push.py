"""Push a published artifact version to the Hugging Face Hub (a job's ``publish.hub_repo``).

The push comes after the version is published in object storage and before the job is
marked succeeded (``workers.runner`` calls :func:`push_job_artifact`). One commit holds
every file of the version (shards, index, config, tokenizer files, the model card README.md)
and its manifest as ``weightsmith-manifest.json``; files a previous push of weightsmith put on
the branch (listed in the manifest found there) that this version lacks are deleted in the
same commit, so the branch holds exactly one version. Large files go through huggingface_hub's
preupload and LFS (or Xet, when ``hf_xet`` is installed and the endpoint is the Hub) paths;
each file's sha256 is taken from the manifest instead of being computed again.

Outcomes:

- **Pushed**: the commit (repo, branch, sha, url, artifact) is stored in the job's ``publish``
  JSON under ``hub_commit`` and shown by the API in ``JobView.publish``. The manifest is not
  changed: a published version is immutable.
- **Transient** (the Hub unreachable, 408/409/412/423/429/5xx): tried again in the job after
  :data:`RETRY_DELAYS_S`; if it still fails, :class:`HubUnavailable` goes to the runner, which
  retries the job like any transient failure while attempts remain (publishing is idempotent
  per job id, so no second version is made) and fails it with this message on the last one.
- **Permanent** (no token on the worker, 401 bad token, 403 no write access, repo refused,
  invalid model card): the job fails at once with a message naming the repo, the reason and
  the artifact version that stays published.

Pushing the same version twice is harmless: the Hub skips unchanged files, and a push that
changes nothing makes no commit (the branch head is recorded). The token is only ever given
to huggingface_hub; every message that leaves this module is scrubbed of it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.artifacts import MANIFEST, ArtifactVersion, download_artifact
from infra.db.models import Job
from infra.hub import HubFailureKind, classify_hub_error, first_line
from schemas.jobs import HubCommit, JobError, PublishView
from workers.errors import WeightsmithError

if TYPE_CHECKING:
    from infra.db import JobStore
    from infra.settings import Settings
    from infra.storage import ObjectStore
    from schemas.tenants import TenantAccess

log = logging.getLogger("weightsmith.hub_push")

HUB_MANIFEST = "weightsmith-manifest.json"
# Pauses between the in-job attempts of a push (so len + 1 attempts): about a minute in all.
RETRY_DELAYS_S: tuple[float, ...] = (5.0, 15.0, 45.0)
# Statuses worth trying again: timeout, conflicting commit, branch moved, locked, rate limit.
_TRANSIENT_STATUS = {408, 409, 412, 423, 429}


class HubUnavailable(WeightsmithError):
    """The Hub could not be reached (or answered 429/5xx) on every in-job attempt."""

    retryable = True  # the runner retries the job while attempts remain


class HubPushRefused(WeightsmithError):
    """The push cannot succeed as configured (token, access, repo, model card)."""


@dataclass(frozen=True)
class HubTarget:
    """Where to push (the endpoint from the worker's settings) and the tenant's token."""

    repo: str
    branch: str = "main"
    private: bool = False
    endpoint: str | None = None
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class ArtifactFile:
    path: str
    sha256: str


def push_job_artifact(
    job: Job,
    version: ArtifactVersion,
    out_dir: Path,
    *,
    store: JobStore,
    settings: Settings,
    object_store: ObjectStore,
    worker_id: str,
    access: TenantAccess,
) -> bool:
    """The runner's publish step for ``job.publish.hub_repo``, after ``version`` is published,
    with the token of the job's tenant (``access``: its own, or the service's where granted)
    and only to a namespace granted to it (checked again: a grant may have been revoked).

    Returns True when the job may be marked succeeded: nothing to push, or pushed and
    recorded. False when it must not: the job was failed here (a permanent push failure) or
    it is no longer this worker's. Raises :class:`HubUnavailable` (transient) and the object
    store's errors.
    """
    # The stored options, with "hub_commit" once an earlier attempt pushed (a retried job).
    options = PublishView.model_validate(job.publish) if job.publish else None
    if options is None or options.hub_repo is None:
        return True
    artifact = version.reference
    token = access.hub_token or ""
    target = HubTarget(
        repo=options.hub_repo,
        branch=options.branch,
        private=options.private,
        endpoint=settings.hf_endpoint,
        token=token,
    )
    try:
        if not access.may_push_to(target.repo):
            raise HubPushRefused(
                f"the tenant may no longer push to the namespace {target.repo.split('/')[0]!r} "
                "(the operator's grant was revoked)"
            )
        if not token:
            raise HubPushRefused(
                "the tenant has no Hugging Face token with write access: store one (PUT "
                "/v1/tenant/hub-token, 'weightsmith hub-token set')"
            )
        with _artifact_folder(object_store, version, out_dir) as (folder, files, manifest):
            commit = push_artifact(
                target,
                folder,
                files,
                manifest,
                commit_message=f"Publish {artifact} (weightsmith job {job.id})",
            )
    except HubPushRefused as e:
        message = (
            f"{artifact} was published, but pushing it to the Hugging Face Hub repo "
            f"{target.repo} failed: {e.message}"
        )
        error = JobError(message=message, field="publish.hub_repo", model=artifact, detail=message)
        store.finish_failed(job.id, error, worker_id=worker_id)
        log.warning("job %s: %s", job.id, message)
        return False
    except HubUnavailable as e:
        raise HubUnavailable(
            f"{artifact} was published, but the Hugging Face Hub repo {target.repo} could "
            f"not be reached to push it: {e.message}",
            field="publish.hub_repo",
            model=artifact,
        ) from None
    result = HubCommit(
        repo=target.repo,
        branch=target.branch,
        commit_sha=commit.sha,
        commit_url=commit.url,
        artifact=artifact,
        pushed_at=datetime.now(UTC),
    )
    publish = options.model_copy(update={"hub_commit": result}).model_dump(mode="json")
    if not store.record_publish(job.id, worker_id, publish):
        log.warning("job %s: pushed %s but the job was taken over", job.id, artifact)
        return False
    log.info("job %s: pushed %s to %s@%s", job.id, artifact, target.repo, commit.sha)
    return True


@dataclass(frozen=True)
class PushedCommit:
    sha: str
    url: str


def push_artifact(
    target: HubTarget,
    folder: Path,
    files: Sequence[ArtifactFile],
    manifest: bytes,
    *,
    commit_message: str,
    retry_delays_s: Sequence[float] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> PushedCommit:
    """Commit ``files`` (paths relative to ``folder``, with their known sha256) and
    ``manifest`` (as ``weightsmith-manifest.json``) to ``target``, creating the repo and
    branch if missing. Transient failures are tried again after each of ``retry_delays_s``
    (default :data:`RETRY_DELAYS_S`). Raises :class:`HubPushRefused` or :class:`HubUnavailable`.
    """
    delays = list(RETRY_DELAYS_S if retry_delays_s is None else retry_delays_s)
    attempt = 0
    while True:
        attempt += 1
        try:
            return _push_once(target, folder, files, manifest, commit_message)
        except Exception as e:
            transient, reason = _classify(e, target)
            if not transient:
                raise HubPushRefused(reason) from None
            if not delays:
                raise HubUnavailable(f"{reason} (tried {attempt} times)") from None
            delay = delays.pop(0)
            log.warning(
                "push to %s: attempt %d failed (%s); again in %.0f s",
                target.repo,
                attempt,
                reason,
                delay,
            )
            sleep(delay)


def _push_once(
    target: HubTarget,
    folder: Path,
    files: Sequence[ArtifactFile],
    manifest: bytes,
    commit_message: str,
) -> PushedCommit:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(endpoint=target.endpoint, token=target.token, library_name="weightsmith")
    api.create_repo(target.repo, private=target.private, exist_ok=True)
    if target.branch != "main":
        api.create_branch(target.repo, branch=target.branch, exist_ok=True)
    operations: list[Any] = []
    for f in files:
        add = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(folder / f.path))
        # Known from the manifest (and checked when the version was published): a multi-GB
        # shard is not read once more just to hash it. The Hub checks it on upload.
        add.upload_info.sha256 = bytes.fromhex(f.sha256)
        operations.append(add)
    operations.append(CommitOperationAdd(path_in_repo=HUB_MANIFEST, path_or_fileobj=manifest))
    pushed = {f.path for f in files} | {HUB_MANIFEST}
    for stale in sorted(_previous_files(api, target) - pushed):
        operations.append(CommitOperationDelete(path_in_repo=stale))
    info = api.create_commit(
        target.repo,
        operations,
        commit_message=commit_message,
        commit_description=f"Files and their sha256 are listed in {HUB_MANIFEST}.",
        revision=target.branch,
    )
    return PushedCommit(sha=str(info.oid), url=str(info.commit_url))


def _previous_files(api: Any, target: HubTarget) -> set[str]:
    """Files an earlier weightsmith push put on the branch (from its manifest there)."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    with tempfile.TemporaryDirectory(prefix="weightsmith-hub-") as tmp:
        try:
            path = api.hf_hub_download(
                target.repo, HUB_MANIFEST, revision=target.branch, cache_dir=tmp
            )
        except (EntryNotFoundError, RevisionNotFoundError):
            return set()
        try:
            previous = json.loads(Path(path).read_text())
            return {str(e["path"]) for e in previous.get("files", [])}
        except (ValueError, TypeError, KeyError, AttributeError):
            return set()  # not ours to interpret: leave the files alone


@contextmanager
def _artifact_folder(
    object_store: ObjectStore, version: ArtifactVersion, out_dir: Path
) -> Iterator[tuple[Path, list[ArtifactFile], bytes]]:
    """The version's files on local disk, its file list and its published manifest.

    The job's output directory when it holds exactly the published files (the usual case),
    else a verified download of the version: a retried job whose merge (without a seed) wrote
    other bytes than the version its first attempt published.
    """
    manifest = object_store.get_bytes(version.manifest_key)
    published = _entries(json.loads(manifest))
    try:
        local = _entries(json.loads((Path(out_dir) / MANIFEST).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        local = {}
    files = [ArtifactFile(path, sha) for path, (_, sha) in sorted(published.items())]
    if local == published:
        yield Path(out_dir), files, manifest
        return
    tmp = Path(tempfile.mkdtemp(prefix="hub-push-", dir=Path(out_dir).parent))
    try:
        v = version
        folder = download_artifact(object_store, v.tenant, v.name, v.version, tmp / "v")
        yield folder, files, manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _entries(manifest: Any) -> dict[str, tuple[int, str]]:
    return {str(e["path"]): (int(e["size"]), str(e["sha256"])) for e in manifest["files"]}


def _classify(e: BaseException, target: HubTarget) -> tuple[bool, str]:
    """(transient?, what went wrong and what to do) for an exception of a push (the
    failure's kind from infra.hub.classify_hub_error, worded for a push)."""
    failure = classify_hub_error(e)
    kind, status = failure.kind, failure.status
    owner = target.repo.split("/")[0]
    server = _scrub(failure.server_message, target.token)
    said = f": {server}" if server else ""
    if kind is HubFailureKind.UNAUTHORIZED:
        return False, (
            "the Hub rejected the token (HTTP 401: invalid or expired); store a valid "
            "token with write access (PUT /v1/tenant/hub-token)"
        )
    if kind is HubFailureKind.FORBIDDEN:
        return False, (
            f"the token may not write to {target.repo} (HTTP 403{said}); "
            f"give it write access to '{owner}' or choose another repo"
        )
    if kind in (HubFailureKind.REPO_NOT_FOUND, HubFailureKind.NOT_FOUND):
        return False, (
            f"the repo or branch '{target.branch}' was not found, or the token cannot see it "
            f"(HTTP {status})"
        )
    if kind is HubFailureKind.BUSY:
        return True, f"the Hub answered HTTP {status}{said}"
    if status is not None:
        return False, f"the Hub refused the push (HTTP {status}{said})"
    if kind is HubFailureKind.UNREACHABLE:
        first = first_line(failure.error, target.token)
        return True, f"the Hub is unreachable ({type(failure.error).__name__}: {first})"
    if isinstance(e, ValueError):  # an invalid model card, or a malformed Hub answer
        return False, first_line(e, target.token)
    return False, f"{type(e).__name__}: {first_line(e, target.token)}"


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text
