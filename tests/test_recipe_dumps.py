"""A recipe's dumps (the model card's recipe, the manifest's) do not depend on the order its
``parameters`` were written in: a job's recipe comes back from PostgreSQL's JSONB with its
keys in an order of its own, and a split merge's or a CLI run's card must be the same bytes."""

from __future__ import annotations

import json

from schemas.recipe import parse_recipe
from workers.publish.output import model_card


def _recipe(model_params: dict, top: dict, slice_params: dict) -> list[dict]:
    """The same parameters written at every level: in a whole-model recipe, in a sliced one."""
    whole = {
        "merge_method": "ties",
        "base_model": "./base",
        "models": [{"model": "./a", "parameters": model_params}, {"model": "./b"}],
        "parameters": top,
    }
    sliced = {
        "merge_method": "ties",
        "base_model": "./base",
        "parameters": top,
        "slices": [
            {
                "sources": [
                    {"model": "./base", "layer_range": [0, 2]},
                    {"model": "./a", "layer_range": [0, 2], "parameters": model_params},
                ],
                "parameters": slice_params,
            }
        ],
    }
    return [whole, sliced]


def test_parameters_in_any_order_dump_the_same_bytes():
    model = {"weight": 0.7, "density": 0.4}
    top = {"normalize": False, "lambda": 1.5, "density": 0.5, "weight": 1.0}
    group = {"weight": 0.2, "density": 0.9}
    backwards = [dict(reversed(d.items())) for d in (model, top, group)]
    for written, reordered in zip(_recipe(model, top, group), _recipe(*backwards), strict=True):
        a, b = parse_recipe(written), parse_recipe(reordered)
        dump = a.model_dump(mode="json", exclude_none=True)
        assert json.dumps(dump) == json.dumps(b.model_dump(mode="json", exclude_none=True))
        assert model_card(a, [], "t") == model_card(b, [], "t")
        assert list(dump["parameters"]) == ["density", "lambda", "normalize", "weight"]
        assert dump["parameters"]["lambda"] == 1.5  # the values are the ones written
        if dump.get("models"):
            assert dump["models"][0]["parameters"] == {"density": 0.4, "weight": 0.7}
            assert list(dump["models"][0]["parameters"]) == ["density", "weight"]
        else:
            (cut,) = dump["slices"]
            assert list(cut["parameters"]) == ["density", "weight"]
            assert list(cut["sources"][1]["parameters"]) == ["density", "weight"]
            assert cut["sources"][1]["parameters"] == {"density": 0.4, "weight": 0.7}
