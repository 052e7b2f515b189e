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

_R = TypeVar("_R")

EXIT_INPUT = 2  # bad recipe, bad checkpoint, bad reference
EXIT_FAILURE = 1  # anything else


def _fail(message: str, code: int) -> int:
    first = " ".join(str(message).split())
    print(f"weightsmith: error: {first}", file=sys.stderr)
    return code


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


def _settings_or_fail() -> Any:
    from pydantic import ValidationError

    from infra.settings import get_settings

    try:
        return get_settings()
    except ValidationError as e:
        problems = "; ".join(str(err.get("msg", "")) for err in e.errors())
        raise SystemExit(_fail(f"invalid settings: {problems}", EXIT_INPUT)) from None


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


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    settings = _settings_or_fail()
    try:
        from app.main import create_app
    except ImportError as e:
        return _fail(f"the API is not available in this installation ({e})", EXIT_FAILURE)
    import uvicorn

    from infra.db import ApiKeys, bootstrap_api_key, make_engine, upgrade_database
    from infra.queue import InProcessQueue, JobQueue

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        added = bootstrap_api_key(ApiKeys(engine), settings)
    finally:
        engine.dispose()
    if added is not None and settings.bootstrap_api_key is None and settings.bootstrap_key_file:
        key = settings.bootstrap_key_file.read_text().strip()
        print(
            f"bootstrap API key for tenant {settings.bootstrap_tenant!r} (shown once; also in "
            f"{settings.bootstrap_key_file}):\n{key}",
            flush=True,
        )

    worker = None
    queue: JobQueue | None = None
    if settings.embedded_worker:
        from workers.embedded import EmbeddedWorker

        worker = EmbeddedWorker.from_settings(settings)
        queue = InProcessQueue(worker.submit)
        worker.start()
    print(
        f"weightsmith API on http://{args.host}:{args.port} (docs: /docs); jobs run "
        + ("in this process" if worker is not None else "on the Celery workers"),
        flush=True,
    )
    try:
        uvicorn.run(create_app(settings, queue=queue), host=args.host, port=args.port)
    finally:
        if worker is not None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightsmith", description="Merge and patch LLM checkpoints."
    )
    from weightsmith import __version__

    parser.add_argument("--version", action="version", version=f"weightsmith {__version__}")
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
    w.add_argument("--queues", default="default", help="comma-separated: default, gpu")
    w.add_argument("--concurrency", type=int, default=1, help="jobs at once (default 1)")
    w.add_argument("--loglevel", default="info", help="Celery log level (default info)")
    w.add_argument("--hostname", default=None, help="worker node name (Celery's -n)")
    w.set_defaults(func=cmd_worker)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
