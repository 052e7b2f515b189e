"""A merge's progress as a job shows it: counters that only go forward, over every pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.recipe import parse_recipe
from workers.merge.engine import run_merge
from workers.merge.progress import Progress
from workers.tensors import CheckpointReader


@pytest.mark.parametrize(
    ("method", "parameters", "passes"),
    [
        ("linear", {}, 0),
        ("ties", {"density": 0.5, "scope": "global"}, 1),  # one statistics pass first
        ("pcb", {"density": 0.3}, 1),
    ],
)
def test_progress_only_moves_forward_and_ends_with_every_pass_counted(
    llama_family: dict[str, Path], tmp_path: Path, method: str, parameters: dict, passes: int
) -> None:
    recipe = {
        "merge_method": method,
        "models": [{"model": str(llama_family[n])} for n in ("ft1", "ft2")],
        "parameters": parameters,
    }
    if method != "linear":
        recipe["base_model"] = str(llama_family["base"])
    reports: list[Progress] = []
    run_merge(parse_recipe(recipe), tmp_path / "out", seed=1, progress=reports.append)

    with CheckpointReader(llama_family["base"]) as reader:
        tensors = len(reader.names)
    counted = [r for r in reports if r.phase != "resolve"]
    assert counted and counted[-1].phase == "publish"
    done = [r.tensors_done for r in counted]
    assert done == sorted(done), "the tensor counter went back"
    assert [r.bytes_done for r in counted] == sorted(r.bytes_done for r in counted)
    last = counted[-1]
    assert last.tensors_done == last.tensors_total
    assert last.tensors_total >= tensors * (1 + passes)
    assert {r.tensors_total for r in counted} == {last.tensors_total}  # fixed from the start
