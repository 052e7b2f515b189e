"""Local commands: ``merge``, ``edit``, ``extract-lora`` and ``moe`` run the engine in this
process, on local files or Hub models, with no service. They import torch when they run (never at
``--help``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from weightsmith.cli.common import EXIT_FAILURE, EXIT_INPUT, EXIT_INTERRUPTED, fail, positive_int
from weightsmith.cli.progress import ProgressBar

_R = TypeVar("_R")


def load_recipe(path: Path, parse: Callable[[str], _R]) -> _R | int:
    """The validated recipe in ``path``, or the exit code after a one-line error."""
    from schemas.recipe import RecipeError

    try:
        text = path.read_text()
    except OSError as e:
        return fail(f"cannot read recipe {str(path)!r}: {e.strerror}", EXIT_INPUT)
    try:
        return parse(text)
    except RecipeError as e:
        return fail(f"recipe {str(path)!r}: {e}", EXIT_INPUT)


def run_engine(args: argparse.Namespace, run: Callable[[ProgressBar], _R]) -> _R | int:
    """``run(bar)`` with a progress bar on stderr (off with --quiet or when stderr is not a
    terminal): its result, or the exit code after a one-line error (bad input, another
    failure, or Ctrl-C: the engines write nothing then)."""
    from workers.errors import InputError, WeightsmithError

    bar = ProgressBar(enabled=sys.stderr.isatty() and not args.quiet)
    try:
        return run(bar)
    except InputError as e:
        return fail(str(e), EXIT_INPUT)
    except WeightsmithError as e:
        return fail(str(e), EXIT_FAILURE)
    except KeyboardInterrupt:
        return fail("interrupted; nothing was written", EXIT_INTERRUPTED)
    finally:
        bar.close()


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge the models of a recipe into a new checkpoint folder."""
    from schemas.recipe import parse_recipe

    path = Path(args.recipe)
    recipe = load_recipe(path, parse_recipe)
    if isinstance(recipe, int):
        return recipe

    from schemas.limits import MAX_MERGE_PARALLELISM

    # --parallelism, else the recipe's (validated with it), else one process
    parallelism = args.parallelism or recipe.parallelism or 1
    if parallelism > MAX_MERGE_PARALLELISM:
        return fail(
            f"--parallelism {parallelism}: at most {MAX_MERGE_PARALLELISM} worker processes",
            EXIT_INPUT,
        )

    from workers.merge.parts import run_merge_in_processes
    from workers.sources import SourceSettings

    settings = SourceSettings(allow_pickle=recipe.allow_pickle, hub_token=None)
    result = run_engine(
        args,
        lambda bar: run_merge_in_processes(
            recipe,
            Path(args.out),
            parallelism,
            seed=args.seed,
            device=args.device,
            sources=settings,
            base_dir=path.resolve().parent,
            progress=bar,
        ),
    )
    if isinstance(result, int):
        return result
    total = result.manifest["timings"].get("total_s", 0.0)
    processes = f", {parallelism} processes" if parallelism > 1 else ""
    print(
        f"merged {recipe.merge_method} into {result.out_dir} (seed {result.seed}, "
        f"{len(result.manifest['files'])} files, {total:.1f} s{processes})"
    )
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """ROME/MEMIT edit from a recipe, or --revert of an edited checkpoint."""
    out = Path(args.out)
    if args.revert is not None:
        if args.recipe is not None:
            return fail("give either a recipe or --revert DIR, not both", EXIT_INPUT)
        return _revert(Path(args.revert), out)
    if args.recipe is None:
        return fail("an edit needs a recipe (or --revert DIR)", EXIT_INPUT)

    from schemas.edit_recipe import parse_edit_recipe

    path = Path(args.recipe)
    recipe = load_recipe(path, parse_edit_recipe)
    if isinstance(recipe, int):
        return recipe

    import json

    from workers.edit import LocalCovarianceCache, run_edit
    from workers.edit.causal_trace import LocalTraceCache
    from workers.edit.engine import EditGateError
    from workers.errors import InputError, WeightsmithError

    cache = LocalCovarianceCache(args.cache_dir) if args.cache_dir else None
    traces = LocalTraceCache(Path(args.cache_dir) / "trace") if args.cache_dir else None
    try:
        result = run_edit(
            recipe,
            out,
            base_dir=path.resolve().parent,
            cache=cache,
            trace_cache=traces,
            device=args.device,
        )
    except EditGateError as e:
        print(json.dumps(e.metrics, indent=2, default=str), file=sys.stderr)
        return fail(str(e), EXIT_FAILURE)
    except InputError as e:
        return fail(str(e), EXIT_INPUT)
    except WeightsmithError as e:
        return fail(str(e), EXIT_FAILURE)
    except KeyboardInterrupt:
        return fail("interrupted; nothing was written", EXIT_INTERRUPTED)
    m = result.metrics
    flag = "" if result.gate_passed else " [FLAGGED: " + "; ".join(m["gate"]["failures"]) + "]"
    print(
        f"edited {recipe.model} with {recipe.edit_method} at layers {m['layers']} "
        f"({m['layer_choice']}) into {out}: efficacy "
        f"{m['efficacy']:.2f}, paraphrase {m['paraphrase']:.2f}, neighborhood "
        f"{m['neighborhood']:.2f}, perplexity ratio {m['perplexity_ratio']:.3f}{flag}"
    )
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    """Extract a PEFT LoRA adapter (base + ΔW ≈ base + B·A) from a fine-tune and its base."""
    from schemas.lora_recipe import parse_extract_lora_recipe

    path = Path(args.recipe)
    recipe = load_recipe(path, parse_extract_lora_recipe)
    if isinstance(recipe, int):
        return recipe

    from workers.extract import run_extract_lora
    from workers.sources import SourceSettings

    result = run_engine(
        args,
        lambda bar: run_extract_lora(
            recipe,
            Path(args.out),
            device=args.device,
            sources=SourceSettings(hub_token=None),
            base_dir=path.resolve().parent,
            progress=bar,
        ),
    )
    if isinstance(result, int):
        return result
    s = result.metrics["summary"]
    print(
        f"extracted a LoRA adapter into {result.out_dir}: {s['decomposed_modules']} modules, "
        f"r {s['r']}{' (per-module ranks differ)' if s['ranks_differ'] else ''}, relative "
        f"error at most {s['max_relative_error']:.3g}, "
        f"{len(result.metrics['modules_to_save'])} modules saved whole"
    )
    return 0


