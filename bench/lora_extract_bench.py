#!/usr/bin/env python3
"""LoRA extraction benchmark: time, peak memory and reconstruction error vs rank, exact vs
randomized SVD, on the synthetic Llama family of bench/merge_bench.py.

    . .venv/bin/activate
    python bench/lora_extract_bench.py                        # 0.1 GB fp16, ranks 8,16,64,256
    python bench/lora_extract_bench.py --size-gb 0.3 --ranks 16,64

What it does:

1. builds (in child processes, cached under ``bench/.data/lora/``) a base with merge_bench's
   layout and weights (``choose_shape``/``tensor_specs``/``STD``) and two fine-tunes, fp16:
   ``structured``: every decoder linear weight + ΔW with a decaying spectrum (σᵢ ∝ 1/(1+i/8)
   over 256 random directions) plus 5 % (of ‖ΔW‖) full-rank noise, the shape of real
   fine-tune deltas; ``noise``: merge_bench's own fine-tune (N(0, 0.01·std) everywhere, full
   rank and flat: the worst case for a low-rank adapter);
2. for each fine-tune, rank and SVD method (``exact`` = torch.linalg.svd, ``randomized`` =
   our seeded randomized subspace iteration, 4 power iterations) runs
   ``run_extract_lora`` in a child process and measures its wall time and peak RSS
   (``os.wait4``);
3. prints, per row: wall s, wall relative to the exact SVD at the same rank (same run), peak RSS,
   mean and max relative error ‖ΔW − BA‖/‖ΔW‖ over the modules, the error the float64 SVD
   truncation would give (Eckart–Young, computed from the exact run's kept energy: the floor
   any rank-k adapter has), and the adapter's size; writes them as JSON to
   ``bench/.data/results-lora-extract.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import merge_bench as mb  # noqa: E402  (the same synthetic Llama layout and weights)

STRUCTURED_DIRECTIONS = 256
NOISE_SHARE = 0.05
DELTA_REL = 0.01  # ‖ΔW‖ / ‖W‖ of the structured fine-tune, as merge_bench's noise


def build(out: Path, shape: mb.Shape, kind: str, seed: int) -> None:
    """The base (kind "base") or a fine-tune of it, one safetensors file, fp16."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, dims, tkind in mb.tensor_specs(shape):
        g = torch.Generator().manual_seed(mb._seed(seed, "base", name))
        w = torch.randn(dims, generator=g).mul_(mb.STD[tkind])
        if tkind == "norm":
            w.add_(1.0)
        if kind == "noise":
            rms = mb.STD[tkind] if tkind != "norm" else 1.0
            g = torch.Generator().manual_seed(mb._seed(seed, "ft", 1, name))
            w.add_(torch.randn(dims, generator=g).mul_(mb.DELTA_REL * rms))
        elif kind == "structured" and tkind == "linear":
            w.add_(structured_delta(dims, name, seed, float(w.norm())))
        tensors[name] = w.to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(mb.llama_config(shape), indent=2) + "\n")
    tmp.rename(out)


def structured_delta(dims: tuple[int, ...], name: str, seed: int, w_norm: float) -> Any:
    import torch

    m, n = dims
    g = torch.Generator().manual_seed(mb._seed(seed, "structured", name))
    k = min(STRUCTURED_DIRECTIONS, m, n)
    sigma = 1.0 / (1.0 + torch.arange(k, dtype=torch.float32) / 8)
    left = torch.randn(m, k, generator=g) / math.sqrt(m)
    right = torch.randn(k, n, generator=g) / math.sqrt(n)
    low = (left * sigma) @ right
    noise = torch.randn(m, n, generator=g)
    delta = low / low.norm() + noise * (NOISE_SHARE / noise.norm())
    return delta * (DELTA_REL * w_norm / float(delta.norm()))


