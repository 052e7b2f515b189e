"""The ``weightsmith`` command line.

Each subcommand imports what it needs when it runs, so ``weightsmith --help`` and the
service commands never import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from weightsmith.cli_common import EXIT_FAILURE, EXIT_INPUT
from weightsmith.cli_common import fail as _fail
from weightsmith.cli_common import settings_or_fail as _settings_or_fail

_R = TypeVar("_R")


class _ProgressBar:
    """A tensors/bytes bar on a terminal (tqdm), silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.phase = ""

    def __call__(self, p: Any) -> None:
        if not self.enabled or p.tensors_total == 0:
            return
        from tqdm import tqdm

        if self.bar is None or p.phase != self.phase:
            if self.bar is not None:
                self.bar.close()
            self.phase = p.phase
            self.bar = tqdm(
                total=p.bytes_total,
                unit="B",
                unit_scale=True,
                desc=p.phase,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self.bar.n = p.bytes_done
        self.bar.set_postfix_str(f"{p.tensors_done}/{p.tensors_total} tensors", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _load_recipe(path: Path, parse: Callable[[str], _R]) -> _R | int:
    """The validated recipe in ``path``, or the exit code after a one-line error."""
    from schemas.recipe import RecipeError

    try:
        text = path.read_text()
    except OSError as e:
        return _fail(f"cannot read recipe {str(path)!r}: {e.strerror}", EXIT_INPUT)
    try:
        return parse(text)
    except RecipeError as e:
        return _fail(f"recipe {str(path)!r}: {e}", EXIT_INPUT)


def cmd_merge(args: argparse.Namespace) -> int:
    from schemas.recipe import parse_recipe

    path = Path(args.recipe)
    recipe = _load_recipe(path, parse_recipe)
    if isinstance(recipe, int):
        return recipe

    from workers.errors import InputError, WeightsmithError
    from workers.merge.engine import run_merge
    from workers.sources import SourceSettings

    bar = _ProgressBar(enabled=sys.stderr.isatty() and not args.quiet)
    settings = SourceSettings(allow_pickle=recipe.allow_pickle, hub_token=None)
    try:
        result = run_merge(
            recipe,
            Path(args.out),
            seed=args.seed,
            device=args.device,
            sources=settings,
            base_dir=path.resolve().parent,
            progress=bar,
        )
    except InputError as e:
        bar.close()
        return _fail(str(e), EXIT_INPUT)
    except WeightsmithError as e:
        bar.close()
        return _fail(str(e), EXIT_FAILURE)
    except KeyboardInterrupt:
        bar.close()
        return _fail("interrupted; nothing was written", 130)
    bar.close()
    total = result.manifest["timings"].get("total_s", 0.0)
    print(
        f"merged {recipe.merge_method} into {result.out_dir} (seed {result.seed}, "
        f"{len(result.manifest['files'])} files, {total:.1f} s)"
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings_or_fail()
    if settings.broker_url is None:
        return _fail(
            "WEIGHTSMITH_BROKER_URL is not set: a Celery worker needs a broker (e.g. "
            "redis://127.0.0.1:6379/0); without one, 'weightsmith serve' runs jobs itself",
            EXIT_INPUT,
        )
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    if not queues:
        return _fail("--queues names no queue", EXIT_INPUT)
    if args.concurrency < 1:
        return _fail("--concurrency must be at least 1", EXIT_INPUT)
    from workers.celery_app import GPU_QUEUE, app

    argv = [
        "worker",
        "--pool=prefork",
        f"--concurrency={args.concurrency}",
        f"--queues={','.join(queues)}",
        f"--loglevel={args.loglevel}",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    if GPU_QUEUE in queues:
        argv.append("--max-tasks-per-child=1")  # a fresh process per job frees GPU memory
    app.worker_main(argv)
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    """Celery beat with celery-redbeat (infra.schedules.ScheduleBeat): sends each schedule's
    fires to the light queue. Several may run; a lock in Redis lets one send at a time."""
    settings = _settings_or_fail()
    if settings.broker_url is None:
        return _fail(
            "WEIGHTSMITH_BROKER_URL is not set: beat keeps its schedule in the broker's Redis; "
            "without a broker, 'weightsmith serve' fires schedules itself",
            EXIT_INPUT,
        )
    from infra.db import upgrade_database

    upgrade_database(settings.database_url)  # beat reconciles Redis with the schedules table
    from workers.celery_app import app

    app.start(
        [
            "beat",
            "--scheduler=infra.schedules:ScheduleBeat",
            f"--max-interval={args.max_interval}",
            f"--loglevel={args.loglevel}",
        ]
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings_or_fail()
    try:
        from app.main import create_app
    except ImportError as e:
        return _fail(f"the API is not available in this installation ({e})", EXIT_FAILURE)
    import uvicorn

    from infra.db import ApiKeys, bootstrap_api_key, make_engine, upgrade_database
    from infra.logging import configure_logging
    from infra.queue import InProcessQueue, JobQueue
    from infra.secrets import private_directory

    configure_logging(settings)  # WEIGHTSMITH_LOG_FORMAT and _LEVEL; secrets redacted
    private_directory(settings.data_dir)  # the database, artifacts and key files: 0700
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        added = bootstrap_api_key(ApiKeys(engine), settings)
    finally:
        engine.dispose()
    if added is not None and settings.bootstrap_api_key is None and settings.bootstrap_key_file:
        # Only the public prefix and where the key is: stdout ends up in container logs.
        print(
            f"bootstrap API key wsk_{added}_… for tenant {settings.bootstrap_tenant!r} written "
            f"to {settings.bootstrap_key_file} (mode 0600; read it from there)",
            flush=True,
        )

    worker = None
    queue: JobQueue | None = None
    if settings.embedded_worker:
        from workers.embedded import EmbeddedWorker

        worker = EmbeddedWorker.from_settings(settings)
        queue = InProcessQueue(worker.submit)
        worker.start()
        # No broker, so no beat: a ticker thread here fires the schedules (service.scheduling).
        from service.scheduling import start_embedded_ticker

        ticker, ticker_service = start_embedded_ticker(settings, queue)
    print(
        f"weightsmith API on http://{args.host}:{args.port} (docs: /docs); jobs run "
        + ("in this process" if worker is not None else "on the Celery workers"),
        flush=True,
    )
    try:
        # log_config=None: uvicorn's loggers go through the handler configured above.
        uvicorn.run(
            create_app(settings, queue=queue), host=args.host, port=args.port, log_config=None
        )
    finally:
        if worker is not None:
            ticker.stop(timeout=5)
            ticker_service.close()
            worker.stop(timeout=5)
    return 0


@contextlib.contextmanager
def _api_keys(settings: Any) -> Iterator[Any]:
    """The key store of the configured database, migrated to the current schema first."""
    from infra.db import ApiKeys, make_engine, upgrade_database

    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        yield ApiKeys(engine)
    finally:
        engine.dispose()


def cmd_keys_create(args: argparse.Namespace) -> int:
    settings = _settings_or_fail()
    try:
        with _api_keys(settings) as keys:
            key = keys.create_key(args.tenant)
    except ValueError as e:
        return _fail(str(e), EXIT_INPUT)
    print(f"API key for tenant {args.tenant!r} (shown once, store it now):")
    print(key)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    settings = _settings_or_fail()
    with _api_keys(settings) as keys:
        revoked = keys.revoke_key(args.prefix)
    if not revoked:
        return _fail(f"no active API key with prefix {args.prefix!r}", EXIT_INPUT)
    print(f"revoked API key {args.prefix}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """ROME/MEMIT edit from a recipe, or --revert of an edited checkpoint."""
    import json

    out = Path(args.out)
    if args.revert is not None:
        if args.recipe is not None:
            return _fail("give either a recipe or --revert DIR, not both", EXIT_INPUT)
        from workers.edit import revert_edit
        from workers.errors import InputError, WeightsmithError

        try:
            revert_edit(Path(args.revert), out)
        except InputError as e:
            return _fail(str(e), EXIT_INPUT)
        except WeightsmithError as e:
            return _fail(str(e), EXIT_FAILURE)
        print(f"reverted {args.revert} into {out} (bit for bit)")
        return 0
    if args.recipe is None:
        return _fail("an edit needs a recipe (or --revert DIR)", EXIT_INPUT)

    from schemas.edit_recipe import parse_edit_recipe

    path = Path(args.recipe)
    recipe = _load_recipe(path, parse_edit_recipe)
    if isinstance(recipe, int):
        return recipe

    from workers.edit import LocalCovarianceCache, run_edit
    from workers.edit.engine import EditGateError
    from workers.errors import InputError, WeightsmithError

    cache = LocalCovarianceCache(args.cache_dir) if args.cache_dir else None
    try:
        result = run_edit(recipe, out, base_dir=path.resolve().parent, cache=cache)
    except EditGateError as e:
        print(json.dumps(e.metrics, indent=2, default=str), file=sys.stderr)
        return _fail(str(e), EXIT_FAILURE)
    except InputError as e:
        return _fail(str(e), EXIT_INPUT)
    except WeightsmithError as e:
        return _fail(str(e), EXIT_FAILURE)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written", 130)
    m = result.metrics
    flag = "" if result.gate_passed else " [FLAGGED: " + "; ".join(m["gate"]["failures"]) + "]"
    print(
        f"edited {recipe.model} with {recipe.edit_method} into {out}: efficacy "
        f"{m['efficacy']:.2f}, paraphrase {m['paraphrase']:.2f}, neighborhood "
        f"{m['neighborhood']:.2f}, perplexity ratio {m['perplexity_ratio']:.3f}{flag}"
    )
    return 0


# ---- the service's client: submit, jobs, job, cancel, artifacts, pull, push ---------------
# Each of these talks to a running service through weightsmith.client (URL and key from
# --url/--token or WEIGHTSMITH_URL/WEIGHTSMITH_TOKEN); nothing here imports torch.

_ClientCommand = Callable[[Any, argparse.Namespace], int]
CLIENT_BACKOFF_S = 0.25  # an unreachable service is reported after ~2 s of retries


def _remote(run: _ClientCommand) -> Callable[[argparse.Namespace], int]:
    """A client subcommand: a Client for ``run``, and every ClientError as one line."""

    def command(args: argparse.Namespace) -> int:
        from weightsmith.client import Client, ClientError

        try:
            with Client(args.url, args.token, backoff_s=CLIENT_BACKOFF_S) as client:
                return run(client, args)
        except ClientError as e:
            return _fail(_client_error_line(e), _client_exit_code(e))

    command.__doc__ = run.__doc__
    return command


def _client_error_line(e: Any) -> str:
    from weightsmith.client import TOKEN_ENV

    if e.status in (401, 403):
        return f"{e}; check --token or {TOKEN_ENV}"
    return str(e)


def _client_exit_code(e: Any) -> int:
    from weightsmith.client import ConfigurationError

    if isinstance(e, ConfigurationError) or e.status in (400, 404, 409, 413, 415, 422):
        return EXIT_INPUT
    return EXIT_FAILURE


def _read_job_recipe(path: Path) -> dict[str, Any] | int:
    """The recipe file as a mapping (the service validates it), or the exit code."""
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        return _fail(f"cannot read recipe {str(path)!r}: {e.strerror}", EXIT_INPUT)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return _fail(f"recipe {str(path)!r} is not valid YAML: {e}", EXIT_INPUT)
    if not isinstance(data, dict):
        return _fail(
            f"recipe {str(path)!r} must be a mapping with 'merge_method' (a merge) or "
            "'edit_method' (an edit)",
            EXIT_INPUT,
        )
    return data


def _job_kind(recipe: dict[str, Any], given: str | None, path: Path) -> str | int:
    if given is not None:
        return given
    if "merge_method" in recipe and "edit_method" in recipe:
        return _fail(f"recipe {str(path)!r} has both merge_method and edit_method", EXIT_INPUT)
    if "merge_method" in recipe:
        return "merge"
    if "edit_method" in recipe:
        return "edit"
    return _fail(
        f"recipe {str(path)!r} has neither merge_method nor edit_method; pass --kind merge|edit",
        EXIT_INPUT,
    )


def _artifact_name(given: str | None, path: Path) -> str | int:
    from schemas.references import _ARTIFACT_NAME

    if given is not None:
        return given  # the service checks it and names the field if it is invalid
    if _ARTIFACT_NAME.match(path.stem):
        return path.stem
    return _fail(
        f"the recipe file's name {path.stem!r} is not a valid artifact name; pass --name NAME "
        "(1-100 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit)",
        EXIT_INPUT,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def _progress_text(job: Any) -> str:
    p = job.progress
    parts = [p.phase or "-"]
    if p.tensors_total:
        parts.append(f"{p.tensors_done}/{p.tensors_total} tensors")
    if p.bytes_total:
        parts.append(f"{_human_bytes(p.bytes_done)}/{_human_bytes(p.bytes_total)}")
    return " ".join(parts)


class _JobWatch:
    """``--wait`` progress: a tqdm bar per phase on a terminal, plain lines otherwise
    (on a change of state or phase, and at most every few seconds in between)."""

    PLAIN_EVERY_S = 5.0

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.bar = _ProgressBar(enabled=tty)
        self.last_key: tuple[Any, ...] | None = None
        self.last_line = 0.0

    def __call__(self, job: Any) -> None:
        import time

        if self.tty:
            if job.state == "running" and job.progress.phase is not None:
                self.bar(job.progress)
            return
        key = (job.state, job.progress.phase, job.cancel_requested)
        now = time.monotonic()
        if key != self.last_key or now - self.last_line >= self.PLAIN_EVERY_S:
            stopping = " (cancel requested)" if job.cancel_requested else ""
            print(f"job {job.id} {job.state}: {_progress_text(job)}{stopping}", flush=True)
            self.last_key, self.last_line = key, now

    def close(self) -> None:
        self.bar.close()


def _job_outcome(job: Any) -> int:
    from weightsmith.client import job_artifact_reference

    if job.state == "succeeded":
        print(f"job {job.id} succeeded: published {job_artifact_reference(job)}")
        return 0
    if job.state == "failed":
        why = (job.error.detail or job.error.message) if job.error else "no error recorded"
        return _fail(f"job {job.id} failed: {why}", EXIT_FAILURE)
    return _fail(f"job {job.id} was cancelled; nothing was published", EXIT_FAILURE)


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

    watch = _JobWatch(tty=sys.stderr.isatty())
    try:
        job = client.wait(job.id, on_progress=watch, timeout_s=args.timeout, interval_s=0.5)
    except WaitTimeout as e:
        watch.close()
        return _fail(f"{e}; follow it with 'weightsmith job {job.id}'", EXIT_FAILURE)
    except KeyboardInterrupt:
        watch.close()
        return _fail(
            f"stopped waiting; job {job.id} goes on ('weightsmith job {job.id}', "
            f"'weightsmith cancel {job.id}')",
            130,
        )
    watch.close()
    return _job_outcome(job)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    for row in (headers, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _jobs(client: Any, args: argparse.Namespace) -> int:
    """List jobs, newest first."""
    from weightsmith.client import job_artifact_reference

    rows = [
        [
            job.id,
            job.kind,
            job.state,
            job_artifact_reference(job) or job.artifact_name,
            _progress_text(job) if job.state == "running" else "",
            _when(job.created_at),
        ]
        for job in client.list_jobs(state=args.state, kind=args.kind, limit=args.limit)
    ]
    if not rows:
        print("no jobs")
        return 0
    _table(["ID", "KIND", "STATE", "ARTIFACT", "PROGRESS", "CREATED"], rows)
    return 0


def _job(client: Any, args: argparse.Namespace) -> int:
    """Show one job."""
    import textwrap

    import yaml

    from weightsmith.client import job_artifact_reference

    job = client.get_job(args.job_id)
    if args.json:
        print(job.model_dump_json(indent=2))
        return 0
    lines = [
        ("id", job.id),
        ("kind", job.kind),
        ("state", job.state + (" (cancel requested)" if job.cancel_requested else "")),
        ("artifact", job_artifact_reference(job) or f"{job.artifact_name} (not published)"),
        ("progress", _progress_text(job)),
        ("created", _when(job.created_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
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
    """Cancel a job."""
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
        print(f"job {job.id} is {job.state}: asked to stop (the worker stops between tensors)")
    return 0


def _artifacts(client: Any, args: argparse.Namespace) -> int:
    """List artifacts, or the versions of one."""
    if args.name is None:
        latest = client.list_artifacts()
        if not latest:
            print("no artifacts")
            return 0
        rows = [[v.name, str(v.version), v.reference, _when(v.published_at)] for v in latest]
        _table(["NAME", "LATEST", "REFERENCE", "PUBLISHED"], rows)
        return 0
    versions = client.list_versions(args.name)
    rows = [[str(v.version), v.reference, _when(v.published_at)] for v in versions]
    _table(["VERSION", "REFERENCE", "PUBLISHED"], rows)
    return 0


def _pull(client: Any, args: argparse.Namespace) -> int:
    """Download an artifact version, verifying every file's sha256."""
    import json

    bar: Any = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, desc="pull", file=sys.stderr, dynamic_ncols=True)

    def show(p: Any) -> None:
        if bar is not None:
            bar.total = p.bytes_total
            bar.n = p.bytes_done
            bar.set_postfix_str(f"{p.files_done}/{p.files_total} files", refresh=False)
            bar.refresh()

    try:
        dest = client.download(args.artifact, args.dir, on_progress=show)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written", 130)
    finally:
        if bar is not None:
            bar.close()
    manifest = json.loads((dest / "manifest.json").read_text())
    files = manifest["files"]
    total = sum(int(f["size"]) for f in files)
    pinned = (manifest.get("artifact") or {}).get("reference") or args.artifact
    print(
        f"pulled {pinned} into {dest}: {len(files)} files, "
        f"{_human_bytes(total)}, every sha256 verified"
    )
    return 0


class _PushWatch:
    """``push`` progress: a tqdm bar per phase on a terminal, plain lines otherwise."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.bar: Any = None
        self.phase = ""
        self.upload_id: str | None = None
        self.file: str | None = None

    def __call__(self, p: Any) -> None:
        if p.upload_id and p.upload_id != self.upload_id:
            self.upload_id = p.upload_id
            self._line(
                f"upload {p.upload_id}: {p.files_total} files, {_human_bytes(p.bytes_total)}"
            )
        if p.phase != self.phase:
            self.phase = p.phase
            self.close()
            if not self.tty:
                if p.phase != "published":  # the caller prints the reference
                    size = _human_bytes(p.bytes_total)
                    print(f"{p.phase}: {p.files_total} files, {size}", flush=True)
            elif p.phase in ("hashing", "uploading"):
                self.bar = _tqdm(p.phase, p.bytes_total)
            elif p.phase == "completing":  # no bar: the service is hashing every byte
                print(
                    "completing: the service checks every sha256, then publishes", file=sys.stderr
                )
        if self.bar is not None:
            self.bar.n = p.bytes_done
            self.bar.set_postfix_str(f"{p.files_done}/{p.files_total} files", refresh=False)
            self.bar.refresh()
        elif not self.tty and p.phase == "uploading" and p.file != self.file and p.file:
            self.file = p.file
            print(f"sending {p.file}", flush=True)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _tqdm(desc: str, total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the client-only install has no tqdm: no bar
        return None
    return tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, dynamic_ncols=True
    )


def _push(client: Any, args: argparse.Namespace) -> int:
    """Upload a folder (or one file) as the next version of an artifact of yours."""
    from weightsmith.client import ClientError, LocalFilesError, UploadError, parse_artifact_ref

    try:
        ref = parse_artifact_ref(args.artifact)
    except ClientError as e:
        return _fail(str(e), EXIT_INPUT)
    if ref.version is not None:
        return _fail(
            f"push publishes the next version of {ref.name!r}: write artifact://{ref.name} "
            f"(without '@{ref.version}')",
            EXIT_INPUT,
        )
    watch = _PushWatch(tty=sys.stderr.isatty())
    try:
        version = client.upload(
            args.dir,
            ref.name,
            description=args.description,
            on_progress=watch,
            upload_id=args.resume,
        )
    except LocalFilesError as e:
        watch.close()
        return _fail(str(e), EXIT_INPUT)
    except UploadError as e:
        watch.close()
        hint = ""
        if e.upload_id and e.status != 404:  # gone: nothing to resume
            again = f"weightsmith push {args.dir} {args.artifact} --resume {e.upload_id}"
            hint = f"; go on with '{again}'"
        return _fail(f"{e}{hint}", _client_exit_code(e))
    except KeyboardInterrupt:
        watch.close()
        resume = f" --resume {watch.upload_id}" if watch.upload_id else ""
        return _fail(
            f"interrupted; nothing was published. Go on with 'weightsmith push {args.dir} "
            f"{args.artifact}{resume}'",
            130,
        )
    watch.close()
    print(f"pushed {version.reference}")
    return 0


cmd_submit = _remote(_submit)
cmd_jobs = _remote(_jobs)
cmd_job = _remote(_job)
cmd_cancel = _remote(_cancel)
cmd_artifacts = _remote(_artifacts)
cmd_pull = _remote(_pull)
cmd_push = _remote(_push)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightsmith", description="Merge and patch LLM checkpoints."
    )
    from weightsmith import __version__

    parser.add_argument("--version", action="version", version=f"weightsmith {__version__}")
    parser.add_argument("--url", default=None, help="service URL (default $WEIGHTSMITH_URL)")
    parser.add_argument("--token", default=None, help="API key (default $WEIGHTSMITH_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="run a merge recipe locally (no service needed)")
    m.add_argument("recipe", help="recipe YAML (mergekit vocabulary)")
    m.add_argument("--out", required=True, help="output directory (must not exist)")
    m.add_argument("--seed", type=int, default=None, help="overrides the recipe's seed")
    m.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_merge)
    e = sub.add_parser("edit", help="ROME/MEMIT knowledge edit from a recipe, or revert one")
    e.add_argument("recipe", nargs="?", help="edit recipe YAML (docs/editing.md)")
    e.add_argument("--out", required=True, help="output directory (must not exist)")
    e.add_argument("--revert", metavar="EDITED_DIR", help="write the unedited parent instead")
    e.add_argument("--cache-dir", help="covariance cache (default $WEIGHTSMITH_CACHE/covariance)")
    e.set_defaults(func=cmd_edit)

    w = sub.add_parser("worker", help="start a Celery worker (needs WEIGHTSMITH_BROKER_URL)")
    w.add_argument("--queues", default="default", help="comma-separated: default, gpu, light")
    w.add_argument("--concurrency", type=int, default=1, help="jobs at once (default 1)")
    w.add_argument("--loglevel", default="info", help="Celery log level (default info)")
    w.add_argument("--hostname", default=None, help="worker node name (Celery's -n)")
    w.set_defaults(func=cmd_worker)

    b = sub.add_parser("beat", help="fire schedules: Celery beat with redbeat (needs a broker)")
    b.add_argument("--max-interval", type=int, default=10, help="seconds between checks")
    b.add_argument("--loglevel", default="info", help="Celery log level (default info)")
    b.set_defaults(func=cmd_beat)

    s = sub.add_parser("serve", help="run the API (and, without a broker, its worker)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="manage API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key; prints it on the last line")
    kc.add_argument("--tenant", required=True, help="tenant owning the key (created if new)")
    kc.set_defaults(func=cmd_keys_create)
    kr = ksub.add_parser("revoke", help="revoke the key with this prefix")
    kr.add_argument("prefix", help="the key's prefix (wsk_<prefix>, or the whole key's start)")
    kr.set_defaults(func=cmd_keys_revoke)

    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", default=argparse.SUPPRESS, help="service URL")
    connection.add_argument("--token", default=argparse.SUPPRESS, help="API key")

    def remote(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[connection])

    from weightsmith import admin

    admin.add_commands(sub, remote, _remote)  # tenants, secrets, hub-token, tenant

    sm = remote("submit", "submit a recipe to the service (--wait to follow it)")
    sm.add_argument("recipe", help="merge or edit recipe YAML")
    sm.add_argument("--kind", choices=["merge", "edit"], help="default: from the recipe")
    sm.add_argument("--name", help="artifact name (default: the recipe file's stem)")
    sm.add_argument("--wait", action="store_true", help="follow the job; exit 0 if it succeeds")
    sm.add_argument("--timeout", type=float, default=None, help="with --wait: give up after S s")
    sm.add_argument("--idempotency-key", help="resubmitting with the same key runs it once")
    sm.add_argument("--callback-url", help="webhook called when the job ends")
    sm.add_argument("--hub-repo", help="also push the artifact to this hub repo (org/name)")
    sm.set_defaults(func=cmd_submit)
    js = remote("jobs", "list the service's jobs, newest first")
    js.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    js.add_argument("--kind", choices=["merge", "edit"])
    js.add_argument("--limit", type=_positive_int, default=20, help="at most N jobs (default 20)")
    js.set_defaults(func=cmd_jobs)
    jb = remote("job", "show one job of the service")
    jb.add_argument("job_id", metavar="ID")
    jb.add_argument("--json", action="store_true", help="the job as the API returns it")
    jb.set_defaults(func=cmd_job)
    cn = remote("cancel", "cancel a job of the service")
    cn.add_argument("job_id", metavar="ID")
    cn.set_defaults(func=cmd_cancel)
    ar = remote("artifacts", "list published artifacts, or the versions of NAME")
    ar.add_argument("name", nargs="?", metavar="NAME")
    ar.set_defaults(func=cmd_artifacts)
    pl = remote("pull", "download an artifact version, verifying every sha256")
    pl.add_argument("artifact", metavar="REF", help="artifact://name@version (or @latest)")
    pl.add_argument("dir", metavar="DIR", help="target directory (must not exist, or be empty)")
    pl.set_defaults(func=cmd_pull)
    ps = remote("push", "upload a folder as the next version of an artifact (safetensors)")
    ps.add_argument("dir", metavar="DIR", help="a checkpoint folder, or one file")
    ps.add_argument("artifact", metavar="REF", help="artifact://name (or name)")
    ps.add_argument("--description", help="kept in the version's manifest")
    ps.add_argument("--resume", metavar="UPLOAD_ID", help="go on with an interrupted upload")
    ps.set_defaults(func=cmd_push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
