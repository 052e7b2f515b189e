"""Reusing an artifact instead of running a job again: a merge whose pinned recipe and seed
determine its bytes, resubmitted under the same artifact name, is answered with the version
an earlier job built (README, "The service")."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from infra.artifacts import ArtifactError, compute_recipe_hash, find_by_recipe_hash
from infra.db.models import Job
from infra.storage import StorageError
from schemas.jobs import ArtifactRef, JobCreate, JobKind, parse_job_recipe
from schemas.references import ModelReference
from service.context import Service

log = logging.getLogger(__name__)


def reusable_recipe_hash(
    kind: str, recipe: Mapping[str, Any], references: Iterable[ModelReference]
) -> str | None:
    """The hash under which a job may reuse an earlier artifact instead of running, or None
    when its result is not determined by what it names.

    ``recipe`` is the pinned recipe as stored with the job and ``references`` every model
    reference in it. Reusable means: a merge, every reference immutable (a hub commit sha or
    an artifact version: the pinned recipe then identifies the inputs' bytes) and a seed
    (without one the worker draws a random seed); ``parallelism`` is left out (how the
    merge runs, not what it makes). An ``s3://`` prefix or a local path can
    change under the same name, so such a job always runs.
    """
    if kind != JobKind.MERGE.value or not isinstance(recipe.get("seed"), int):
        return None
    if not all(ref.is_immutable for ref in references):
        return None
    # how many parts the merge runs in does not change its result (docs/recipes.md)
    what = {k: v for k, v in recipe.items() if k != "parallelism"}
    return compute_recipe_hash(kind=kind, recipe=what, parents=[], seed=recipe["seed"])


def may_reuse(request: JobCreate) -> bool:
    """A job that also pushes to the Hub runs (the push is part of what it does)."""
    return request.reuse and not (request.publish and request.publish.hub_repo)


def reuse_existing(service: Service, job: Job, tenant: str) -> Job | None:
    """The job, succeeded with an earlier version of its artifact that has the same recipe
    hash (:func:`reusable_recipe_hash`); None when there is none to reuse."""
    try:
        refs = [ref for _, ref in parse_job_recipe(JobKind(job.kind), job.recipe).references()]
    except ValueError:  # not a recipe of this kind any more: run the job, which says why
        return None
    digest = reusable_recipe_hash(job.kind, job.recipe, refs)
    if digest is None:
        return None
    try:
        found = find_by_recipe_hash(service.store, tenant, job.artifact_name, digest)
    except (StorageError, ArtifactError) as e:  # reuse is an optimisation: run the job
        log.warning("job %s: recipe-hash lookup failed, running it: %s", job.id, e)
        return None
    if found is None:
        return None
    ref = ArtifactRef(name=found.name, version=found.version, uri=found.reference)
    done = service.jobs.finish_reused(job.id, ref)
    if done is not None:
        log.info("job %s: reused %s (recipe hash %s)", job.id, found.reference, digest[:12])
    return done