def child(spec_path: str) -> int:
    """One extraction, in this (child) process; its result as JSON next to the spec."""
    import torch

    from schemas.lora_recipe import parse_extract_lora_recipe
    from workers.extract import run_extract_lora
    from workers.sources import SourceSettings

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    spec = json.loads(Path(spec_path).read_text())
    recipe = parse_extract_lora_recipe(spec["recipe"])
    t0 = time.perf_counter()
    result = run_extract_lora(
        recipe, Path(spec["out"]), sources=SourceSettings(allow_local=True, hub_token=False)
    )
    wall = time.perf_counter() - t0
    modules = result.metrics["modules"]
    out = {
        "wall_s": wall,
        "timings": result.manifest["timings"],
        "summary": result.metrics["summary"],
        "kept_energy": {m: v["kept_energy"] for m, v in modules.items()},
        "errors": {m: v["relative_error"] for m, v in modules.items()},
        "adapter_mib": (Path(spec["out"]) / "adapter_model.safetensors").stat().st_size / 2**20,
    }
    Path(spec["result"]).write_text(json.dumps(out))
    return 0


def run_child(spec: dict[str, Any], work: Path) -> tuple[dict[str, Any], float, float]:
    spec_path = work / f"{spec['key']}.json"
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {spec['key']} failed")
    return json.loads(Path(spec["result"]).read_text()), wall, usage.ru_maxrss / 1024


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=0.1)
    ap.add_argument("--ranks", default="8,16,64,256")
    ap.add_argument("--finetunes", default="structured,noise")
    ap.add_argument("--data-dir", type=Path, default=HERE / ".data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.build:
        build(Path(args.build[1]), mb.choose_shape(args.size_gb), args.build[0], args.seed)
        return 0

    import shutil

    shape = mb.choose_shape(args.size_gb)
    root = args.data_dir / "lora" / f"{args.size_gb:g}gb-seed{args.seed}"
    models = {k: root / k for k in ("base", *args.finetunes.split(","))}
    for kind, path in models.items():  # in children: the parent stays lean (ru_maxrss)
        if not path.is_dir():
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--size-gb",
                    str(args.size_gb),
                    "--seed",
                    str(args.seed),
                    "--build",
                    kind,
                    str(path),
                ],
                check=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
    work = root / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(
        f"model: hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.layers} "
        f"layers, {(models['base'] / 'model.safetensors').stat().st_size / 2**20:.0f} MiB fp16; "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    rows = []
    for ft in args.finetunes.split(","):
        for rank in [int(r) for r in args.ranks.split(",")]:
            exact_wall = None
            exact_kept: dict[str, float] = {}
            for svd in ("exact", "randomized"):
                key = f"{ft}-r{rank}-{svd}"
                spec = {
                    "key": key,
                    "recipe": {
                        "base": str(models["base"]),
                        "model": str(models[ft]),
                        "rank": rank,
                        "svd": svd,
                        "seed": args.seed,
                        "dtype": "float32",
                    },
                    "out": str(work / key),
                    "result": str(work / f"{key}.result.json"),
                }
                res, wall, rss = run_child(spec, work)
                if svd == "exact":
                    exact_wall, exact_kept = wall, res["kept_energy"]
                floor = [math.sqrt(max(0.0, 1 - k)) for k in exact_kept.values()]
                row = {
                    "finetune": ft,
                    "rank": rank,
                    "svd": svd,
                    "wall_s": wall,
                    "extract_s": res["timings"].get("extract_s"),
                    "x_exact": wall / exact_wall if exact_wall else None,
                    "peak_rss_mib": rss,
                    "mean_error": res["summary"]["mean_relative_error"],
                    "max_error": res["summary"]["max_relative_error"],
                    "svd_floor_mean_error": sum(floor) / len(floor) if floor else None,
                    "adapter_mib": res["adapter_mib"],
                    "load_1min": os.getloadavg()[0],
                }
                rows.append(row)
                shutil.rmtree(work / key, ignore_errors=True)
                print(
                    f"{ft:>10} r={rank:<4} {svd:>10}: {wall:7.2f} s ({row['x_exact']:.2f}x exact)"
                    f", peak RSS {rss:7.1f} MiB, error mean {row['mean_error']:.4f} max "
                    f"{row['max_error']:.4f} (SVD floor {row['svd_floor_mean_error']:.4f}), "
                    f"adapter {row['adapter_mib']:.1f} MiB",
                    flush=True,
                )
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = args.data_dir / "results-lora-extract.json"
    out.write_text(json.dumps({"shape": shape.__dict__, "rows": rows, "parent_rss": self_rss}))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
