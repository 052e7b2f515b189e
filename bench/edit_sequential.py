"""Sequential (lifelong) editing on SmolLM2-135M-Instruct (CPU): AlphaEdit against MEMIT.

    python bench/edit_sequential.py --quick               # 40 edits in batches of 10
    python bench/edit_sequential.py --quick --edits 200 --batch 10 --threads 1

N requests from ``bench/edit_facts.json`` (the facts the model knows first, in the order of
``candidate_facts``: the first 100 candidates round-robin over their 5 relations, then the
176 appended ones round-robin over theirs; SmolLM2 knows 236 of the 276) are edited in
batches of B, one batch after the other on the same model, with MEMIT and with AlphaEdit
under the same protocol: the same requests in the same order, the same layers (the MEMIT
band scaled to the depth), templates, covariances and v* settings. AlphaEdit's Kₚ is the
edit history of the batches before (``workers.edit.history``, as an edited artifact carries
it).

After each batch the metrics are taken over every request edited so far, against the
clean model's probe: efficacy, paraphrase, neighborhood (share of other subjects' prompts
whose preference between target_true and target_new is unchanged) and the perplexity ratio
on ``workers/edit/reference_sentences.txt``. Figures are printed, not asserted; results go
to ``bench/.data/results-edit-sequential.json``.

``--quick``: 2 context templates of 5 tokens, 10 v* steps, a 2,048-token text covariance
(the recipe defaults: 20 templates, 25 steps, 10 × d_in tokens sampled from the model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.edit_bench import (  # noqa: E402
    candidate_facts,
    known,
    pre_edit_probe,
    without_edited_neighbors,
)
from schemas.edit_recipe import EditRequest, parse_edit_recipe  # noqa: E402
from testbed.smollm2 import smollm2_checkpoint, write_text_corpus  # noqa: E402
from workers.edit import LocalCovarianceCache  # noqa: E402
from workers.edit.covariance import covariances, sampled_corpus, text_corpus  # noqa: E402
from workers.edit.engine import load_model, model_revision  # noqa: E402
from workers.edit.history import EditHistory  # noqa: E402
from workers.edit.methods import edit_method  # noqa: E402
from workers.edit.metrics import Probe, evaluate, perplexity, reference_sentences  # noqa: E402
from workers.edit.settings import EditSettings  # noqa: E402
from workers.edit.templates import context_templates  # noqa: E402
from workers.edit.update import EditContext  # noqa: E402
from workers.sources import SourceSettings, resolve_reference  # noqa: E402

DATA = Path(__file__).with_name(".data")
METRICS = ("efficacy", "paraphrase", "neighborhood", "perplexity_ratio")


def joined(probes: list[Probe]) -> Probe:
    """The probe of the union of the batches' requests (their lists concatenated)."""
    return Probe(
        [t for p in probes for t in p.targets_true],
        [x for p in probes for x in p.neighborhood_prefers_true],
        probes[0].perplexity,
        [x for p in probes for x in p.keep_next_tokens],
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="40 edits, quick settings")
    p.add_argument("--edits", type=int, default=None, help="requests in all (default 100)")
    p.add_argument("--batch", type=int, default=10, help="requests per batch (default 10)")
    p.add_argument("--methods", default="memit,alphaedit")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DATA / "results-edit-sequential.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    DATA.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edit-seq-", dir=DATA))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    n = args.edits or (40 if args.quick else 100)
    corpus_file = write_text_corpus(work / "corpus.txt")
    ckpt = smollm2_checkpoint()
    data: dict[str, Any] = {"edit_method": "alphaedit", "model": str(ckpt), "requests": []}
    if args.quick:
        data["hyperparameters"] = {"context_template_counts": [[2, 5]], "v_num_grad_steps": 10}
        data["covariance"] = {"source": "text", "paths": [str(corpus_file)], "tokens": 2048}
    candidates = candidate_facts()
    data["requests"] = [candidates[0].request.model_dump(exclude_none=True)]
    recipe = parse_edit_recipe(data)
    resolved = resolve_reference(recipe.model, SourceSettings())
    target = load_model(resolved, "smollm2")
    model, tok, arch = target.model, target.tokenizer, target.arch
    alphaedit = edit_method("alphaedit")
    layers = alphaedit.default_layers(target.depth)
    settings = EditSettings.from_recipe(recipe, target, alphaedit, layers)
    h, cov = recipe.hyperparameters, recipe.covariance
    templates = context_templates(model, tok, h.context_template_counts, recipe.seed)

    flags = known(model, tok, [f.request for f in candidates])
    pool = [
        f.request for k in (True, False) for f, x in zip(candidates, flags, strict=True) if x is k
    ]
    requests: list[EditRequest] = without_edited_neighbors(pool[:n])
    print(
        f"SmolLM2 at {ckpt}; threads {torch.get_num_threads()}; {len(requests)} edits "
        f"({min(len(requests), sum(flags))} known before) in batches of {args.batch}; layers "
        f"{layers}",
        flush=True,
    )
    corpus = (
        sampled_corpus(model, tok, seed=cov.seed, max_length=cov.max_length)
        if cov.source == "model_samples"
        else text_corpus(tok, [corpus_file], max_length=cov.max_length)
    )
    t = time.perf_counter()
    C, _ = covariances(
        model, arch, layers, corpus, cov.tokens or 10 * target.key_width(layers[0]),
        model_revision=model_revision(resolved), cache=LocalCovarianceCache(work / "cov"),
    )  # fmt: skip
    results: dict[str, Any] = {
        "edits": len(requests),
        "batch": args.batch,
        "quick": args.quick,
        "layers": layers,
        "threads": torch.get_num_threads(),
        "known_before": min(len(requests), sum(flags)),
        "covariance_s": time.perf_counter() - t,
        "nullspace_threshold": h.nullspace_threshold,
        "alphaedit_l2": h.alphaedit_l2,
        "mom2_update_weight": settings.mom2_update_weight,
        "runs": {},
    }
    ppl0 = perplexity(model, tok, reference_sentences())
    batches = [requests[i : i + args.batch] for i in range(0, len(requests), args.batch)]
    probes = [pre_edit_probe(model, tok, b, ppl0) for b in batches]
    originals = {layer: target.weight(layer).detach().clone() for layer in layers}

    for name in args.methods.split(","):
        method = edit_method(name)
        history = EditHistory.empty()
        rows = []
        started = time.perf_counter()
        for i, batch in enumerate(batches):
            context = EditContext(templates, C, history)
            t = time.perf_counter()
            updates = method.update(
                target, batch, settings, context, targets_true=probes[i].targets_true
            )
            seconds = time.perf_counter() - t
            history = history.extended(name, batch, updates)
            done = [r for b in batches[: i + 1] for r in b]
            m = evaluate(model, tok, done, joined(probes[: i + 1]))
            row = {"edits": len(done), "seconds": seconds, **{k: m[k] for k in METRICS}}
            row["notes"] = dict(context.notes)
            rows.append(row)
            print(f"{name} after {len(done)}: " + fmt_row(row), flush=True)
            results["runs"][name] = rows
            save(args.out, results)
        results["runs"][name] = rows
        results[f"{name}_total_s"] = time.perf_counter() - started
        with torch.no_grad():
            for layer, w in originals.items():
                target.weight(layer).copy_(w)
    save(args.out, results)
    report(results)
    return 0


def fmt_row(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {row[k]:.3f}" if isinstance(row[k], float) else f"{k} {row[k]}"
        for k in ("seconds", *METRICS)
    )


def save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))


def report(r: dict[str, Any]) -> None:
    print(f"\n{r['edits']} edits in batches of {r['batch']} (quick: {r['quick']})")
    print("| edits | method | efficacy | paraphrase | neighborhood | perplexity ratio |")
    print("|---|---|---|---|---|---|")
    runs = r["runs"]
    for i in range(max(len(rows) for rows in runs.values())):
        for name, rows in runs.items():
            if i < len(rows):
                row = rows[i]
                cells = " | ".join(f"{row[k]:.3f}" for k in METRICS)
                print(f"| {row['edits']} | {name} | {cells} |")


if __name__ == "__main__":
    raise SystemExit(main())
