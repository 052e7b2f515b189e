"""bench/edit_facts.json: the facts appended for the 200 sequential edits leave the first 100
candidates (their order, counterfactuals and neighborhoods) as they were, and keep the
invariants the benches rely on. The benches themselves run by hand, not in CI."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.support.scripts import loaded_script

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((BENCH / "edit_facts.json").read_text())
    return data


@pytest.fixture(scope="module")
def eb() -> Iterator[ModuleType]:
    with loaded_script(BENCH / "edit_bench.py", "edit_bench_under_test") as module:
        yield module


def test_the_first_relations_still_hold_the_100_facts_of_the_earlier_figures(
    doc: dict[str, Any],
) -> None:
    counts = {r["name"]: len(r["facts"]) for r in doc["relations"]}
    assert counts == {
        "capital": 50,
        "landmark city": 14,
        "official language": 16,
        "author": 8,
        "currency": 12,
    }
    assert doc["relations"][0]["facts"][0] == ["Japan", "Tokyo"]
    assert doc["relations"][-1]["facts"][-1] == ["Sweden", "krona"]


def test_appended_facts_have_new_subjects_new_objects_and_a_neighbour_each(
    doc: dict[str, Any],
) -> None:
    first = doc["relations"] + doc["neighbours"]
    old_subjects = {s for r in first for s, _ in r["facts"]}
    old_objects = {o for r in first for _, o in r["facts"]}
    more = doc["more_relations"]
    assert {r["name"] for r in more}.isdisjoint(r["name"] for r in doc["relations"])
    subjects = Counter(s for r in more for s, _ in r["facts"] + r["neighbours"])
    assert [s for s, n in subjects.items() if n > 1] == []
    assert old_subjects.isdisjoint(subjects)
    assert old_objects.isdisjoint(o for r in more for _, o in r["facts"] + r["neighbours"])
    for r in more:
        neighbour_objects = {o for _, o in r["neighbours"]}
        assert [s for s, o in r["facts"] if o not in neighbour_objects] == [], r["name"]
        assert len({o for _, o in r["facts"]}) >= 2, r["name"]  # a counterfactual exists
    assert sum(len(r["facts"]) for r in doc["relations"] + more) >= 230


def test_candidates_start_with_the_first_100_unchanged(eb: ModuleType, doc: dict[str, Any]) -> None:
    without_more = {k: v for k, v in doc.items() if k != "more_relations"}
    before = eb.round_robin(eb.facts_as_edits(without_more, without_more["relations"]))
    now = eb.candidate_facts()
    assert len(before) == 100
    assert now[:100] == before
    assert eb.candidate_facts(more=False) == before
    appended = now[100:]
    assert len(appended) == sum(len(r["facts"]) for r in doc["more_relations"])
    # round-robin over the appended relations: the first ones are one of each
    names = [r["name"] for r in doc["more_relations"]]
    assert [f.relation for f in appended[: len(names)]] == names
    # the neighborhood of an appended fact: its relation's never-edited neighbours first
    nigeria = next(f for f in appended if f.request.subject == "Nigeria")
    assert nigeria.request.target_true == "Africa"
    assert nigeria.request.target_new == "Asia"  # the next subject's differing object
    assert nigeria.request.neighborhood_prompts == [
        "The country Namibia is located in the continent of",
        "The country Madagascar is located in the continent of",
        "The country Ghana is located in the continent of",
    ]
