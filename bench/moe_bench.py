#!/usr/bin/env python3
"""MoE assembly benchmark: wall time and peak memory of ``run_moe`` per gate mode, against
the process's floor and the model sizes, on the synthetic Llama of bench/merge_bench.py.

    . .venv/bin/activate
    python bench/moe_bench.py                        # 0.1 GB fp16 base, 4 experts
    python bench/moe_bench.py --size-gb 0.3 --experts 8

What it does:

1. builds (in child processes, cached under ``bench/.data/moe/``) a base with merge_bench's
   layout and weights, fp16, with the tiny word-level tokenizer of testbed/tiny_models.py,
   and ``--experts`` fine-tunes of it (merge_bench's noise, N(0, 0.01·std), own seed each);
2. measures, each in a child process (peak RSS from ``os.wait4``): ``floor`` — the child
   imports workers.moe, torch and transformers and opens the inputs, assembling nothing (what
   any run pays); then one ``run_moe`` per gate mode: ``random`` (no model run),
   ``cheap_embed`` (reads the embedding matrix) and ``hidden`` (loads the base with
   transformers and runs it on 8 prompts per expert);
3. prints per mode: wall s, peak RSS, RSS above the floor, and that excess relative to the
   largest input tensor, the base's size and the output's size; writes them as JSON to
   ``bench/.data/results-moe.json``.

The claim it checks (docs/moe.md): without ``hidden`` the assembly holds about one tensor at a
time (its excess over the floor is a few tensors, not the output's size); ``hidden`` adds about
the base's size.
"""

from __future__ import annotations

import argparse
import json
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

PROMPTS_PER_EXPERT = 8


def build(out: Path, shape: mb.Shape, index: int, seed: int) -> None:
    """The base (index -1) or expert ``index``, one safetensors file, fp16, with a tokenizer."""
    import torch
    from safetensors.torch import save_file

    from testbed.tiny_models import save_tokenizer

    tensors: dict[str, torch.Tensor] = {}
    for name, dims, tkind in mb.tensor_specs(shape):
        g = torch.Generator().manual_seed(mb._seed(seed, "base", name))
        w = torch.randn(dims, generator=g).mul_(mb.STD[tkind])
        if tkind == "norm":
            w.add_(1.0)
        if index >= 0:
            rms = mb.STD[tkind] if tkind != "norm" else 1.0
            g = torch.Generator().manual_seed(mb._seed(seed, "expert", index, name))
            w.add_(torch.randn(dims, generator=g).mul_(mb.DELTA_REL * rms))
        tensors[name] = w.to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(mb.llama_config(shape), indent=2) + "\n")
    save_tokenizer(tmp, shape.vocab)
    tmp.rename(out)


def recipe(base: Path, experts: list[Path], mode: str) -> dict[str, Any]:
    def prompts(i: int) -> list[str]:
        words = [f"w{100 * i + k}" for k in range(PROMPTS_PER_EXPERT)]
        return [" ".join(words[j:] + words[:j]) for j in range(PROMPTS_PER_EXPERT)]

    return {
        "base_model": str(base),
        "gate_mode": mode,
        "experts": [
            {"source_model": str(e), "positive_prompts": prompts(i)} for i, e in enumerate(experts)
        ],
    }


def child(spec_path: str) -> int:
    """One run in this (child) process; its result as JSON next to the spec."""
    import torch
    import transformers  # noqa: F401  (the floor includes what a hidden run imports)

    from schemas.moe_recipe import parse_moe_recipe
    from workers.moe import run_moe
    from workers.sources import SourceSettings
    from workers.tensors.reader import CheckpointReader

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    spec = json.loads(Path(spec_path).read_text())
    parsed = parse_moe_recipe(spec["recipe"])
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if spec["mode"] == "floor":
        readers = [CheckpointReader(Path(str(parsed.base_model.location)))]
        readers += [CheckpointReader(Path(str(e.source_model.location))) for e in parsed.experts]
        out["largest_tensor"] = max(r.info(n).nbytes for r in readers for n in r.names)
        for r in readers:
            r.close()
    else:
        result = run_moe(
            parsed, Path(spec["out"]), sources=SourceSettings(allow_local=True, hub_token=False)
        )
        out["timings"] = result.manifest["timings"]
        out["output_bytes"] = sum(f.stat().st_size for f in Path(spec["out"]).glob("*.safetensors"))
    out["wall_s"] = time.perf_counter() - t0
    Path(spec["result"]).write_text(json.dumps(out))
    return 0


