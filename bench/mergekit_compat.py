#!/usr/bin/env python3
"""The mergekit compatibility set (testbed/compat.py) through weightsmith and mergekit 0.1.5.

Run it with the project's virtualenv:

    . .venv/bin/activate
    python bench/mergekit_compat.py                     # every recipe (~3 min)
    python bench/mergekit_compat.py --only ex_ties,lazy_slerp
    python bench/mergekit_compat.py --mergekit-venv /tmp/mkvenv

For each recipe of the set it builds (once, cached in ``<data-dir>/models``) the tiny
checkpoints the recipe names, runs weightsmith's engine on it in this process and
``mergekit-yaml`` in mergekit's own venv (``bench/.venv-mergekit``, created as
``merge_bench.py`` creates it: torch==2.13.0 first, then mergekit==0.1.5), and prints per
recipe: accepted by each, the same tensor names / shapes / dtypes, max |ours − mk| and that
difference in units in the last place of the output dtype (at the larger of the two values),
and a verdict. A recipe whose original asks for float16/bfloat16 runs on checkpoints stored
in that dtype; a deterministic one is also run as its float32 twin (``name@f32``: the float32
family, ``dtype: float32``), which separates the math from mergekit's half-precision
arithmetic. Verdicts: ``identical`` (float32: ≤ 4 ulp of the operands, 8 for karcher's iteration;
float16/bfloat16: ≤ 1 ulp),
``same layout`` (a random method: names, shapes and dtypes agree), ``differs``,
``pending`` (refused by us for a reason the set records), ``refused``/``failed``.
Exit status 1 if a non-pending recipe is refused or fails on our side, or a deterministic
recipe without a recorded difference from mergekit differs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from merge_bench import DEFAULT_MERGEKIT_VENV, ensure_mergekit  # noqa: E402
from safetensors import safe_open  # noqa: E402

from schemas.recipe import RecipeError, parse_recipe  # noqa: E402
from testbed.compat import RECIPES, CompatRecipe, build_families  # noqa: E402
from workers.merge.engine import run_merge  # noqa: E402

_LAYER = re.compile(r"^(.*?(?:layers|h)\.)(\d+)(\..+)$")
DEFAULT_DATA_DIR = BENCH_DIR / ".data" / "compat-set"
SEED = 1
ULP_TOL = {torch.float16: 1.0, torch.bfloat16: 1.0}  # float32: the recipe's ulp_tol (4)
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def find_mergekit(venv: Path) -> Path | None:
    """mergekit-yaml of ``venv`` if mergekit 0.1.5 is installed there, else the venv made
    (when missing) by merge_bench.py's ``ensure_mergekit``."""
    exe, py = venv / "bin" / "mergekit-yaml", venv / "bin" / "python"
    if exe.exists() and py.exists():
        probe = "import importlib.metadata as m; print(m.version('mergekit'))"
        proc = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
        if proc.stdout.strip() == "0.1.5":
            return exe
    return ensure_mergekit(venv)


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                out[name] = f.get_tensor(name)
    return out


def ulps(ours: torch.Tensor, mk: torch.Tensor, operand: torch.Tensor | None = None) -> float:
    """max |ours − mk| in units in the last place of the output dtype, at the largest
    magnitude among the two results and ``operand`` (the largest input magnitude at that
    position, where the inputs line up with the output: rounding is relative to the
    operands, and a result that cancels to near 0 would otherwise count huge ulps)."""
    info = torch.finfo(mk.dtype)
    a, b = ours.double(), mk.double()
    big = torch.maximum(a.abs(), b.abs())
    if operand is not None:
        big = torch.maximum(big, operand.double())
    big = big.clamp(min=info.tiny)
    spacing = torch.exp2(torch.floor(torch.log2(big))) * info.eps
    return float(((a - b).abs() / spacing).max()) if a.numel() else 0.0


def input_tensors(ref: str) -> dict[str, torch.Tensor]:
    """The tensors of an input; for BASE+ADAPTER, PEFT's own merge (``merge_and_unload``)."""
    if "+" not in ref:
        return load_tensors(Path(ref))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = ref.split("+")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    state = merged.state_dict()
    return {n: state[n].detach() for n in load_tensors(Path(base)) if n in state}


