"""ROME settings on SmolLM2-135M: which layer, how much of the update? A sweep on held-out facts.

    python bench/edit_sweep.py                                   # layers 1,2,3,5; 12 facts
    python bench/edit_sweep.py --layers 5 --edit-margins none,1,2,3 --facts 40
    python bench/edit_sweep.py --layers 5 --edit-margins none --sufficient-losses 0.2,0.5
    python bench/edit_sweep.py --keys --layers 0,1,2,3,5 --facts 40     # key overlap only

The dev facts are the neighbour pool of ``bench/edit_facts.json`` (facts that
``edit_bench.py`` uses only as neighborhood prompts, never as edits), so a setting chosen
here is not chosen on the facts ``edit_bench.py`` then reports. Each fact gets a
counterfactual target (the next object of its relation that differs), the relation's
paraphrase and, as neighborhood, up to 3 prompts of other subjects with the same true
object. Known facts only, round-robin over the relations; each edit on the clean model; the
covariance as the recipe default (15,360 tokens sampled from the model). The update is
optimised once per fact and layer, then scaled for each edit_margin ('none': the whole
update; 'default': the recipe default) and each sufficient_loss. Prints efficacy,
paraphrase, neighborhood, the mean scale and the perplexity ratio per setting; results go to
``bench/.data/results-sweep.json``.

``--keys`` edits nothing: per layer it prints how much of an edit each kind of prompt would
receive through its key (:func:`key_shares`), for the edited prompt, its paraphrase, the
same-object neighbors and the relation's other subjects.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.edit_bench import (  # noqa: E402
    DATA,
    FACTS,
    Fact,
    facts_as_edits,
    known,
    pre_edit_probe,
    round_robin,
)
from schemas.edit_recipe import parse_edit_recipe  # noqa: E402
from testbed.smollm2 import smollm2_checkpoint  # noqa: E402
from workers.edit import LocalCovarianceCache  # noqa: E402
from workers.edit.algebra import delta_from_factors, rome_direction  # noqa: E402
from workers.edit.architectures import EditModel  # noqa: E402
from workers.edit.covariance import covariances, sampled_corpus  # noqa: E402
from workers.edit.engine import load_model, model_revision  # noqa: E402
from workers.edit.methods import edit_method  # noqa: E402
from workers.edit.metrics import evaluate, perplexity, reference_sentences  # noqa: E402
from workers.edit.rome import (  # noqa: E402
    least_margin_scale,
    least_sufficient_scale,
    rome_edit,
    subject_keys,
)
from workers.edit.settings import EditSettings  # noqa: E402
from workers.edit.templates import context_templates  # noqa: E402
from workers.edit.update import EditContext, RankOneUpdate  # noqa: E402
from workers.sources import SourceSettings, resolve_reference  # noqa: E402


def dev_facts() -> list[Fact]:
    """The neighbour pool's facts as edits, those with a same-object neighborhood."""
    doc = json.loads(FACTS.read_text())
    return [f for f in facts_as_edits(doc, doc["neighbours"]) if f.request.neighborhood_prompts]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", default="1,2,3,5", help="layers to try (default 1,2,3,5)")
    p.add_argument(
        "--edit-margins",
        default="default",
        help="edit_margin values to try, 'none' (the whole update) and 'default' allowed "
        "(default: default)",
    )
    p.add_argument(
        "--sufficient-losses",
        default="",
        help="sufficient_loss values to try as well (default: none)",
    )
    p.add_argument("--facts", type=int, default=12, help="known dev facts to edit (default 12)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=DATA / "covariance",
        help="covariance cache (kept; default bench/.data/covariance)",
    )
    p.add_argument(
        "--keep",
        choices=("none", "neighborhood", "leave-one-out"),
        default="none",
        help="also edit with keep_prompts: 'neighborhood' keeps the fact's neighborhood prompts "
        "(the cost in efficacy/paraphrase; those neighbors are then not held out); "
        "'leave-one-out' keeps all but one and scores that one (does keeping similar subjects "
        "protect another?)",
    )
    p.add_argument(
        "--keys",
        action="store_true",
        help="edit nothing: print, per layer, the share of an edit that the paraphrase, the "
        "same-object neighbors and the relation's other subjects receive through their keys",
    )
    p.add_argument("--out", type=Path, default=DATA / "results-sweep.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",") if x]
    DATA.mkdir(exist_ok=True)

    ckpt = smollm2_checkpoint()
    candidates = round_robin(dev_facts())
    first = candidates[0].request.model_dump(exclude_none=True)
    recipe = parse_edit_recipe({"edit_method": "rome", "model": str(ckpt), "requests": [first]})
    resolved = resolve_reference(recipe.model, SourceSettings())
    target = load_model(resolved, "smollm2")
    model, tok, arch = target.model, target.tokenizer, target.arch
    rome = edit_method("rome")  # the layers are set per sweep entry below
    settings = EditSettings.from_recipe(recipe, target, rome, rome.default_layers(target.depth))
    h = recipe.hyperparameters
    templates = context_templates(model, tok, h.context_template_counts, recipe.seed)
    flags = known(model, tok, [f.request for f in candidates])
    chosen = [f for f, k in zip(candidates, flags, strict=True) if k][: args.facts]
    requests = [f.request for f in chosen]
    print(f"{len(requests)} dev facts: {[r.prompt for r in requests]}", flush=True)

    cov = recipe.covariance
    d_in = model.get_submodule(arch.module_name(layers[0])).weight.shape[1]
    t = time.perf_counter()
    C, _ = covariances(
        model, arch, layers,
        sampled_corpus(
            model, tok, seed=cov.seed, max_length=cov.max_length,
            sampler=model_revision(resolved),
        ),
        cov.tokens or 10 * d_in,
        model_revision=model_revision(resolved),
        cache=LocalCovarianceCache(args.cache_dir),
    )  # fmt: skip
    print(f"covariances: {time.perf_counter() - t:.1f} s", flush=True)
    if args.keys:
        shares = {
            "facts": [r.prompt for r in requests],
            "keys": [
                {"layer": layer, "shares": print_key_shares(model, tok, arch, layer, C[layer],
                                                            templates, chosen)}
                for layer in layers
            ],
        }  # fmt: skip
        args.out.write_text(json.dumps(shares, indent=2) + "\n")
        return 0
    ppl0 = perplexity(model, tok, reference_sentences())

    settings: list[tuple[str, float | None]] = [
        ("edit_margin", None if x == "none" else h.edit_margin if x == "default" else float(x))
        for x in args.edit_margins.split(",")
        if x
    ] + [("sufficient_loss", float(x)) for x in args.sufficient_losses.split(",") if x]
    keys = ("efficacy", "paraphrase", "neighborhood", "perplexity_ratio")
    results: dict[str, Any] = {"facts": [r.prompt for r in requests], "settings": []}
    print("\n| layer | scaling | efficacy | paraphrase | neighborhood | mean scale | "
          "mean perplexity ratio | max |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    kept_rows: list[dict[str, Any]] = []
    setup = Setup(target, EditContext(templates, C), settings, ppl0)
    for layer in layers:
        weight = model.get_submodule(arch.module_name(layer)).weight
        original = weight.detach().clone()
        rows: dict[tuple[str, float | None], list[dict[str, Any]]] = {x: [] for x in settings}
        for r in requests:
            before = pre_edit_probe(model, tok, [r], ppl0)
            u = rome_edit(target, r, setup.at(layer), setup.context)

            nb = r.neighborhood_prompts
            if args.keep == "neighborhood" and nb:
                plain, kept = scored(setup, r, layer, u, None), scored(setup, r, layer, u, nb)
                kept_rows.append({"layer": layer, "prompt": r.prompt, "plain": plain, "kept": kept})
            elif args.keep == "leave-one-out" and len(nb) >= 2:
                for j, held in enumerate(nb):
                    one = r.model_copy(update={"neighborhood_prompts": [held]})
                    plain = scored(setup, one, layer, u, None)
                    kept = scored(setup, one, layer, u, nb[:j] + nb[j + 1 :])
                    kept_rows.append(
                        {"layer": layer, "prompt": r.prompt, "held_out": held,
                         "plain": plain, "kept": kept}
                    )  # fmt: skip
            for setting in settings:
                scale = setting_scale(setup, r, layer, u, setting)
                target.apply(layer, scale * delta_from_factors(u.left, u.right))
                m = evaluate(model, tok, [r], before)
                rows[setting].append({k: m[k] for k in keys} | {"scale": scale})
                with torch.no_grad():
                    weight.copy_(original)
        for setting in settings:
            summary = {
                k: statistics.fmean(x[k] for x in rows[setting] if x[k] is not None)
                for k in (*keys, "scale")
            }
            summary["max_perplexity_ratio"] = max(x["perplexity_ratio"] for x in rows[setting])
            name, value = setting
            results["settings"].append(
                {"layer": layer, name: value, "summary": summary, "facts": rows[setting]}
            )
            label = "whole update" if value is None else f"{name} {value}"
            print(
                f"| {layer} | {label} | {summary['efficacy']:.3f} | "
                f"{summary['paraphrase']:.3f} | {summary['neighborhood']:.3f} | "
                f"{summary['scale']:.2f} | {summary['perplexity_ratio']:.4f} | "
                f"{summary['max_perplexity_ratio']:.4f} |",
                flush=True,
            )
        results["keep"] = {"mode": args.keep, "rows": kept_rows}
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if kept_rows:
        print_kept(args.keep, kept_rows)
    return 0


def prompt_subjects() -> dict[str, str]:
    """Every prompt of ``bench/edit_facts.json`` (relations and neighbour pool) → its subject."""
    doc = json.loads(FACTS.read_text())
    return {
        rel["prompt"].format(s): s for rel in doc["relations"] + doc["neighbours"]
        for s, _ in rel["facts"]
    }  # fmt: skip


def key_shares(
    model: Any, tok: Any, module: str, C: torch.Tensor, templates: list[str], fact: Fact,
    subjects: dict[str, str],
) -> dict[str, list[float]]:  # fmt: skip
    """r = uᵀk / uᵀk̄ for the prompts around one fact, with ROME's direction u = C⁻¹k̄ (k̄
    the fact's prefix-averaged key) and k the key at the last token of the prompt's subject,
    unprefixed: ROME's update gives that token ΔW k = r · (v* − W k̄), r times the change
    the edited key gets. Paraphrases should be near 1, neighbors and others near 0."""
    r = fact.request
    k_bar = subject_keys(model, tok, module, templates, r.prompt, r.subject).k_bar.double()
    u = rome_direction(k_bar, C).double()
    denominator = float(u @ k_bar)

    def share(prompt: str, subject: str) -> float:
        k = subject_keys(model, tok, module, ["{}"], prompt, subject).k0.double()
        return float(u @ k) / denominator

    return {
        "edited prompt": [share(r.prompt, r.subject)],
        "paraphrase": [share(p, r.subject) for p in r.paraphrase_prompts],
        "same-object neighbor": [share(p, subjects[p]) for p in r.neighborhood_prompts],
        "other subject": [share(p, subjects[p]) for p, _ in fact.others],
    }


def print_key_shares(
    model: Any, tok: Any, arch: Any, layer: int, C: torch.Tensor, templates: list[str],
    facts: list[Fact],
) -> dict[str, list[float]]:  # fmt: skip
    """The shares of :func:`key_shares` over the facts at one layer, as a table."""
    subjects = prompt_subjects()
    pooled: dict[str, list[float]] = {}
    for f in facts:
        for g, xs in key_shares(
            model, tok, arch.module_name(layer), C, templates, f, subjects
        ).items():
            pooled.setdefault(g, []).extend(xs)
    print(f"\nlayer {layer}: r = uᵀk / uᵀk̄ over {len(facts)} facts")
    print("| prompts | n | mean | median | 90th percentile | share with r > 0.3 |")
    print("|---|---|---|---|---|---|")
    for g, xs in pooled.items():
        if not xs:
            continue
        p90 = statistics.quantiles(xs, n=10)[-1] if len(xs) > 1 else xs[0]
        print(
            f"| {g} | {len(xs)} | {statistics.fmean(xs):.2f} | {statistics.median(xs):.2f} | "
            f"{p90:.2f} | {sum(x > 0.3 for x in xs) / len(xs):.2f} |",
            flush=True,
        )
    return pooled


def setting_scale(
    s: Setup, request: Any, layer: int, u: RankOneUpdate, setting: tuple[str, float | None]
) -> float:
    """The factor on the whole update ``u`` that a scaling setting picks (1: none)."""
    name, value = setting
    if value is None:
        return 1.0
    delta = delta_from_factors(u.left, u.right)
    if name == "sufficient_loss":
        return least_sufficient_scale(s.target, layer, delta, s.context.templates, request, value)
    return least_margin_scale(s.target, layer, delta, request, request.target_true, value)


@dataclass(frozen=True)
class Setup:
    target: EditModel
    context: EditContext  # templates and every swept layer's C
    settings: EditSettings  # the recipe's, as resolved for the model
    ppl0: float

    def at(self, layer: int) -> EditSettings:
        """The settings of a ROME edit at ``layer``, unscaled (the sweep scales it)."""
        return dataclasses.replace(
            self.settings, layers=(layer,), edit_margin=None, sufficient_loss=None
        )


def scored(
    s: Setup, request: Any, layer: int, plain: RankOneUpdate, keep: list[str] | None
) -> dict[str, Any]:
    """Metrics of ``request`` edited alone on the clean model: the plain update, or (keep not
    None) the update with those keep_prompts and the plain update's v*."""
    if keep is not None:
        request = request.model_copy(update={"keep_prompts": keep})
    model, tok = s.target.model, s.target.tokenizer
    pre = pre_edit_probe(model, tok, [request], s.ppl0)
    update = plain
    if keep is not None:
        update = rome_edit(s.target, request, s.at(layer), s.context, value=plain.value)
    with s.target.restored([layer]):
        s.target.apply(layer, delta_from_factors(update.left, update.right))
        return evaluate(model, tok, [request], pre)


def print_kept(mode: str, rows: list[dict[str, Any]]) -> None:
    """Plain edit vs the same v* with keep_prompts, per layer."""
    if mode == "neighborhood":
        what, count = "kept neighborhood", f"{len(rows)} edits"
    else:
        what, count = "held-out neighbor", f"{len(rows)} held-out neighbors"
    print(f"\nkeep_prompts: {mode} ({count})")
    print(f"| layer | edit | efficacy | paraphrase | {what} | keep_unchanged | perplexity ratio |")
    print("|---|---|---|---|---|---|---|")
    for layer in sorted({x["layer"] for x in rows}):
        for which in ("plain", "kept"):
            ms = [x[which] for x in rows if x["layer"] == layer]

            def mean(key: str, ms: list[dict[str, Any]] = ms) -> float:
                vals = [m[key] for m in ms if m[key] == m[key]]
                return statistics.fmean(vals) if vals else float("nan")

            print(
                f"| {layer} | {which} | {mean('efficacy'):.3f} | {mean('paraphrase'):.3f} | "
                f"{mean('neighborhood'):.3f} | {mean('keep_unchanged'):.3f} | "
                f"{mean('perplexity_ratio'):.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    raise SystemExit(main())