def run_child(spec: dict[str, Any], work: Path) -> tuple[dict[str, Any], float, float]:
    spec_path = work / f"{spec['mode']}.json"
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {spec['mode']} failed")
    return json.loads(Path(spec["result"]).read_text()), wall, usage.ru_maxrss / 1024


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=0.1)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--modes", default="random,cheap_embed,hidden")
    ap.add_argument("--data-dir", type=Path, default=HERE / ".data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=2, metavar=("INDEX", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.build:
        build(Path(args.build[1]), mb.choose_shape(args.size_gb), int(args.build[0]), args.seed)
        return 0

    import shutil

    shape = mb.choose_shape(args.size_gb)
    root = args.data_dir / "moe" / f"{args.size_gb:g}gb-seed{args.seed}"
    paths = {-1: root / "base", **{i: root / f"expert{i}" for i in range(args.experts)}}
    for index, path in paths.items():  # in children: the parent stays lean (ru_maxrss)
        if not path.is_dir():
            subprocess.run(
                [sys.executable, __file__, "--size-gb", str(args.size_gb), "--seed",
                 str(args.seed), "--build", str(index), str(path)],
                check=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
    base, experts = paths[-1], [paths[i] for i in range(args.experts)]
    base_bytes = (base / "model.safetensors").stat().st_size
    work = root / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(
        f"model: hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.layers} "
        f"layers, {base_bytes / 2**20:.0f} MiB fp16, {args.experts} experts; "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    rows = []
    floor_rss = 0.0
    largest = 0
    for mode in ["floor", *args.modes.split(",")]:
        spec = {
            "mode": mode,
            "recipe": recipe(base, experts, "random" if mode == "floor" else mode),
            "out": str(work / mode),
            "result": str(work / f"{mode}.result.json"),
        }
        res, wall, rss = run_child(spec, work)
        if mode == "floor":
            floor_rss, largest = rss, res["largest_tensor"]
            print(
                f"{'floor':>11}: peak RSS {rss:7.1f} MiB (imports, inputs opened); largest "
                f"input tensor {largest / 2**20:.1f} MiB",
                flush=True,
            )
            continue
        excess = (rss - floor_rss) * 2**20
        row = {
            "mode": mode,
            "wall_s": wall,
            "router_s": res["timings"].get("router_s"),
            "assemble_s": res["timings"].get("assemble_s"),
            "peak_rss_mib": rss,
            "over_floor_mib": excess / 2**20,
            "over_floor_in_largest_tensors": excess / largest,
            "over_floor_of_base": excess / base_bytes,
            "over_floor_of_output": excess / res["output_bytes"],
            "output_mib": res["output_bytes"] / 2**20,
            "load_1min": os.getloadavg()[0],
        }
        rows.append(row)
        shutil.rmtree(work / mode, ignore_errors=True)
        print(
            f"{mode:>11}: {wall:6.2f} s (router {row['router_s']:.2f} s, assemble "
            f"{row['assemble_s']:.2f} s), peak RSS {rss:7.1f} MiB, +{row['over_floor_mib']:.1f} "
            f"MiB over the floor = {row['over_floor_in_largest_tensors']:.1f} largest tensors = "
            f"{row['over_floor_of_base']:.2f} x base = {row['over_floor_of_output']:.2f} x "
            f"output ({row['output_mib']:.0f} MiB)",
            flush=True,
        )
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = args.data_dir / "results-moe.json"
    out.write_text(json.dumps({"shape": shape.__dict__, "rows": rows, "parent_rss": self_rss}))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
