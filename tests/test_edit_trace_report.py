"""bench/edit_trace_report.py (run by hand on an edit_bench --compare-layers run): its rank
correlation against hand-computed values, and how it joins the bench's rows with the cached
traces."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.scripts import loaded_script

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "edit_trace_report.py"


@pytest.fixture(scope="module")
def tr() -> Iterator[ModuleType]:
    with loaded_script(SCRIPT, "edit_trace_report_under_test") as module:
        yield module


def test_ranks_share_ties(tr: ModuleType) -> None:
    assert tr.ranks([10.0, 20.0, 20.0, 5.0]) == [2.0, 3.5, 3.5, 1.0]


def test_spearman_matches_the_textbook_formula(tr: ModuleType) -> None:
    # no ties: 1 − 6 Σd² / (n (n² − 1)) with d = (0, 1, −1, 0): 1 − 12 / 60 = 0.8
    assert tr.spearman([1.0, 2.0, 3.0, 4.0], [10.0, 30.0, 20.0, 40.0]) == pytest.approx(0.8)
    assert tr.spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert tr.spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) is None  # constant: undefined


def row(prompt: str, layer: int, neighborhood: float) -> dict[str, object]:
    return {
        "relation": "capital",
        "prompt": prompt,
        "layer": layer,
        "neighborhood": neighborhood,
        "neighborhood_own_answer": 1.0,
    }


def write_trace(
    folder: Path, name: str, prompt: str, corrupted: float, restored: list[float]
) -> None:
    trace = {"prompt": prompt, "p_clean": 0.5, "p_corrupted": corrupted, "p_restored": restored}
    (folder / f"{name}.json").write_text(json.dumps({"key": {}, "trace": trace}))


def test_load_joins_rows_and_traces_and_reports(
    tr: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_trace(tmp_path, "a", "A is", 0.1, [0.4, 0.2, 0.3, 0.1])
    write_trace(tmp_path, "b", "B is", 0.0, [0.1, 0.1, 0.1, 0.0])  # a tie: the lowest layer
    results = {
        "rome_modes": {
            "auto": [row("A is", 2, 0.5), row("B is", 1, 1.0)],
            "1": [row("A is", 1, 1.0), row("B is", 1, 1.0)],
            "default": [row("A is", 3, 0.0), row("B is", 3, 1.0)],
        }
    }

    facts = tr.load(results, tmp_path)

    assert [f.prompt for f in facts] == ["A is", "B is"]
    assert facts[0].effects == pytest.approx([0.3, 0.1, 0.2, 0.0])
    assert (facts[0].chosen, facts[0].argmax) == (2, 0)
    assert (facts[1].chosen, facts[1].argmax) == (1, 0)
    assert tr.mean_of(facts, "1", "neighborhood") == pytest.approx(1.0)
    assert tr.mean_of(facts, "default", "neighborhood") == pytest.approx(0.5)

    tr.report(facts, last_layer=3)
    out = capsys.readouterr().out
    # mean IE of layer 0: (0.3 + 0.1) / 2; of layer 2: (0.2 + 0.1) / 2
    assert "| 0 | 0.2000 |" in out
    assert "| 2 | 0.1500 |" in out
    # auto is worse than layer 1 on A (0.5 < 1.0), equal on B
    assert "auto against 1: better on 0 facts, worse on 1, equal on 1" in out


def test_a_fact_without_its_trace_is_named(tr: ModuleType, tmp_path: Path) -> None:
    results = {"rome_modes": {"auto": [row("C is", 1, 1.0)]}}
    with pytest.raises(SystemExit, match="no trace for 'C is'"):
        tr.load(results, tmp_path)