def operands(recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per tensor name, the largest magnitude over the inputs at each position, for a
    ``models`` recipe (a slice's inputs do not line up with the output by name)."""
    out: dict[str, torch.Tensor] = {}

    def add(name: str, t: torch.Tensor) -> None:
        if not t.is_floating_point():
            return
        mag = t.double().abs()
        if name not in out:
            out[name] = mag
        elif out[name].shape == mag.shape:
            out[name] = torch.maximum(out[name], mag)

    if not recipe.get("slices"):
        refs = [recipe.get("base_model")] + [m["model"] for m in recipe.get("models") or []]
        for ref in {r for r in refs if r}:
            for name, t in input_tensors(ref).items():
                add(name, t)
        return out
    # slices: output layer offset + k comes from layer first + k of each of the slice's
    # sources; tensors outside the layers from every source
    offset = 0
    for piece in recipe["slices"]:
        for src in piece["sources"]:
            first, end = src["layer_range"]
            for name, t in input_tensors(src["model"]).items():
                m = _LAYER.match(name)
                if m is None:
                    add(name, t)
                elif first <= int(m.group(2)) < end:
                    add(f"{m.group(1)}{int(m.group(2)) - first + offset}{m.group(3)}", t)
        offset += piece["sources"][0]["layer_range"][1] - piece["sources"][0]["layer_range"][0]
    return out


def rows_by_token(
    ours_dir: Path, mk_dir: Path, mk: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """mergekit's embedding and output-head rows put in the order of our output vocabulary,
    token by token (mergekit numbers a union's new tokens differently from run to run)."""
    from transformers import AutoTokenizer

    ours_vocab = AutoTokenizer.from_pretrained(str(ours_dir)).get_vocab()
    mk_vocab = AutoTokenizer.from_pretrained(str(mk_dir)).get_vocab()
    if ours_vocab.keys() != mk_vocab.keys():
        return mk  # different vocabularies: compare() reports the shapes or values
    out = dict(mk)
    for name, t in mk.items():
        if not name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")):
            continue
        order = list(range(t.shape[0]))  # rows past the vocabulary (padding) stay in place
        for token, i in ours_vocab.items():
            if i < len(order) and mk_vocab[token] < t.shape[0]:
                order[i] = mk_vocab[token]
        out[name] = t[torch.tensor(order)]
    return out


def compare(
    ours: dict[str, torch.Tensor],
    mk: dict[str, torch.Tensor],
    scale: dict[str, torch.Tensor] | None = None,
    f32_tol: float = 4.0,
) -> dict[str, Any]:
    res: dict[str, Any] = {"only_ours": sorted(set(ours) - set(mk))}
    res["only_mk"] = sorted(set(mk) - set(ours))
    res["shape"] = sorted(n for n in set(ours) & set(mk) if ours[n].shape != mk[n].shape)
    res["dtype"] = sorted(
        f"{n}: {ours[n].dtype} vs {mk[n].dtype}"
        for n in set(ours) & set(mk)
        if ours[n].dtype != mk[n].dtype
    )
    res["same_layout"] = not (res["only_ours"] or res["only_mk"] or res["shape"] or res["dtype"])
    worst, worst_ulp, worst_name, tol_ok = 0.0, 0.0, None, True
    for n in sorted(set(ours) & set(mk)):
        a, b = ours[n], mk[n]
        if a.shape != b.shape or not b.is_floating_point():
            continue
        d = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        op = (scale or {}).get(n)
        u = ulps(a.to(b.dtype), b, op if op is not None and op.shape == b.shape else None)
        if d > worst:
            worst, worst_name = d, n
        worst_ulp = max(worst_ulp, u)
        tol_ok = tol_ok and u <= (f32_tol if b.dtype == torch.float32 else ULP_TOL[b.dtype])
    res.update(max_diff=worst, max_ulp=worst_ulp, worst=worst_name, within_tol=tol_ok)
    return res


def run_ours(recipe: dict[str, Any], out: Path) -> tuple[str, str]:
    try:
        parsed = parse_recipe(recipe)
    except RecipeError as e:
        return "refused", str(e).splitlines()[0][:200]
    try:
        run_merge(parsed, out, seed=SEED)
    except Exception as e:
        return "failed", f"{type(e).__name__}: {e}"[:200]
    return "ok", ""


def run_mergekit(exe: Path, recipe: dict[str, Any], work: Path, timeout: float) -> tuple[str, str]:
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [str(exe), str(path), str(work / "mk"), "--no-cuda", "--allow-crimes", "--quiet"]
    cmd += ["--no-write-model-card", "--lora-merge-cache", str(work / "lora-cache")]
    env = {**os.environ, **CHILD_ENV}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "failed", f"timed out after {timeout:.0f} s"
    (work / "mergekit.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        return "failed", (lines[-1] if lines else f"exit {proc.returncode}")[:200]
    return "ok", ""


def verdict(c: CompatRecipe, ours: str, mk: str, cmp: dict[str, Any] | None) -> str:
    if ours != "ok":
        return "pending" if c.pending and ours == "refused" else f"{ours} by us"
    if mk != "ok":
        return "failed in mergekit"
    assert cmp is not None
    if not cmp["same_layout"]:
        only_dtype = not (cmp["only_ours"] or cmp["only_mk"] or cmp["shape"])
        return "dtype differs (documented)" if only_dtype and c.difference else "layout differs"
    if c.random:
        return "same layout"
    if c.pending:
        return "pending (" + ("identical" if cmp["within_tol"] else "differs") + ")"
    if cmp["within_tol"]:
        return "identical"
    return "differs (documented)" if c.difference else "differs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated recipe names")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--mergekit-venv", type=Path, default=DEFAULT_MERGEKIT_VENV)
    ap.add_argument("--no-f32-twins", action="store_true", help="skip the float32 twins")
    ap.add_argument("--timeout", type=float, default=600.0, help="per mergekit run, s")
    ap.add_argument("--json", type=Path, default=None, help="default <data-dir>/results.json")
    args = ap.parse_args()

    exe = find_mergekit(args.mergekit_venv.resolve())
    if exe is None:
        print("mergekit 0.1.5 is not available; nothing compared")
        return 1
    chosen = [r for r in RECIPES if not args.only or r.name in args.only.split(",")]
    runs: list[tuple[str, CompatRecipe, str, dict[str, Any]]] = []
    for c in chosen:
        runs.append((c.name, c, c.family, {}))
        half = c.dtype in ("float16", "bfloat16")
        if half and not c.random and not c.pending and not args.no_f32_twins:
            runs.append((f"{c.name}@f32", c, "llama", {"dtype": "float32"}))
    families = build_families(args.data_dir / "models", {fam for _, _, fam, _ in runs})

    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for name, c, fam, overrides in runs:
        work = args.data_dir / "runs" / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        recipe = c.render(families[fam], **overrides)
        t0 = time.perf_counter()
        ours, ours_msg = run_ours(recipe, work / "ours")
        t1 = time.perf_counter()
        mk, mk_msg = run_mergekit(exe, recipe, work, args.timeout)
        t2 = time.perf_counter()
        cmp = None
        layers: dict[str, Any] = {}
        if ours == "ok" and mk == "ok":
            mk_tensors = load_tensors(work / "mk")
            if "tokenizer" in recipe or "tokenizer_source" in recipe:
                mk_tensors = rows_by_token(work / "ours", work / "mk", mk_tensors)
            cmp = compare(load_tensors(work / "ours"), mk_tensors, operands(recipe), c.ulp_tol)
            for side in ("ours", "mk"):
                cfg = json.loads((work / side / "config.json").read_text())
                layers[side] = cfg.get("num_hidden_layers", cfg.get("n_layer"))
        row = {
            "recipe": name,
            "shaped_like": c.shaped_like,
            "dtype": recipe.get("dtype") or "float32",
            "ours": ours,
            "ours_msg": ours_msg,
            "mergekit": mk,
            "mergekit_msg": mk_msg,
            "layers": layers,
            "compare": cmp,
            "verdict": verdict(c, ours, mk, cmp),
            "difference": c.difference,
            "pending": c.pending,
            "seconds": {"ours": round(t1 - t0, 2), "mergekit": round(t2 - t1, 2)},
        }
        if cmp is not None and layers.get("ours") != layers.get("mk"):
            row["verdict"] = "layer count differs"
        rows.append(row)
        print_row(row, header=len(rows) == 1)

    print(f"\n{len(rows)} runs of {len(chosen)} recipes in {time.perf_counter() - t_all:.0f} s")
    for row in rows:
        for side in ("ours", "mergekit"):
            if row[f"{side}_msg"]:
                print(f"  {row['recipe']}: {side}: {row[f'{side}_msg']}")
        if row["difference"] and row["verdict"].startswith("differs"):
            print(f"  {row['recipe']}: documented difference: {row['difference']}")
    out = args.json or args.data_dir / "results.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"results: {out}")
    bad = [
        r["recipe"]
        for r in rows
        if r["verdict"] in ("refused by us", "failed by us", "layout differs", "differs")
        or r["verdict"] == "layer count differs"
    ]
    if bad:
        print("not compatible:", ", ".join(bad))
    return 1 if bad else 0


def print_row(row: dict[str, Any], header: bool) -> None:
    if header:
        print(
            f"{'recipe':<26} {'dtype':<8} {'ours':<8} {'mk':<7} {'layers':<7} {'layout':<7} "
            f"{'max|diff|':>10} {'ulp':>8}  verdict"
        )
    cmp = row["compare"]
    layout = "-" if cmp is None else ("same" if cmp["same_layout"] else "DIFF")
    diff = "-" if cmp is None else f"{cmp['max_diff']:.3g}"
    ulp = "-" if cmp is None else f"{cmp['max_ulp']:.3g}"
    lay = row["layers"].get("ours", "-")
    print(
        f"{row['recipe']:<26} {row['dtype']:<8} {row['ours']:<8} {row['mergekit']:<7} "
        f"{lay!s:<7} {layout:<7} {diff:>10} {ulp:>8}  {row['verdict']}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
