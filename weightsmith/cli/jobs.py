"""Remote commands for jobs: ``submit`` a recipe (and ``--wait`` for it), list ``jobs``,
show a ``job``, ``cancel`` one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from weightsmith.cli.common import (
    EXIT_FAILURE,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    add_json_option,
    fail,
    positive_int,
    print_json,
    table,
    when,
)
from weightsmith.cli.progress import JobWatch, progress_text
from weightsmith.cli.remote import Remote

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_KINDS = ("merge", "edit", "extract_lora", "moe")


def _read_job_recipe(path: Path) -> dict[str, Any] | int:
    """The recipe file as a mapping (the service validates it), or the exit code."""
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        return fail(f"cannot read recipe {str(path)!r}: {e.strerror}", EXIT_INPUT)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return fail(f"recipe {str(path)!r} is not valid YAML: {e}", EXIT_INPUT)
    if not isinstance(data, dict):
        return fail(
            f"recipe {str(path)!r} must be a mapping with 'merge_method' (a merge), "
            "'edit_method' (an edit), 'base' and 'model' (a LoRA extraction) or 'base_model' "
            "and 'experts' (a MoE)",
            EXIT_INPUT,
        )
    return data


def _job_kind(recipe: dict[str, Any], given: str | None, path: Path) -> str | int:
    if given is not None:
        return given
    if "merge_method" in recipe and "edit_method" in recipe:
        return fail(f"recipe {str(path)!r} has both merge_method and edit_method", EXIT_INPUT)
    if "merge_method" in recipe:
        return "merge"
    if "edit_method" in recipe:
        return "edit"
    if "base" in recipe and "model" in recipe:
        return "extract_lora"
    if "experts" in recipe:
        return "moe"
    return fail(
        f"recipe {str(path)!r} has neither merge_method nor edit_method nor base and model "
        "nor experts; pass --kind merge|edit|extract_lora|moe",
        EXIT_INPUT,
    )


def _artifact_name(given: str | None, path: Path) -> str | int:
    from schemas.references import _ARTIFACT_NAME

    if given is not None:
        return given  # the service checks it and names the field if it is invalid
    if _ARTIFACT_NAME.match(path.stem):
        return path.stem
    return fail(
        f"the recipe file's name {path.stem!r} is not a valid artifact name; pass --name NAME "
        "(1-100 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit)",
        EXIT_INPUT,
    )


def _job_outcome(job: Any) -> int:
    from weightsmith.client import job_artifact_reference

    if job.state == "succeeded":
        print(f"job {job.id} succeeded: published {job_artifact_reference(job)}")
        return 0
    if job.state == "failed":
        why = (job.error.detail or job.error.message) if job.error else "no error recorded"
        return fail(f"job {job.id} failed: {why}", EXIT_FAILURE)
    return fail(f"job {job.id} was cancelled; nothing was published", EXIT_FAILURE)


def _submit(client: Any, args: argparse.Namespace) -> int:
    """Submit a recipe to the service; with --wait, follow it to the end."""
    path = Path(args.recipe)
    recipe = _read_job_recipe(path)
    if isinstance(recipe, int):
        return recipe
    kind = _job_kind(recipe, args.kind, path)
    if isinstance(kind, int):
        return kind
    name = _artifact_name(args.name, path)
    if isinstance(name, int):
        return name
    publish = {"hub_repo": args.hub_repo} if args.hub_repo else None
    job = client.submit_job(
        kind,
        recipe,
        name,
        idempotency_key=args.idempotency_key,
        callback_url=args.callback_url,
        publish=publish,
    )
    print(
        f"submitted job {job.id}: {job.kind} -> artifact {job.artifact_name} ({job.state})",
        flush=True,
    )
    if not args.wait:
        return 0
    from weightsmith.client import WaitTimeout

    watch = JobWatch(tty=sys.stderr.isatty())
    try:
        job = client.wait(job.id, on_progress=watch, timeout_s=args.timeout, interval_s=0.5)
    except WaitTimeout as e:
        watch.close()
        return fail(f"{e}; follow it with 'weightsmith job {job.id}'", EXIT_FAILURE)
    except KeyboardInterrupt:
        watch.close()
        return fail(
            f"stopped waiting; job {job.id} goes on ('weightsmith job {job.id}', "
            f"'weightsmith cancel {job.id}')",
            EXIT_INTERRUPTED,
        )
    watch.close()
    return _job_outcome(job)


def _jobs(client: Any, args: argparse.Namespace) -> int:
    """List jobs, newest first."""
    from weightsmith.client import job_artifact_reference

    found = list(client.list_jobs(state=args.state, kind=args.kind, limit=args.limit))
    if args.json:
        print_json(found)
        return 0
    rows = [
        [
            job.id,
            job.kind,
            job.state,
            job_artifact_reference(job) or job.artifact_name,
            progress_text(job) if job.state == "running" else "",
            when(job.created_at),
        ]
        for job in found
    ]
    if not rows:
        print("no jobs")
        return 0
    table(["ID", "KIND", "STATE", "ARTIFACT", "PROGRESS", "CREATED"], rows)
    return 0


def _job(client: Any, args: argparse.Namespace) -> int:
    """Show one job: state, progress, error and its recipe with the references pinned."""
    import textwrap

    import yaml

    from weightsmith.client import job_artifact_reference

    job = client.get_job(args.job_id)
    if args.json:
        print_json(job)
        return 0
    lines = [
        ("id", job.id),
        ("kind", job.kind),
        ("state", job.state + (" (cancel requested)" if job.cancel_requested else "")),
        ("artifact", job_artifact_reference(job) or f"{job.artifact_name} (not published)"),
        ("progress", progress_text(job)),
        ("created", when(job.created_at)),
        ("started", when(job.started_at)),
        ("finished", when(job.finished_at)),
        ("attempts", f"{job.attempts} of {job.max_attempts}"),
    ]
    if job.error is not None:
        lines.append(("error", job.error.detail or job.error.message))
    if job.callback_url:
        lines.append(("callback", job.callback_url))
    if job.schedule_id:
        lines.append(("schedule", job.schedule_id))
    for key, value in lines:
        print(f"{key + ':':10} {value}")
    print("recipe (references pinned):")
    print(textwrap.indent(yaml.safe_dump(job.recipe, sort_keys=False).rstrip(), "  "))
    return 0


def _cancel(client: Any, args: argparse.Namespace) -> int:
    """Cancel a job: a queued one at once, a running one at its next check."""
    job = client.get_job(args.job_id)
    if job.state.is_terminal:
        print(f"job {job.id} already ended {job.state}; nothing to cancel")
        return 0
    job = client.cancel_job(args.job_id)
    if job.state == "cancelled":
        print(f"job {job.id} cancelled")
    elif job.state.is_terminal:  # it ended meanwhile
        print(f"job {job.id} already ended {job.state}; nothing to cancel")
    else:
        print(f"job {job.id} is {job.state}: asked to stop ({_stops_where(job.kind)})")
    return 0


def _stops_where(kind: str) -> str:
    """Where a running job of ``kind`` looks at its cancel flag (workers/runner.py)."""
    if kind == "edit":
        return "the worker stops between the edit's phases and batches"
    return "the worker stops between tensors"


def add_commands(remote: Remote) -> None:
    """Register ``submit``, ``jobs``, ``job`` and ``cancel``."""
    sm = remote.command("submit", "submit a recipe to the service (--wait to follow it)", _submit)
    sm.add_argument("recipe", help="merge, edit, LoRA extraction or MoE recipe YAML")
    sm.add_argument(
        "--kind",
        choices=JOB_KINDS,
        help="the job's kind (default: from the recipe: merge_method, edit_method, base "
        "and model for extract_lora, experts for moe)",
    )
    sm.add_argument("--name", help="artifact name (default: the recipe file's stem)")
    sm.add_argument("--wait", action="store_true", help="follow the job; exit 0 if it succeeds")
    sm.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="with --wait: stop waiting after S seconds (the job goes on; default: no limit)",
    )
    sm.add_argument(
        "--idempotency-key",
        help="resubmitting with the same key runs the job once (default: a new key)",
    )
    sm.add_argument("--callback-url", help="webhook called when the job starts and ends")
    sm.add_argument("--hub-repo", help="also push the artifact to this Hub repo (org/name)")

    js = remote.command("jobs", "list the service's jobs, newest first", _jobs)
    js.add_argument("--state", choices=JOB_STATES, help="only jobs in this state")
    js.add_argument("--kind", choices=JOB_KINDS, help="only jobs of this kind")
    js.add_argument("--limit", type=positive_int, default=20, help="at most this many jobs")
    add_json_option(js, "the jobs (a list, as the API returns each)")

    jb = remote.command("job", "show one job of the service", _job)
    jb.add_argument("job_id", metavar="ID", help="the job's id")
    add_json_option(jb, "the job as the API returns it")

    cn = remote.command("cancel", "cancel a job of the service", _cancel)
    cn.add_argument("job_id", metavar="ID", help="the job's id")
