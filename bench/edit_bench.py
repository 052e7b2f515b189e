"""ROME / MEMIT on SmolLM2-135M-Instruct (CPU; a GPU with --device): speed and edit quality.

    python bench/edit_bench.py             # the full run (defaults of the edit recipe)
    python bench/edit_bench.py --quick     # smoke run: 3 facts, small corpus, MEMIT of 3

Figures (see bench/README.md):

- covariance build time at the default token count (10 × d_in, text sampled from the model,
  the recipe default), for the ROME layer and for the MEMIT band;
- time of one ROME edit through ``run_edit`` with a cold and with a warm covariance cache
  (whole call, and the phases), and of every ROME edit of the quality run (the update only);
- MEMIT batches of 10 and 100 requests (the update only, covariances warm);
- quality over the facts of ``bench/edit_facts.json`` that the model knows (before the edit
  it prefers target_true over the counterfactual target_new), sampled round-robin over the
  relations: efficacy, paraphrase, neighborhood (CounterFact's: prompts about other
  subjects with the same true object, share whose preference between target_true and
  target_new is unchanged), the share of the relation's other subjects whose own answer
  still beats target_new, and the perplexity ratio on
  ``workers/edit/reference_sentences.txt``, each edit applied alone to the clean model.
  MEMIT batches report the same over their requests.

``--device cuda`` (or ``auto``) runs everything on a GPU: the run_edit timings, with peak GPU
memory, and a warm run_edit on the CPU in the same run as the baseline of their ratio; with
``--bf16-checkpoint`` the model is a bfloat16 copy of the checkpoint (as published models are
stored), so on the GPU it computes in bf16 (docs/editing.md, "On a GPU"). The quality
figures then come from the GPU's edits.

``--compare-layers`` runs the ROME quality loop three times on the same facts: ``layers:
auto`` (each fact's own causal trace, ``workers.edit.causal_trace``), the default (layer 1),
and the published layer scaled to the depth (Llama-2-7B's 5 of 32 → 5 of SmolLM2's 30, the
default before 2026-12-07), and prints them side by side.

Targets are printed, not asserted. Hyperparameters are the recipe defaults (``--rome-layer``,
``--edit-margin`` and ``--sufficient-loss`` change the layer and the scaling of the update
in the ROME quality run; ``edit_sweep.py`` compares them on held-out facts); nothing is
tuned on these facts. Results go to ``bench/.data/results-edit.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from schemas.edit_recipe import EditRecipe, EditRequest, parse_edit_recipe  # noqa: E402
from testbed.smollm2 import smollm2_checkpoint, write_text_corpus  # noqa: E402
from workers.devices import resolve_device  # noqa: E402
from workers.edit import LocalCovarianceCache, run_edit  # noqa: E402
from workers.edit.algebra import delta_from_factors, relative_norm  # noqa: E402
from workers.edit.architectures import default_mom2_update_weight, scaled_layer  # noqa: E402
from workers.edit.causal_trace import LocalTraceCache, TraceSettings, choose_layers  # noqa: E402
from workers.edit.covariance import covariances, sampled_corpus, text_corpus  # noqa: E402
from workers.edit.engine import load_model, model_revision  # noqa: E402
from workers.edit.memit import memit_edit  # noqa: E402
from workers.edit.methods import edit_method  # noqa: E402
from workers.edit.metrics import (  # noqa: E402
    Probe,
    evaluate,
    mean_log_probs,
    next_tokens,
    perplexity,
    reference_sentences,
)
from workers.edit.prompts import kept_prompts  # noqa: E402
from workers.edit.rome import rome_edit  # noqa: E402
from workers.edit.settings import EditSettings  # noqa: E402
from workers.edit.templates import context_templates  # noqa: E402
from workers.edit.update import EditContext  # noqa: E402
from workers.errors import InputError  # noqa: E402
from workers.sources import SourceSettings, resolve_reference  # noqa: E402

FACTS = Path(__file__).with_name("edit_facts.json")
PUBLISHED_ROME_LAYER = 5  # ROME on Llama-2-7B (EasyEdit): layer 5 of 32
DATA = Path(__file__).with_name(".data")
TARGETS = {
    "warm ROME edit (s)": 20.0,
    "efficacy": 0.95,
    "neighborhood": 0.90,
    "perplexity ratio": 1.05,
}
NEIGHBORS = 3


@dataclass(frozen=True)
class Fact:
    """A candidate edit. ``request.neighborhood_prompts`` are prompts about other subjects
    with the same true object (CounterFact's neighborhood: the edit must not move them from
    target_true to target_new); ``others`` are the relation's prompts for other subjects,
    with their own true objects (scored as "own answer kept")."""

    relation: str
    request: EditRequest
    others: tuple[tuple[str, str], ...]


def candidate_facts(more: bool = True) -> list[Fact]:
    """The candidate facts, as edits (see :func:`facts_as_edits`), in the benches' order: the
    100 facts of ``relations`` round-robin, then (``more``) those of ``more_relations``
    (appended for the 200 sequential edits) round-robin, so the first 100 stay the ones
    earlier figures used."""
    doc = json.loads(FACTS.read_text())
    first = round_robin(facts_as_edits(doc, doc["relations"]))
    if not more:
        return first
    return first + round_robin(facts_as_edits(doc, doc.get("more_relations", [])))


def facts_as_edits(doc: dict[str, Any], relations: list[dict[str, Any]]) -> list[Fact]:
    """The facts of ``relations`` with a counterfactual target (the true object of the next
    subject of the same relation whose object differs) and a neighborhood: up to NEIGHBORS
    prompts, from any relation or the neighbour pool of ``doc``, of other subjects with the
    same true object (the neighbours of ``more_relations`` before their facts; their objects
    are not those of ``relations``, so they change no neighborhood of the first 100)."""
    more = doc.get("more_relations", [])
    more_neighbours = [{"prompt": r["prompt"], "facts": r.get("neighbours", [])} for r in more]
    by_object: dict[str, list[tuple[str, str]]] = {}
    for rel in doc["relations"] + doc["neighbours"] + more_neighbours + more:
        for subject, obj in rel["facts"]:
            by_object.setdefault(obj, []).append((subject, rel["prompt"].format(subject)))
    out = []
    for rel in relations:
        facts = rel["facts"]
        for i, (subject, true) in enumerate(facts):
            others = facts[i + 1 :] + facts[:i]
            new = next(o for _, o in others if o != true)
            paraphrase = rel.get("paraphrase")
            request = EditRequest(
                prompt=rel["prompt"].format(subject),
                subject=subject,
                target_new=new,
                target_true=true,
                paraphrase_prompts=[paraphrase.format(subject)] if paraphrase else [],
                neighborhood_prompts=[p for s, p in by_object[true] if s != subject][:NEIGHBORS],
            )
            own = tuple((rel["prompt"].format(s), o) for s, o in others[:NEIGHBORS] if o != new)
            out.append(Fact(rel.get("name", rel["prompt"]), request, own))
    return out


def round_robin(facts: list[Fact]) -> list[Fact]:
    """The facts interleaved across relations (first of each relation, then the second of
    each, ...), so a sample of n facts is not n capitals."""
    groups: dict[str, list[Fact]] = {}
    for f in facts:
        groups.setdefault(f.relation, []).append(f)
    out: list[Fact] = []
    queues = list(groups.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def own_answer_pairs(fact: Fact) -> list[tuple[str, str]]:
    """(prompt, its own true object), (prompt, the edit's target_new) for each other
    subject of the relation."""
    return [(p, t) for p, true in fact.others for t in (true, fact.request.target_new)]


def prefers_first(model: Any, tok: Any, pairs: list[tuple[str, str]]) -> list[bool]:
    lp = mean_log_probs(model, tok, pairs) if pairs else []
    return [lp[i] > lp[i + 1] for i in range(0, len(lp), 2)]


def without_edited_neighbors(batch: list[EditRequest]) -> list[EditRequest]:
    """A MEMIT batch's requests without neighborhood prompts that another request of the
    batch edits (their answer is meant to change)."""
    edited = {r.prompt for r in batch}
    return [
        r.model_copy(
            update={"neighborhood_prompts": [p for p in r.neighborhood_prompts if p not in edited]}
        )
        for r in batch
    ]


def own_answer_kept(before: list[bool], after: list[bool]) -> float | None:
    """Of the prompts whose own answer beat target_new before the edit, the share where it
    still does."""
    kept = [a for b, a in zip(before, after, strict=True) if b]
    return sum(kept) / len(kept) if kept else None


def known(model: Any, tok: Any, requests: list[EditRequest]) -> list[bool]:
    pairs = [(r.prompt, t) for r in requests for t in (r.target_true or "", r.target_new)]
    lp = mean_log_probs(model, tok, pairs)
    return [lp[i] > lp[i + 1] for i in range(0, len(lp), 2)]


def pre_edit_probe(model: Any, tok: Any, requests: list[EditRequest], ppl: float) -> Probe:
    truths = [r.target_true or "" for r in requests]
    pairs = [
        (p, t)
        for r, true in zip(requests, truths, strict=True)
        for p in r.neighborhood_prompts
        for t in (true, r.target_new)
    ]
    lp = mean_log_probs(model, tok, pairs)
    kept = next_tokens(model, tok, kept_prompts(requests))
    return Probe(truths, [lp[i] > lp[i + 1] for i in range(0, len(lp), 2)], ppl, kept)


def recipe_for(model: Path, request: EditRequest, args: argparse.Namespace, **extra: Any) -> Any:
    data: dict[str, Any] = {
        "edit_method": "rome",
        "model": str(model),
        "requests": [request.model_dump(exclude_none=True)],
        **extra,
    }
    if args.quick:
        data["hyperparameters"] = {"context_template_counts": [[2, 5]], "v_num_grad_steps": 10}
        data["covariance"] = {"source": "text", "paths": [str(args.corpus)], "tokens": 2048}
    return parse_edit_recipe(data)


def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def main() -> int:
    DATA.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edit-bench-", dir=DATA))
    try:
        return run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the covariance cache of this run, the corpus


def run(work: Path) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (minutes)")
    p.add_argument("--facts", type=int, default=None, help="known facts to edit (default 50)")
    p.add_argument("--memit", default=None, help="MEMIT batch sizes (default 10,100)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--rome-layer",
        default=None,
        help="layer of the ROME quality sweep: an index, 'auto' (each fact's causal trace), "
        "'published' (5 of 32 scaled to the depth) or 'default' (the recipe default, layer 1)",
    )
    p.add_argument(
        "--compare-layers",
        action="store_true",
        help="the ROME quality sweep with layers auto, the default (1) and the published "
        "layer scaled to the depth (5), side by side",
    )
    p.add_argument(
        "--edit-margin",
        default=None,
        help="ROME's edit_margin in the quality sweep (default: the recipe default, 2; "
        "'none': the whole optimised update, as published)",
    )
    p.add_argument(
        "--sufficient-loss",
        default=None,
        help="ROME's sufficient_loss in the quality sweep (default: the recipe default; "
        "'none': the whole optimised update, as published)",
    )
    p.add_argument(
        "--memit-lambda",
        type=float,
        default=None,
        help="MEMIT λ (default: the recipe default, 15000 · d_in / 11008)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the edits compute: cpu, cuda[:N] or auto (on a GPU: peak GPU memory, and a "
        "warm CPU run_edit as the baseline)",
    )
    p.add_argument(
        "--bf16-checkpoint",
        action="store_true",
        help="edit a bfloat16 copy of the checkpoint (a GPU then loads and computes in bf16)",
    )
    p.add_argument("--out", type=Path, default=DATA / "results-edit.json")
    p.add_argument("--report", type=Path, help="only print the table of a results JSON")
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="covariance cache to use and keep (default: a fresh one, so the first edit is "
        "cold; with a filled cache the 'cold' figures are not cold)",
    )
    args = p.parse_args()
    if args.edit_margin not in (None, "none") and args.sufficient_loss not in (None, "none"):
        p.error("--edit-margin and --sufficient-loss both scale the update: give one")
    if args.report:
        report(json.loads(args.report.read_text()))
        return 0
    n_facts = args.facts if args.facts is not None else (3 if args.quick else 50)
    memit = args.memit if args.memit is not None else ("3" if args.quick else "10,100")
    sizes = [int(x) for x in memit.split(",") if x]
    try:
        device = resolve_device(args.device, field="--device")
    except InputError as e:
        p.error(str(e))
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.corpus = write_text_corpus(work / "corpus.txt")
    results: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if gpu else None,
    }

    ckpt = smollm2_checkpoint()
    if args.bf16_checkpoint:
        ckpt = bf16_copy(ckpt, work / "smollm2-bf16")
    results["checkpoint_dtype"] = "bfloat16" if args.bf16_checkpoint else "float32"
    candidates = candidate_facts(more=False)  # the 100 its figures have always used
    print(f"SmolLM2-135M at {ckpt}; torch threads {torch.get_num_threads()}; {device}", flush=True)

    # -- one ROME edit through run_edit: cold, then warm covariance cache ------------------
    # empty unless --cache-dir: the first edit builds C
    cache = LocalCovarianceCache(args.cache_dir or work / "covariance")
    traces = LocalTraceCache((args.cache_dir or work) / "trace")  # layers: auto
    results["cache_given"] = args.cache_dir is not None
    runs = {}
    for label, request in (("cold", candidates[0].request), ("warm", candidates[1].request)):
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        result = run_edit(
            recipe_for(ckpt, request, args),
            None,
            cache=cache,
            trace_cache=traces,
            device=str(device),
        )
        wall = time.perf_counter() - t
        runs[label] = {"wall_s": wall, **result.manifest["timings"]}
        runs[label]["compute"] = result.manifest["compute"]
        if gpu:
            runs[label]["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        print(f"ROME via run_edit, {label} covariance: {wall:.1f} s {runs[label]}", flush=True)
    if gpu:  # the baseline: the warm edit again, on the CPU (C and the trace are cached)
        t = time.perf_counter()
        result = run_edit(
            recipe_for(ckpt, candidates[1].request, args), None, cache=cache,
            trace_cache=traces, device="cpu",
        )  # fmt: skip
        wall = time.perf_counter() - t
        runs["warm_cpu"] = {"wall_s": wall, **result.manifest["timings"]}
        print(f"ROME via run_edit, warm, on the CPU: {wall:.1f} s {runs['warm_cpu']}", flush=True)
    results["rome_run_edit"] = runs
    save(args.out, results)
    cov_tokens = result.manifest["covariance"][0]["tokens_used"]

    # -- load once; templates and covariances as the recipe defaults make them -----------
    recipe: EditRecipe = recipe_for(ckpt, candidates[0].request, args)
    resolved = resolve_reference(recipe.model, SourceSettings())
    target = load_model(resolved, "smollm2", device=device)
    model, tok, arch = target.model, target.tokenizer, target.arch
    depth = target.depth
    # one settings object for both methods' runs (ROME's v* settings, as the recipe has them)
    rome = edit_method("rome")
    default_rome_layer = rome.default_layers(depth)[0]
    settings = EditSettings.from_recipe(recipe, target, rome, [default_rome_layer])
    h = recipe.hyperparameters
    templates = context_templates(model, tok, h.context_template_counts, recipe.seed)
    modes = (
        ["auto", "default", "published"] if args.compare_layers else [args.rome_layer or "default"]
    )
    for mode in modes:
        if mode not in ("auto", "default", "published") and not mode.isdigit():
            p.error(
                f"--rome-layer: {mode!r} is not a layer index, 'auto', 'default' or 'published'"
            )
    rome_layer: int | str = mode_layer(modes[0], default_rome_layer, depth)
    results["rome_layer"] = rome_layer
    results["rome_layer_modes"] = modes
    sufficient = h.sufficient_loss
    if args.sufficient_loss is not None:
        sufficient = None if args.sufficient_loss == "none" else float(args.sufficient_loss)
    results["rome_sufficient_loss"] = sufficient
    margin = None if sufficient is not None else h.edit_margin
    if args.edit_margin is not None:
        margin = None if args.edit_margin == "none" else float(args.edit_margin)
    results["rome_edit_margin"] = margin
    results["rome_edit_margin_default"] = h.edit_margin
    results["rome_sufficient_loss_default"] = h.sufficient_loss
    results["rome_layer_default"] = default_rome_layer
    memit_layers = edit_method("memit").default_layers(depth)
    d_in = model.get_submodule(arch.module_name(memit_layers[0])).weight.shape[1]
    lam = args.memit_lambda or h.mom2_update_weight or default_mom2_update_weight(d_in)
    results["memit_lambda"] = lam
    # -- which facts the model knows ---------------------------------------------------------
    flags = known(model, tok, [f.request for f in candidates])
    # ROME quality: facts the model knows that have a neighborhood (other subjects with the
    # same true object)
    facts = [
        f for f, k in zip(candidates, flags, strict=True) if k and f.request.neighborhood_prompts
    ]
    per_relation = {
        rel: sum(f.relation == rel for f in facts[:n_facts]) for rel in {f.relation for f in facts}
    }
    print(
        f"{sum(flags)} of {len(candidates)} candidate facts known, {len(facts)} of them with "
        f"a neighborhood; edited per relation: {per_relation}",
        flush=True,
    )
    results["facts_per_relation"] = per_relation
    results["facts_known"] = sum(flags)
    results["facts_known_with_neighborhood"] = len(facts)
    results["facts_candidates"] = len(candidates)
    # -- layers: auto: each fact's causal trace chooses its layer --------------------------
    revision = model_revision(resolved)
    chosen: dict[str, int] = {}
    if "auto" in modes:
        trace_settings = TraceSettings(h.trace_samples, h.trace_noise, recipe.seed)
        t = time.perf_counter()
        for fact in facts[:n_facts]:
            choice = choose_layers(
                target, [fact.request], trace_settings, rome.layers_at,
                model_revision=revision, cache=traces,
            )  # fmt: skip
            chosen[fact.request.prompt] = choice.layers[0]
            print(f"trace {fact.request.prompt!r}: layer {choice.peak} {choice.cache}", flush=True)
        results["trace_s"] = time.perf_counter() - t
        results["auto_layers"] = chosen
    fixed = {int(mode_layer(m, default_rome_layer, depth)) for m in modes if m != "auto"}
    rome_layers = sorted({default_rome_layer, *fixed, *chosen.values()})

    cov = recipe.covariance
    corpus = (
        sampled_corpus(model, tok, seed=cov.seed, max_length=cov.max_length, sampler=revision)
        if cov.source == "model_samples"
        else text_corpus(tok, [args.corpus], max_length=cov.max_length)
    )
    tokens = cov.tokens or cov_tokens
    t = time.perf_counter()
    C, records = covariances(
        model, arch, sorted({*rome_layers, *memit_layers}), corpus, tokens,
        model_revision=revision, cache=cache,
    )  # fmt: skip
    memit_cov_s = time.perf_counter() - t
    built = [r["key"]["layer"] for r in records if r["cache"] == "miss"]
    results["covariance"] = {
        "tokens": tokens,
        "source": cov.source,
        "rome_layer": default_rome_layer,
        "rome_layer_build_s": runs["cold"]["covariance_s"],
        "memit_layers": memit_layers,
        "memit_extra_layers_built": built,
        "memit_extra_build_s": memit_cov_s,
    }
    print(f"covariance: {results['covariance']}", flush=True)
    save(args.out, results)

    ppl0 = perplexity(model, tok, reference_sentences())

    # -- ROME, one fact at a time on the clean model ------------------------------------
    context = EditContext(templates, C)
    by_mode = {}
    for mode in modes:
        layer_of = {
            f.request.prompt: chosen[f.request.prompt]
            if mode == "auto"
            else int(mode_layer(mode, default_rome_layer, depth))
            for f in facts[:n_facts]
        }
        print(f"ROME quality, layers {mode}", flush=True)
        rows = rome_quality(
            target, facts[:n_facts], layer_of, settings, context, sufficient, margin, ppl0
        )
        by_mode[mode] = rows
        results["rome_modes"] = by_mode
        save(args.out, results)
    results["rome"] = by_mode[modes[0]]
    save(args.out, results)

    # -- MEMIT batches -----------------------------------------------------------------------
    # MEMIT batches: every candidate, the known ones first
    pool = [f for k in (True, False) for f, x in zip(candidates, flags, strict=True) if x is k]
    originals = {
        layer: model.get_submodule(arch.module_name(layer)).weight.detach().clone()
        for layer in memit_layers
    }
    memit_settings = dataclasses.replace(
        settings, layers=tuple(memit_layers), mom2_update_weight=lam
    )
    memit = []
    for size in sizes:
        if size > len(pool):
            print(f"MEMIT {size}: only {len(pool)} requests available; skipped", flush=True)
            continue
        batch = without_edited_neighbors([f.request for f in pool[:size]])
        probe = pre_edit_probe(model, tok, batch, ppl0)
        own_pairs = [pair for f in pool[:size] for pair in own_answer_pairs(f)]
        own_before = prefers_first(model, tok, own_pairs)
        t = time.perf_counter()
        memit_edit(target, batch, memit_settings, context)
        seconds = time.perf_counter() - t
        m = evaluate(model, tok, batch, probe)
        m["neighborhood_own_answer"] = own_answer_kept(
            own_before, prefers_first(model, tok, own_pairs)
        )
        with torch.no_grad():
            for layer, w in originals.items():
                model.get_submodule(arch.module_name(layer)).weight.copy_(w)
        entry = {"size": size, "seconds": seconds, **{k: m[k] for k in (
            "efficacy", "paraphrase", "neighborhood", "neighborhood_own_answer",
            "perplexity_ratio")}}  # fmt: skip
        memit.append(entry)
        print(f"MEMIT {size}: {entry}", flush=True)
        results["memit"] = memit
        save(args.out, results)
    results["memit"] = memit

    save(args.out, results)
    report(results)
    return 0


def bf16_copy(ckpt: Path, out: Path) -> Path:
    """The checkpoint with its weights stored in bfloat16 (and its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(ckpt)).save_pretrained(str(out))
    return out


def mode_layer(mode: str, default: int, depth: int) -> int | str:
    """The layer of a --rome-layer mode: an index, the default's, the published one scaled
    to the depth, or "auto"."""
    if mode == "published":
        return scaled_layer(PUBLISHED_ROME_LAYER, depth)
    return default if mode == "default" else mode if mode == "auto" else int(mode)


def rome_quality(
    target: Any,
    facts: list[Fact],
    layer_of: dict[str, int],
    settings: EditSettings,
    context: EditContext,
    sufficient: float | None,
    margin: float | None,
    ppl0: float,
) -> list[dict[str, Any]]:
    """Each fact edited alone on the clean model at ``layer_of[prompt]``, measured, undone."""
    model, tok, arch = target.model, target.tokenizer, target.arch
    rows = []
    for i, fact in enumerate(facts):
        req = fact.request
        layer = layer_of[req.prompt]
        rome_settings = dataclasses.replace(
            settings, layers=(layer,), sufficient_loss=sufficient, edit_margin=margin
        )
        module = model.get_submodule(arch.module_name(layer))
        W0 = module.weight.detach().clone()
        probe = pre_edit_probe(model, tok, [req], ppl0)
        own_pairs = own_answer_pairs(fact)
        own_before = prefers_first(model, tok, own_pairs)
        t = time.perf_counter()
        u = rome_edit(target, req, rome_settings, context)
        delta = delta_from_factors(u.left, u.right)
        target.apply(layer, delta)
        seconds = time.perf_counter() - t
        m = evaluate(model, tok, [req], probe)
        own = own_answer_kept(own_before, prefers_first(model, tok, own_pairs))
        with torch.no_grad():
            module.weight.copy_(W0)
        row = {
            "relation": fact.relation,
            "prompt": req.prompt,
            "target_new": req.target_new,
            "layer": layer,
            "seconds": seconds,
            "steps": u.steps,
            "scale": u.scale,
            "efficacy": m["efficacy"],
            "paraphrase": m["paraphrase"],
            "neighborhood": m["neighborhood"],
            "neighborhood_own_answer": own,
            "perplexity_ratio": m["perplexity_ratio"],
            "relative_update_norm": relative_norm(delta, W0),
        }
        rows.append(row)
        print(
            f"[{i + 1}/{len(facts)}] {req.prompt!r} -> {req.target_new!r} at layer {layer}: "
            f"{seconds:.1f} s, {u.steps} steps, eff {m['efficacy']:.0f}, para "
            f"{m['paraphrase']:.0f}, neigh {m['neighborhood']:.2f} (own answer {fmt(own, 2)}), "
            f"ppl× {m['perplexity_ratio']:.4f}",
            flush=True,
        )
    return rows


def save(path: Path, results: dict[str, Any]) -> None:
    """After each stage, so an interrupted run keeps what it measured."""
    path.write_text(json.dumps(results, indent=2) + "\n")


def report(r: dict[str, Any]) -> None:
    rows = r.get("rome", [])

    def mean(k: str) -> float | None:
        values = [x[k] for x in rows if x.get(k) is not None]
        return statistics.fmean(values) if values else None

    secs = [x["seconds"] for x in rows]
    cov = r.get("covariance", {})
    warm = r["rome_run_edit"]["warm"]
    cold = r["rome_run_edit"]["cold"]
    print()
    where = r.get("gpu_name") or "CPU"
    print(f"## Edit bench (SmolLM2-135M, {where}, {r['threads']} torch threads)" +
          (" — QUICK" if r["quick"] else ""))  # fmt: skip
    print()
    print("| figure | value | target |")
    print("|---|---|---|")
    line = "| {} | {} | {} |"
    if cov and r.get("cache_given"):
        print(line.format("covariance build", "not measured: read from --cache-dir", ""))
    elif cov:
        what = f"layer {cov['rome_layer']}, {cov['tokens']} tokens ({cov['source']})"
        print(line.format(f"covariance build, {what} (s)", fmt(cov["rome_layer_build_s"], 1), ""))
        more = f"+ layers {cov['memit_extra_layers_built']} in one pass"
        print(line.format(f"covariance build, {more} (s)", fmt(cov["memit_extra_build_s"], 1), ""))
    first = "first edit, C from --cache-dir (not cold)" if r.get("cache_given") else "cold C"
    print(line.format(f"ROME run_edit, {first}: whole call (s)", fmt(cold["wall_s"], 1), ""))
    print(line.format("ROME run_edit, warm covariance: whole call (s)", fmt(warm["wall_s"], 1), ""))
    if "compute" in warm:
        c = warm["compute"]
        print(line.format("ROME run_edit computed on", f"{c['device']}, {c['dtype']}", ""))
    for label, run in (("first", cold), ("warm", warm)):
        if "peak_gpu_bytes" in run:
            peak = run["peak_gpu_bytes"] / 2**30
            print(line.format(f"ROME run_edit, {label}: peak GPU memory (GiB)", fmt(peak, 2), ""))
    cpu = r["rome_run_edit"].get("warm_cpu")
    if cpu:
        print(line.format("ROME run_edit, warm, same edit on the CPU (s)", fmt(cpu["wall_s"], 1),
                          ""))  # fmt: skip
        print(line.format("ROME run_edit, warm: CPU / GPU time", fmt(cpu["wall_s"] / warm["wall_s"],
                          1), ""))  # fmt: skip
    edit_only = warm["templates_s"] + warm["covariance_s"] + warm["edit_s"]
    if "trace_s" in warm:  # layers: auto (the default)
        edit_only += warm["trace_s"]
    print(line.format("ROME run_edit, warm: (trace +) templates + C lookup + update (s)",
                      fmt(edit_only, 1), f"≤ {TARGETS['warm ROME edit (s)']}"))  # fmt: skip
    if secs:
        print(line.format(f"ROME update, warm, median of {len(secs)} (s)",
                          fmt(statistics.median(secs), 1),
                          f"≤ {TARGETS['warm ROME edit (s)']}"))  # fmt: skip
    if r.get("memit"):
        print(line.format("MEMIT λ", fmt(r.get("memit_lambda"), 0), ""))
    for m in r.get("memit", []):
        print(line.format(f"MEMIT batch of {m['size']}: update (s)", fmt(m["seconds"], 1), ""))
    known = f"{r['facts_known']} / {r['facts_candidates']}"
    if "facts_known_with_neighborhood" in r:
        known += f" ({r['facts_known_with_neighborhood']} with a neighborhood)"
    print(line.format("facts known / candidates", known, ""))
    if "facts_per_relation" in r:
        print(line.format("ROME facts per relation", r["facts_per_relation"], ""))
    layer = r.get("rome_layer")
    if layer is not None and layer != r.get("rome_layer_default"):
        print(line.format("ROME sweep layer (not the default)", layer, ""))
    for key, name in (("rome_edit_margin", "edit_margin"), ("rome_sufficient_loss",
                                                             "sufficient_loss")):  # fmt: skip
        if key in r:
            x = r[key]
            what = f"ROME {name}" + ("" if x == r.get(f"{key}_default") else " (not the default)")
            print(line.format(what, "none" if x is None else x, ""))
    if rows and any(x.get("scale", 1.0) != 1.0 for x in rows):
        print(line.format("ROME update scale, mean", fmt(mean("scale"), 2), ""))
    print(line.format(f"ROME efficacy ({len(rows)} facts, layer {layer})", fmt(mean("efficacy")),
                      f"≥ {TARGETS['efficacy']}"))  # fmt: skip
    print(line.format("ROME paraphrase", fmt(mean("paraphrase")), ""))
    print(line.format("ROME neighborhood (same-object subjects: true still beats new)",
                      fmt(mean("neighborhood")),
                      f"≥ {TARGETS['neighborhood']}"))  # fmt: skip
    print(line.format("ROME other subjects of the relation: own answer still beats new",
                      fmt(mean("neighborhood_own_answer")), ""))  # fmt: skip
    print(line.format("ROME mean perplexity ratio", fmt(mean("perplexity_ratio"), 4),
                      f"≤ {TARGETS['perplexity ratio']}"))  # fmt: skip
    modes = r.get("rome_modes", {})
    if len(modes) > 1:
        print()
        print("| ROME layers | layers used | efficacy | paraphrase | neighborhood | own answer "
              "| mean ppl× | update median (s) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for mode, mrows in modes.items():

            def avg(k: str, mrows: list[dict[str, Any]] = mrows) -> float | None:
                v = [x[k] for x in mrows if x.get(k) is not None]
                return statistics.fmean(v) if v else None

            used = Counter(x["layer"] for x in mrows)
            used_s = ", ".join(f"{k}×{n}" for k, n in sorted(used.items()))
            print(f"| {mode} | {used_s} | {fmt(avg('efficacy'))} | {fmt(avg('paraphrase'))} | "
                  f"{fmt(avg('neighborhood'))} | {fmt(avg('neighborhood_own_answer'))} | "
                  f"{fmt(avg('perplexity_ratio'), 4)} | "
                  f"{fmt(statistics.median(x['seconds'] for x in mrows), 1)} |")  # fmt: skip
        print()
    for m in r.get("memit", []):
        quality = (
            f"{fmt(m['efficacy'])} / {fmt(m['paraphrase'])} / "
            f"{fmt(m['neighborhood'])} / {fmt(m.get('neighborhood_own_answer'))} / "
            f"{fmt(m['perplexity_ratio'], 4)}"
        )
        label = f"MEMIT {m['size']}: efficacy / paraphrase / neighborhood / own answer / ppl×"
        print(line.format(label, quality, ""))


if __name__ == "__main__":
    raise SystemExit(main())
