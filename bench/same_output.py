"""Are two merge outputs the same, bit for bit?

    python bench/same_output.py DIR_A DIR_B

Compares every tensor of the ``*.safetensors`` files of two output folders (the same
names, dtypes, shapes and bytes; how the tensors are split into shards does not matter)
and prints how many differ. Exit status 1 if any does. Used to check that a speed change
leaves a merge's output unchanged: run the same recipe with the same seed through the tree
before and after the change (e.g. ``PYTHONPATH=<tree> weightsmith merge RECIPE --out DIR
--seed 1``) and compare the two folders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[name] = h.get_tensor(name)
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    a, b = tensors(args.a), tensors(args.b)
    only = sorted(set(a) ^ set(b))
    differ = sorted(n for n in set(a) & set(b) if not same(a[n], b[n]))
    elements = sum(t.numel() for t in a.values())
    print(f"{len(a)} / {len(b)} tensors, {elements} elements in the first; in one only: "
          f"{len(only)}; differing: {len(differ)}")  # fmt: skip
    for name in (only + differ)[:10]:
        print(f"  {name}")
    return 1 if only or differ else 0


if __name__ == "__main__":
    sys.exit(main())
