"""The ``weightsmith`` command line.

Each subcommand imports what it needs when it runs, so ``weightsmith --help`` and the
service commands never import torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def cmd_merge(args: argparse.Namespace) -> int:
    from schemas.recipe import RecipeError, parse_recipe

    path = Path(args.recipe)
    try:
        text = path.read_text()
    except OSError as e:
        return _fail(f"cannot read recipe {str(path)!r}: {e.strerror}", EXIT_INPUT)
    try:
        recipe = parse_recipe(text)
    except RecipeError as e:
        return _fail(f"recipe {str(path)!r}: {e}", EXIT_INPUT)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
