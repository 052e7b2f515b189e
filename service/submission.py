"""A job submission as a procedure: validate, record, pin, queue (the API's ``POST /v1/jobs``
and every schedule fire).

1. The request was validated as :class:`schemas.jobs.JobCreate` (the API parses the body:
   app/bodies.py); every problem comes back with a JSON Pointer into it.
2. With an ``Idempotency-Key``, :meth:`infra.db.JobStore.begin_job` records the job as
   pending and takes the key (a replay of an earlier identical request stops here).
3. Every model reference in the recipe (each part of a ``BASE+ADAPTER``) is pinned: a hub
   branch to its commit sha, an ``artifact://name`` to a version number. Local paths are
   refused unless the operator allows them. If a reference cannot be pinned the pending job
   is abandoned (freeing the key for a corrected retry) and the client gets a 422 naming the
   field and model.
4. :meth:`~infra.db.JobStore.activate_job` stores the pinned recipe (state ``queued``) and
   the job id goes on the queue. Without a key there is nothing to hold while pinning, so
   the job is recorded queued in one step (:meth:`~infra.db.JobStore.create_job`).
5. If the broker cannot take the message, the job is failed with phase ``not-queued`` and
   the answer is 503 (``Retry-After``). A retry with the same Idempotency-Key and body moves
   that same job back to ``queued`` (a guarded transition: of concurrent retries one wins)
   and sends it again: 202 once the broker is back, 503 again while it is down. One key
   never yields two jobs, and the job keeps the references pinned by the first request.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from infra.artifacts import (
    ArtifactError,
    ArtifactNotFound,
    read_manifest,
    resolve_artifact,
)
from infra.db import IdempotencyKeyInFlight, IdempotencyKeyReused, JobNotPending
from infra.db.jobstore import NOT_QUEUED_PHASE, REUSED_PHASE
from infra.db.models import Job
from infra.hub import HubAccess, HubPinError, pin_hub_reference
from infra.queue import QueueUnavailable
from infra.storage import (
    AccessDenied,
    BucketNotFound,
    InvalidKey,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
)
from schemas.edit_recipe import parse_corpus_path
from schemas.jobs import (
    JobCreate,
    JobError,
    JobKind,
    JobProgress,
    JobState,
    JobView,
    ProblemDetail,
    ProblemItem,
    parse_job_recipe,
)
from schemas.references import (
    PARTS,
    Location,
    ModelReference,
    ReferenceError_,
    ReferenceKind,
    parse_reference,
    part_of,
    with_part,
)
from schemas.tenants import GrantError, TenantAccess
from service.context import Principal, Service
from service.errors import Problem
from service.reuse import may_reuse, reuse_existing
from service.tenancy import LocalPathRefused, check_local_path, open_granted_store, s3_refusal
from service.webhooks import refuse_unsafe_url

# The start of the error of a job whose message could not be queued (phase "not-queued").
ENQUEUE_FAILED = "the job could not be queued"


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submitted:
    view: JobView
    replayed: bool


def submit_job(
    service: Service, principal: Principal, request: JobCreate, idempotency_key: str | None
) -> Submitted:
    check_publish(service, principal, request)
    check_parallelism(service, request)
    if request.callback_url is not None:  # no private addresses (SSRF): see service.webhooks
        refuse_unsafe_url(service.settings, str(request.callback_url), "/callback_url")
    jobs = service.jobs
    if idempotency_key is None:
        # Nothing to replay or hold: pin first, then record the job queued in one transaction.
        pinned = pin_recipe(service, principal, request.kind, request.recipe)
        job = jobs.create_job(principal.tenant_id, request, recipe=pinned).job
        return Submitted(
            _enqueue(service, job, reuse=may_reuse(request), tenant=principal.tenant),
            replayed=False,
        )
    try:
        submission = jobs.begin_job(principal.tenant_id, request, idempotency_key=idempotency_key)
    except IdempotencyKeyReused as e:
        raise Problem(
            422,
            f"this Idempotency-Key was already used for a different request (job {e.job_id}); "
            "use a new key for a new request",
            title="Idempotency-Key reused",
        ) from e
    except IdempotencyKeyInFlight as e:
        raise Problem(
            409,
            "a request with this Idempotency-Key is still being processed; retry shortly",
            title="Request in progress",
            headers={"Retry-After": "1"},
        ) from e
    except ValueError as e:  # a key longer than the store allows
        raise Problem(422, f"Idempotency-Key header: {e}", title="Invalid request") from e
    if submission.replayed:
        job = submission.job
        if job.state == JobState.FAILED and job.phase == NOT_QUEUED_PHASE:
            # Its first request was answered 503 (broker down): this retry queues that same job
            # (one key, one job); while the broker is still down it answers 503 again.
            requeued = jobs.requeue_unqueued(job.id)
            if requeued is not None:
                view = _enqueue(
                    service, requeued, reuse=may_reuse(request), tenant=principal.tenant
                )
                return Submitted(view, replayed=False)
            # A concurrent retry took it: answer with the job as that one left it.
            job = jobs.get(principal.tenant_id, job.id) or job
        return Submitted(first_response(job), replayed=True)

    job_id = submission.job.id
    try:
        pinned = pin_recipe(service, principal, request.kind, request.recipe)
    except BaseException:
        jobs.abandon_job(job_id)
        raise
    try:
        job = jobs.activate_job(job_id, pinned)
    except JobNotPending as e:  # taken over after this request stalled past the key's timeout
        raise Problem(
            409,
            "this submission took too long and was superseded by a retry; look the job up by "
            "retrying with the same Idempotency-Key",
            title="Request superseded",
        ) from e
    return Submitted(
        _enqueue(service, job, reuse=may_reuse(request), tenant=principal.tenant), replayed=False
    )


def check_parallelism(service: Service, request: JobCreate) -> None:
    """A merge's ``parallelism`` within the operator's maximum (the schema caps it at
    MAX_MERGE_PARALLELISM; the operator may allow fewer): 422 naming the field."""
    if request.kind != JobKind.MERGE or not isinstance(request.recipe, dict):
        return
    wanted = request.recipe.get("parallelism")
    most = service.settings.merge_max_parallelism
    if isinstance(wanted, int) and wanted > most:
        message = (
            f"parallelism {wanted} is more parts than this service splits a merge into "
            f"(at most {most}, WEIGHTSMITH_MERGE_MAX_PARALLELISM): use 1 to {most}"
        )
        raise Problem(
            422,
            f"/recipe/parallelism: {message}",
            title="Invalid recipe",
            errors=[ProblemItem(detail=message, pointer="/recipe/parallelism")],
        )


def check_publish(service: Service, principal: Principal, request: JobCreate) -> None:
    """Refuse a Hub push the tenant may not make: a namespace the operator did not grant it,
    or no token to push with (its own, or the service's where granted)."""
    if request.publish is None or request.publish.hub_repo is None:
        return
    repo = request.publish.hub_repo
    access = service.access(principal.tenant_id)
    message: str | None = None
    if not access.may_push_to(repo):
        granted = ", ".join(sorted(access.push_namespaces)) or "none"
        message = (
            f"this tenant may not push to {repo!r}: pushes go only to Hub namespaces the "
            f"operator granted to the tenant (granted: {granted}; 'weightsmith tenants "
            "grant-hub-push')"
        )
    elif access.hub_token is None:
        message = (
            "pushing to the Hugging Face Hub needs a token with write access: store one "
            "(PUT /v1/tenant/hub-token, 'weightsmith hub-token set') or ask the operator to "
            "grant the service's token; or leave out publish.hub_repo"
        )
    if message is not None:
        raise Problem(
            422,
            f"/publish/hub_repo: {message}",
            title="Invalid request",
            errors=[ProblemItem(detail=message, pointer="/publish/hub_repo")],
        )


def _enqueue(service: Service, job: Job, *, reuse: bool, tenant: str) -> JobView:
    """Queue a recorded job, or answer it with an existing artifact version built from the
    same pinned recipe and seed.

    If the broker refuses, the job is failed with phase ``not-queued`` (it would never run)
    and the client gets a 503: a retry with the same Idempotency-Key queues this same job
    again (submit_job), one without a key is a new submission."""
    if reuse:
        reused = reuse_existing(service, job, tenant)
        if reused is not None:
            return reused.to_view()
    try:
        service.queue.enqueue(job.id, kind=job.kind)
    except QueueUnavailable as e:
        log.warning("job %s: %s", job.id, e)
        message = f"{ENQUEUE_FAILED}: the broker is unreachable; submit it again later"
        failed = service.jobs.fail_unqueued(job.id, JobError(message=message, detail=message))
        if failed is None:  # no longer queued: a worker got the message after all
            current = service.jobs.get(job.tenant_id, job.id)
            if current is not None:
                return current.to_view()
        raise _enqueue_problem(job.id) from e
    return job.to_view()


def first_response(job: Job) -> JobView:
    """What the first request with this job's Idempotency-Key was answered: the job as it was
    when queued (a replay must not depend on how far the job got since). A job that could not
    be queued answers 503, as its first request did (submit_job tries to queue it first)."""
    if job.state == JobState.FAILED and job.phase == NOT_QUEUED_PHASE:
        raise _enqueue_problem(job.id)
    view = job.to_view()
    if job.phase == REUSED_PHASE:
        return view  # it was answered at once with the reused artifact
    return view.model_copy(
        update={
            "state": JobState.QUEUED,
            "progress": JobProgress(),
            "started_at": None,
            "finished_at": None,
            "attempts": 0,
            "cancel_requested": False,
            "error": None,
            "artifact": None,
            "publish": view.publish.model_copy(update={"hub_commit": None})
            if view.publish
            else None,
        }
    )


def _enqueue_problem(job_id: str) -> Problem:
    return Problem(
        503,
        f"job {job_id} could not be queued: the broker is unreachable; submit it again later",
        title="Queue unavailable",
        headers={"Retry-After": "5"},
        job_id=job_id,
    )


# ---- pinning ----------------------------------------------------------------------------


def pin_recipe(
    service: Service, principal: Principal, kind: JobKind, recipe: dict[str, Any]
) -> dict[str, Any]:
    """A copy of ``recipe`` with every model reference pinned, after checking that the
    tenant may read every input it names (service.tenancy); raises Problem."""
    access = service.access(principal.tenant_id)
    pinned = copy.deepcopy(recipe)
    done: dict[str, str] = {}  # the same reference twice is looked up once
    for loc, _ref in _references(kind, recipe):
        raw: str = _get(recipe, loc)
        if raw not in done:
            done[raw] = str(_pin_one(service, access, raw, loc))
        _set(pinned, loc, done[raw])
    if kind is JobKind.EDIT:
        _check_corpus_paths(service, access, recipe)
    return pinned


def _pin_one(service: Service, access: TenantAccess, raw: str, loc: Location) -> ModelReference:
    settings = service.settings
    pointer = "/recipe/" + "/".join(str(p) for p in loc)
    try:
        ref = parse_reference(raw)
    except ReferenceError_ as e:  # schemas/ validated it already; belt and braces
        raise _invalid(pointer, str(e), raw) from e
    if ref.kind is ReferenceKind.HUB:
        try:
            return pin_hub_reference(ref, HubAccess(settings.hf_endpoint, access.hub_token))
        except HubPinError as e:
            if e.retryable:
                raise Problem(
                    503,
                    f"{pointer}: {e.message}",
                    title="Hub unavailable",
                    headers={"Retry-After": "10"},
                    model=raw,
                ) from e
            raise _invalid(pointer, e.message, raw) from e
    if ref.kind is ReferenceKind.ARTIFACT:
        try:
            found = resolve_artifact(
                service.store, access.name, ref.location, ref.revision or "latest"
            )
        except StorageUnavailable as e:
            raise Problem(503, f"{pointer}: the object store is unavailable: {e}", model=raw) from e
        except ArtifactNotFound as e:
            raise _invalid(pointer, str(e), raw) from e
        except ArtifactError as e:
            raise _invalid(pointer, str(e), raw) from e
        return ModelReference.model_validate(found.reference)
    if ref.kind is ReferenceKind.S3:
        bucket, _, key = ref.location.partition("/")
        _check_s3(service, access, raw, bucket, key, pointer, folder=True)
        return ref
    try:
        check_local_path(ref.location, settings)
    except LocalPathRefused as e:
        raise _invalid(pointer, str(e), raw) from e
    return ref


def _check_s3(
    service: Service,
    access: TenantAccess,
    raw: str,
    bucket: str,
    key: str,
    pointer: str,
    *,
    folder: bool,
) -> None:
    """422 unless ``s3://bucket/key`` lies under one of the tenant's grants and exists there
    (an object, or with ``folder`` a non-empty prefix), read with the grant's credentials.
    Missing and not granted get the same answer; only an unreachable server is a 503."""
    grant = access.s3_grant_for(bucket, key)
    found = False
    if grant is not None:
        try:
            remote = open_granted_store(grant, service.settings)
            if folder:
                base = f"{key.rstrip('/')}/" if key else ""
                found = next(iter(remote.list(base)), None) is not None
            else:
                found = remote.stat(key) is not None
        except (GrantError, ObjectNotFound, BucketNotFound, AccessDenied, InvalidKey):
            found = False
        except StorageUnavailable as e:
            raise Problem(
                503,
                f"{pointer}: the S3 server of {grant.location} could not be reached; try again",
                title="Storage unavailable",
                headers={"Retry-After": "10"},
            ) from e
        except StorageError:
            found = False
    if not found:
        raise _invalid(pointer, s3_refusal(raw), raw)


def _check_corpus_paths(service: Service, access: TenantAccess, recipe: dict[str, Any]) -> None:
    """An edit's covariance text files: each must be readable by the tenant now."""
    covariance = recipe.get("covariance")
    paths = covariance.get("paths") if isinstance(covariance, dict) else None
    for i, raw in enumerate(paths or []):
        pointer = f"/recipe/covariance/paths/{i}"
        loc = parse_corpus_path(raw)  # validated with the recipe
        if loc.kind == "s3":
            _check_s3(service, access, raw, loc.container or "", loc.path, pointer, folder=False)
        elif loc.kind == "local":
            try:
                check_local_path(loc.path, service.settings)
            except LocalPathRefused as e:
                raise _invalid(pointer, str(e), raw) from e
        else:
            assert loc.container is not None and loc.version is not None
            try:
                read_manifest(service.store, access.name, loc.container, loc.version)
            except StorageUnavailable as e:
                raise Problem(
                    503, f"{pointer}: the object store is unavailable: {e}", model=raw
                ) from e
            except ArtifactError as e:
                raise _invalid(pointer, str(e), raw) from e


def _references(kind: JobKind, recipe: dict[str, Any]) -> list[tuple[Location, ModelReference]]:
    """The recipe's model references and where they stand (it was validated with the request:
    a recipe that no longer validates is refused naming what is wrong)."""
    try:
        return parse_job_recipe(kind, recipe).references()
    except ValidationError as e:
        raise Problem.from_detail(ProblemDetail.from_validation_error(e)) from None


def pinned_references(
    kind: JobKind, recipe: dict[str, Any], pinned: dict[str, Any]
) -> dict[str, str]:
    """Each reference as written in ``recipe`` → as ``pin_recipe`` pinned it in ``pinned``."""
    return {str(_get(recipe, loc)): str(_get(pinned, loc)) for loc, _ in _references(kind, recipe)}


def _invalid(pointer: str, message: str, model: str) -> Problem:
    return Problem(
        422,
        f"{pointer}: {message}",
        title="Invalid model reference",
        errors=[ProblemItem(detail=message, pointer=pointer)],
        model=model,
    )


def _get(doc: Any, loc: Location) -> Any:
    for part in loc:
        # a location ending in "base"/"adapter" is that part of a BASE+ADAPTER string
        doc = part_of(doc, str(part)) if isinstance(doc, str) else doc[part]
    return doc


def _set(doc: Any, loc: Location, value: Any) -> None:
    if loc and loc[-1] in PARTS and isinstance(_get(doc, loc[:-1]), str):
        _set(doc, loc[:-1], with_part(_get(doc, loc[:-1]), str(loc[-1]), value))
        return
    for part in loc[:-1]:
        doc = doc[part]
    doc[loc[-1]] = value
