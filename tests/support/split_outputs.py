"""What the tests of merges split into parts share: the recipe over the tiny Llama family
cut into many small shards, and the check that two output folders are the same merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHARD = 40_000  # bytes per output shard: the tiny Llama's output gets ~16 shards


def family_recipe(family: dict[str, Path], method: str, **parameters: Any) -> dict[str, Any]:
    """``method`` over the tiny Llama family (base + 3), in ~16 shards (so that every part
    of a split owns several)."""
    return {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family[k]), "parameters": {"weight": w}}
            for k, w in (("ft1", 0.5), ("ft2", 0.3), ("ft3", 0.4))
        ],
        "parameters": parameters,
        "seed": 11,
        "output": {"shard_size": SHARD},
    }


def same_output(a: Path, b: Path) -> None:
    """Every file byte for byte; the manifest but for its timings, its time of creation and
    a published version's own block (version, job id, time)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "manifest.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        del m["timings"], m["created_at"]
        m.pop("artifact", None)
    assert ma == mb
