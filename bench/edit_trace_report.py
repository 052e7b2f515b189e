"""Per-fact report of an ``edit_bench.py --compare-layers`` run: is the layer that the causal
trace chooses related to the fact's neighborhood, where do the traces peak, and what is the
mean indirect effect per layer?

    python bench/edit_bench.py --quick --compare-layers --memit "" --cache-dir DIR --out R.json
    python bench/edit_trace_report.py R.json DIR/trace

The traces are the JSON files the bench's trace cache keeps (``--cache-dir DIR`` keeps them
after the run; without it they go with the run's temporary folder). Reads files only;
computes nothing with the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# runs of --compare-layers: "auto", "default" (layer 1) and "published" (5 of 32 scaled); files
# written before 2026-12-07 have "auto", "1" and "default" (then layer 5)
MODES = ("auto", "1", "default", "published")


@dataclass(frozen=True)
class FactTrace:
    """One fact of the run: its trace, and its rows under each layer mode."""

    prompt: str
    relation: str
    p_clean: float
    p_corrupted: float
    effects: list[float]  # indirect effect per layer, 0 … depth−1
    rows: dict[str, dict[str, Any]]  # mode -> the bench's row for this fact

    @property
    def chosen(self) -> int:
        return int(self.rows["auto"]["layer"])

    @property
    def argmax(self) -> int:
        """The layer of the largest effect over every layer (the lowest on a tie)."""
        return max(range(len(self.effects)), key=lambda k: (self.effects[k], -k))


def load(results: dict[str, Any], trace_dir: Path) -> list[FactTrace]:
    """The facts of the run's ``auto`` mode, in its order, with their cached traces."""
    traces = {}
    for path in sorted(trace_dir.glob("*.json")):
        t = json.loads(path.read_text())["trace"]
        traces[t["prompt"]] = t
    modes = results["rome_modes"]
    by_mode = {m: {r["prompt"]: r for r in modes.get(m, [])} for m in MODES}
    out = []
    for row in modes["auto"]:
        t = traces.get(row["prompt"])
        if t is None:
            raise SystemExit(f"no trace for {row['prompt']!r} in {trace_dir}")
        out.append(
            FactTrace(
                prompt=row["prompt"],
                relation=row["relation"],
                p_clean=float(t["p_clean"]),
                p_corrupted=float(t["p_corrupted"]),
                effects=[float(p) - float(t["p_corrupted"]) for p in t["p_restored"]],
                rows={
                    m: rows[row["prompt"]] for m, rows in by_mode.items() if row["prompt"] in rows
                },
            )
        )
    return out


def ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(a: list[float], b: list[float]) -> float | None:
    """None where either side is constant."""
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    den = (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    return num / den if den else None


def spearman(a: list[float], b: list[float]) -> float | None:
    return pearson(ranks(a), ranks(b))


def mean_of(facts: list[FactTrace], mode: str, key: str) -> float | None:
    values = [f.rows[mode][key] for f in facts if mode in f.rows and f.rows[mode][key] is not None]
    return statistics.fmean(values) if values else None


def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def report(facts: list[FactTrace], last_layer: int) -> None:
    modes = [m for m in MODES if all(m in f.rows for f in facts)]
    print(f"{len(facts)} facts; modes {', '.join(modes)}")
    print()
    print("| # | relation | prompt | p_clean | p_corrupted | chosen | argmax 0… | IE at chosen | "
          + " | ".join(f"neigh {m}" for m in modes) + " |")  # fmt: skip
    print("|---" * (8 + len(modes)) + "|")
    for i, f in enumerate(facts):
        neigh = " | ".join(fmt(f.rows[m]["neighborhood"], 2) for m in modes)
        print(f"| {i + 1} | {f.relation} | {f.prompt} | {f.p_clean:.3f} | {f.p_corrupted:.3f} | "
              f"{f.chosen} | {f.argmax} | {f.effects[f.chosen]:.4f} | {neigh} |")  # fmt: skip

    for title, values in (
        ("chosen layer (the peak in the search range)", [f.chosen for f in facts]),
        ("unrestricted argmax over every layer", [f.argmax for f in facts]),
    ):
        print(f"\nHistogram of the {title}:")
        for layer, n in sorted(Counter(values).items()):
            print(f"  layer {layer:2d}: {n:2d} {'#' * n}")

    print("\nIndirect effect per layer over the facts (IE / (p_clean − p_corrupted): the share")
    print("of the corruption's loss that restoring the layer's MLP output undoes):\n")
    print("| layer | mean IE | median IE | mean share |")
    print("|---|---|---|---|")
    for k in range(last_layer + 1):
        ie = [f.effects[k] for f in facts]
        share = [f.effects[k] / (f.p_clean - f.p_corrupted) for f in facts
                 if f.p_clean - f.p_corrupted > 1e-6]  # fmt: skip
        print(f"| {k} | {statistics.fmean(ie):.4f} | {statistics.median(ie):.4f} | "
              f"{fmt(statistics.fmean(share) if share else None)} |")  # fmt: skip

    print(
        "\nNeighborhood (and own answer) by the layer auto chose, the same facts in every mode:\n"
    )
    print("| chosen layer | facts | " + " | ".join(f"neigh {m}" for m in modes) + " | "
          + " | ".join(f"own {m}" for m in modes) + " |")  # fmt: skip
    print("|---" * (2 + 2 * len(modes)) + "|")
    groups: dict[int, list[FactTrace]] = {}
    for f in facts:
        groups.setdefault(f.chosen, []).append(f)
    for layer, group in sorted(groups.items()):
        cells = [fmt(mean_of(group, m, "neighborhood")) for m in modes]
        cells += [fmt(mean_of(group, m, "neighborhood_own_answer")) for m in modes]
        print(f"| {layer} | {len(group)} | " + " | ".join(cells) + " |")

    print("\nBy relation:\n")
    print("| relation | facts | chosen layers | " + " | ".join(f"neigh {m}" for m in modes) + " |")
    print("|---" * (3 + len(modes)) + "|")
    relations: dict[str, list[FactTrace]] = {}
    for f in facts:
        relations.setdefault(f.relation, []).append(f)
    for rel, group in sorted(relations.items()):
        used = ", ".join(f"{k}×{n}" for k, n in sorted(Counter(f.chosen for f in group).items()))
        cells = " | ".join(fmt(mean_of(group, m, "neighborhood")) for m in modes)
        print(f"| {rel} | {len(group)} | {used} | {cells} |")

    chosen = [float(f.chosen) for f in facts]
    auto = [float(f.rows["auto"]["neighborhood"]) for f in facts]
    print("\nSpearman correlation over the facts:")
    print(f"  chosen layer vs neighborhood (auto): {fmt(spearman(chosen, auto))}")
    peak = [f.effects[f.chosen] for f in facts]
    print(f"  indirect effect at the chosen layer vs neighborhood (auto): "
          f"{fmt(spearman(peak, auto))}")  # fmt: skip
    for m in modes[1:]:
        other = [float(f.rows[m]["neighborhood"]) for f in facts]
        diff = [a - b for a, b in zip(auto, other, strict=True)]
        print(f"  chosen layer vs neighborhood at {m}: {fmt(spearman(chosen, other))}")
        print(f"  chosen layer vs neighborhood auto − {m}: {fmt(spearman(chosen, diff))}")
        better = sum(d > 0 for d in diff)
        worse = sum(d < 0 for d in diff)
        print(f"  auto against {m}: better on {better} facts, worse on {worse}, "
              f"equal on {len(diff) - better - worse}")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results", type=Path, help="edit_bench.py --out of a --compare-layers run")
    p.add_argument("traces", type=Path, help="the trace cache folder (--cache-dir DIR/trace)")
    p.add_argument("--last-layer", type=int, default=15, help="effects table up to (default 15)")
    args = p.parse_args()
    facts = load(json.loads(args.results.read_text()), args.traces)
    report(facts, min(args.last_layer, len(facts[0].effects) - 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
