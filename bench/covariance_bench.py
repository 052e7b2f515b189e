"""The default covariance (``source: model_samples``) of one SmolLM2-135M layer, CPU.

    python bench/covariance_bench.py                  # new path at 10 × d_in, old vs new at 4096
    python bench/covariance_bench.py --threads 1      # torch threads (default: torch's own)
    python bench/covariance_bench.py --old-tokens 0   # skip the old path

Figures (printed, and written to ``bench/.data/results-covariance.json``):

- **new**: ``sample_with_statistics`` (KV-cached sampling, 64 rows at once, the layer's
  keys counted into C on the fly) at ``--tokens`` (default 10 × d_in = 15,360): wall and
  process CPU seconds, tokens/s; then the statistics-only pass over the kept samples (what
  a C of another layer costs once the samples are kept);
- **old**: the previous implementation, rebuilt here as the baseline: HF ``generate``
  (top-k 50) in batches of 16 rows, then a second forward pass over the samples for the
  statistics, at ``--old-tokens`` (default 4,096 = one batch of 16 × 256), with the new
  path at the same token count in the same run for the ratio;
- a per-op profile (``--profile``) of a few decode steps of each.

Load average is printed before and after: on a shared machine wall time is noisy, the
process CPU time less so, and only ratios measured in the same run mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from schemas.references import parse_reference  # noqa: E402
from testbed.smollm2 import smollm2_checkpoint  # noqa: E402
from workers.edit.architectures import scaled_layer  # noqa: E402
from workers.edit.covariance import (  # noqa: E402
    SAMPLING_TOP_K,
    Corpus,
    SampleKey,
    accumulate_covariance,
    sample_with_statistics,
    sampled_corpus,
    samples_corpus,
)
from workers.edit.engine import load_model  # noqa: E402
from workers.edit.prompts import pad_id  # noqa: E402
from workers.sources import SourceSettings, resolve_reference  # noqa: E402

DATA = Path(__file__).with_name(".data")


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def figures(self, tokens: int) -> dict[str, float]:
        return {
            "wall_s": round(self.wall, 2),
            "cpu_s": round(self.cpu, 2),
            "tokens_per_s": round(tokens / self.wall, 1),
        }


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def old_sampled_batches(model: Any, tok: Any, seed: int, max_length: int, rows: int) -> Any:
    """The previous model_samples/v1 corpus: HF generate, 16 rows per call, seed + batch."""
    from workers.edit.covariance import _single_token_starts

    starts = _single_token_starts(tok)
    for g in range(-(-rows // 16)):
        ids = torch.tensor([starts[(g * 16 + i) % len(starts)] for i in range(16)]).unsqueeze(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + g)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=SAMPLING_TOP_K,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=max_length - 1,
                min_new_tokens=max_length - 1,
                pad_token_id=pad_id(tok),
            )
        yield out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=None, help="default 10 × d_in")
    p.add_argument("--old-tokens", type=int, default=4096, help="0 skips the old path")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--layer", type=int, default=None, help="default ROME's scaled layer")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", type=Path, default=DATA / "results-covariance.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = smollm2_checkpoint()
    target = load_model(resolve_reference(parse_reference(str(ckpt)), SourceSettings()), "smollm2")
    model, tok, arch = target.model, target.tokenizer, target.arch
    layer = args.layer if args.layer is not None else scaled_layer(5, target.depth)
    tokens = args.tokens or 10 * target.key_width(layer)
    T = args.max_length
    results: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "layer": layer,
        "tokens": tokens,
        "max_length": T,
        "load_before": load(),
    }
    print(f"SmolLM2-135M layer {layer}, threads {torch.get_num_threads()}, load {load()}")
    corpus = sampled_corpus(model, tok, seed=0, max_length=T, sampler="bench")

    with Clock() as c:
        ids, _, n = sample_with_statistics(corpus, arch, [layer], tokens)
    results["new"] = {"sampling_with_statistics": c.figures(n), "load": load()}
    print(f"new, {n} tokens: sampling + statistics {c.figures(n)}, load {load()}", flush=True)
    kept = samples_corpus(ids, corpus.spec, 0, SampleKey("bench", corpus.spec, tokens))
    with Clock() as c:
        accumulate_covariance(model, arch, [layer], kept, tokens)
    results["new"]["statistics_of_kept_samples"] = c.figures(tokens)
    print(f"new, statistics only over the kept samples: {c.figures(tokens)}", flush=True)

    if args.old_tokens:
        rows = -(-args.old_tokens // T)
        with Clock() as c_new:
            sample_with_statistics(corpus, arch, [layer], args.old_tokens)
        with Clock() as c_sample:
            old = list(old_sampled_batches(model, tok, 0, T, rows))
        old_corpus = Corpus("old", "old", lambda: ((b, torch.ones_like(b)) for b in old))
        with Clock() as c_stats:
            accumulate_covariance(model, arch, [layer], old_corpus, args.old_tokens)
        old_wall = c_sample.wall + c_stats.wall
        results["at_old_tokens"] = {
            "tokens": args.old_tokens,
            "new": c_new.figures(args.old_tokens),
            "old_sampling": c_sample.figures(args.old_tokens),
            "old_statistics": c_stats.figures(args.old_tokens),
            "old_over_new_wall": round(old_wall / c_new.wall, 2),
            "old_over_new_cpu": round((c_sample.cpu + c_stats.cpu) / c_new.cpu, 2),
            "load": load(),
        }
        print(f"at {args.old_tokens} tokens: {results['at_old_tokens']}", flush=True)
    if args.profile:
        results["profile"] = profile(corpus, arch, layer, model)
    results["load_after"] = load()
    print(f"load after: {load()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def profile(corpus: Any, arch: Any, layer: int, model: Any) -> str:
    """The top ops of sampling 64 rows × 32 tokens (new path)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    short = sampled_corpus(model, corpus.tokenizer, seed=0, max_length=32, sampler="bench")
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        sample_with_statistics(short, arch, [layer], 64 * 32)
    table: str = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    print(table)
    return table


if __name__ == "__main__":
    main()
