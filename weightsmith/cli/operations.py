"""Operations: the commands that run the service and administer its keys — ``serve`` (the
API, and without a broker its in-process worker), ``worker`` and ``beat`` (Celery), ``keys``.
They act on the configured settings (``WEIGHTSMITH_*``, infra/settings.py) and database;
the operator's tenant and secret commands are in :mod:`weightsmith.cli.tenants`."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from weightsmith.cli.common import EXIT_FAILURE, EXIT_INPUT, fail, positive_int, settings_or_fail


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker on the given queues (needs WEIGHTSMITH_BROKER_URL)."""
    settings = settings_or_fail()
    if settings.broker_url is None:
        return fail(
            "WEIGHTSMITH_BROKER_URL is not set: a Celery worker needs a broker (e.g. "
            "redis://127.0.0.1:6379/0); without one, 'weightsmith serve' runs jobs itself",
            EXIT_INPUT,
        )
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    if not queues:
        return fail("--queues names no queue", EXIT_INPUT)
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
    settings = settings_or_fail()
    if settings.broker_url is None:
        return fail(
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
    """The API; without a broker also its in-process worker, which runs one job at a time,
    and a ticker that fires the schedules."""
    settings = settings_or_fail()
    if settings.embedded_worker:  # a device this machine lacks stops here, not every job
        from workers.devices import resolve_device
        from workers.errors import InputError
        from workers.runner import DEVICE_SETTING

        try:
            resolve_device(settings.worker_device, field=DEVICE_SETTING)
        except InputError as e:
            return fail(str(e), EXIT_INPUT)
    try:
        from app.main import create_app
    except ImportError as e:
        return fail(f"the API is not available in this installation ({e})", EXIT_FAILURE)
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
        + ("in this process, one at a time" if worker is not None else "on the Celery workers"),
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
    """Create an API key for a tenant (created if new); the key is shown once."""
    settings = settings_or_fail()
    try:
        with _api_keys(settings) as keys:
            key = keys.create_key(args.tenant)
    except ValueError as e:
        return fail(str(e), EXIT_INPUT)
    print(f"API key for tenant {args.tenant!r} (shown once, store it now):")
    print(key)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke the API key with this prefix."""
    settings = settings_or_fail()
    with _api_keys(settings) as keys:
        revoked = keys.revoke_key(args.prefix)
    if not revoked:
        return fail(f"no active API key with prefix {args.prefix!r}", EXIT_INPUT)
    print(f"revoked API key {args.prefix}")
    return 0


def add_commands(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """Register ``worker``, ``beat``, ``serve`` and ``keys``."""

    def command(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=func.__doc__, formatter_class=formatter)
        p.set_defaults(func=func)
        return p

    w = command("worker", "start a Celery worker (needs WEIGHTSMITH_BROKER_URL)", cmd_worker)
    w.add_argument("--queues", default="default", help="comma-separated: default, gpu, light")
    w.add_argument("--concurrency", type=positive_int, default=1, help="jobs at once")
    w.add_argument("--loglevel", default="info", help="Celery log level")
    w.add_argument("--hostname", default=None, help="worker node name (Celery's -n)")

    b = command("beat", "fire schedules: Celery beat with redbeat (needs a broker)", cmd_beat)
    b.add_argument(
        "--max-interval", type=positive_int, default=10, help="seconds between schedule checks"
    )
    b.add_argument("--loglevel", default="info", help="Celery log level")

    s = command(
        "serve", "run the API (and, without a broker, its worker: one job at a time)", cmd_serve
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")

    k = sub.add_parser("keys", help="manage API keys", formatter_class=formatter)
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser(
        "create",
        help="create a key; prints it on the last line",
        description=cmd_keys_create.__doc__,
        formatter_class=formatter,
    )
    kc.add_argument("--tenant", required=True, help="tenant owning the key (created if new)")
    kc.set_defaults(func=cmd_keys_create)
    kr = ksub.add_parser(
        "revoke",
        help="revoke the key with this prefix",
        description=cmd_keys_revoke.__doc__,
        formatter_class=formatter,
    )
    kr.add_argument("prefix", help="the key's prefix (wsk_<prefix>, or the whole key's start)")
    kr.set_defaults(func=cmd_keys_revoke)