def cmd_moe(args: argparse.Namespace) -> int:
    """Assemble a mixture of experts (Mixtral from Llama/Mistral, Qwen2-MoE from Qwen2):
    attention, norms and embeddings from the base, each expert's MLPs from a fine-tune,
    routers initialised from the experts' prompts."""
    from schemas.moe_recipe import parse_moe_recipe

    path = Path(args.recipe)
    recipe = load_recipe(path, parse_moe_recipe)
    if isinstance(recipe, int):
        return recipe

    from workers.moe import run_moe
    from workers.sources import SourceSettings

    result = run_engine(
        args,
        lambda bar: run_moe(
            recipe,
            Path(args.out),
            device=args.device,
            sources=SourceSettings(hub_token=None),
            base_dir=path.resolve().parent,
            progress=bar,
        ),
    )
    if isinstance(result, int):
        return result
    m = result.metrics
    degenerate = m["degenerate_router_layers"]
    print(
        f"assembled a {m['architecture']} MoE into {result.out_dir}: "
        f"{m['num_local_experts']} experts, {m['num_experts_per_tok']} per token, routers "
        f"from {m['gate_mode']}"
        + (f"; layers {degenerate} have nearly parallel router rows" if degenerate else "")
    )
    return 0


def _revert(edited: Path, out: Path) -> int:
    from workers.edit import revert_edit
    from workers.errors import InputError, WeightsmithError

    try:
        revert_edit(edited, out)
    except InputError as e:
        return fail(str(e), EXIT_INPUT)
    except WeightsmithError as e:
        return fail(str(e), EXIT_FAILURE)
    print(f"reverted {edited} into {out} (bit for bit)")
    return 0


def add_commands(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """Register ``merge``, ``edit``, ``extract-lora`` and ``moe``."""
    m = sub.add_parser(
        "merge",
        help="run a merge recipe locally (no service needed)",
        description=cmd_merge.__doc__,
        formatter_class=formatter,
    )
    m.add_argument("recipe", help="recipe YAML (mergekit vocabulary, docs/recipes.md)")
    m.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    m.add_argument("--seed", type=int, default=None, help="overrides the recipe's seed")
    m.add_argument("--device", default="cpu", help="where to compute: cpu, cuda or cuda:N, or auto")
    m.add_argument(
        "--parallelism",
        type=positive_int,
        default=None,
        metavar="N",
        help="run the merge in N worker processes at once, each a range of the output's shards "
        "(overrides the recipe's parallelism; the output is the same)",
    )
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_merge)

    e = sub.add_parser(
        "edit",
        help="ROME/MEMIT knowledge edit from a recipe, or revert one",
        description=cmd_edit.__doc__,
        formatter_class=formatter,
    )
    e.add_argument("recipe", nargs="?", help="edit recipe YAML (docs/editing.md)")
    e.add_argument("--out", required=True, help="output directory (must not exist)")
    e.add_argument(
        "--revert", metavar="EDITED_DIR", help="write the unedited parent of EDITED_DIR instead"
    )
    e.add_argument(
        "--cache-dir",
        help="covariance cache folder, its trace/ subfolder the causal traces of layers: "
        "auto (default: $WEIGHTSMITH_CACHE/covariance and …/trace, else "
        "~/.cache/weightsmith/covariance and …/trace)",
    )
    e.add_argument(
        "--device",
        default="auto",
        help="where to compute: auto (cuda when a CUDA GPU is visible, else cpu), cpu, cuda "
        "or cuda:N; on a GPU the model is loaded in its stored dtype (docs/editing.md)",
    )
    e.set_defaults(func=cmd_edit)

    x = sub.add_parser(
        "extract-lora",
        help="turn a fine-tune into a PEFT LoRA adapter of its base (truncated SVD of ΔW)",
        description=cmd_extract_lora.__doc__,
        formatter_class=formatter,
    )
    x.add_argument("recipe", help="extraction recipe YAML (docs/extract-lora.md)")
    x.add_argument("--out", required=True, help="adapter directory (must not exist, or be empty)")
    x.add_argument("--device", default="cpu", help="where to compute the SVDs: cpu or cuda")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    x.set_defaults(func=cmd_extract_lora)

    moe = sub.add_parser(
        "moe",
        help="assemble a Mixtral / Qwen2-MoE mixture of experts from fine-tunes of one base",
        description=cmd_moe.__doc__,
        formatter_class=formatter,
    )
    moe.add_argument("recipe", help="MoE recipe YAML (docs/moe.md)")
    moe.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    moe.add_argument(
        "--device", default="cpu", help="where to run the base for gate_mode hidden: cpu or cuda"
    )
    moe.add_argument("--quiet", action="store_true", help="no progress bar")
    moe.set_defaults(func=cmd_moe)
