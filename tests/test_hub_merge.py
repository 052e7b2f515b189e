"""Merging Hub models end to end through huggingface_hub against the local Hub endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from schemas.recipe import parse_recipe
from tests.support.reference_merge import reference_merge
from workers.merge.engine import run_merge
from workers.sources import SourceSettings


def _load_output(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out / shard))
    return tensors


def test_hub_references_are_pinned_to_a_commit_and_recorded(hub, llama_family, tmp_path):
    base_sha = hub.add_repo("acme/tiny-base", llama_family["base"])
    ft_sha = hub.add_repo("acme/tiny-ft", llama_family["ft1"])
    recipe = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "acme/tiny-base",
            "models": [{"model": "hf://acme/tiny-ft@main", "parameters": {"weight": 0.5}}],
        }
    )
    settings = SourceSettings(hub_endpoint=hub.url, cache_dir=hub.cache_dir)
    result = run_merge(recipe, tmp_path / "out", sources=settings)

    parents = {p["reference"]: p for p in result.manifest["parents"]}
    assert parents["acme/tiny-base"]["revision"] == base_sha
    assert parents["acme/tiny-base"]["pinned"] == f"acme/tiny-base@{base_sha}"
    assert parents["acme/tiny-ft@main"]["revision"] == ft_sha
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model_relation: merge" in card and base_sha in card

    # the same numbers as merging the local copies (computed by the independent reference)
    expected = reference_merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(llama_family["base"]),
            "models": [{"model": str(llama_family["ft1"]), "parameters": {"weight": 0.5}}],
        }
    )
    out = _load_output(tmp_path / "out")
    for name, ref in expected.items():
        torch.testing.assert_close(out[name], ref, rtol=1e-5, atol=1e-6)


def test_a_moved_branch_gives_the_new_commit_but_an_old_sha_the_old_files(
    hub, llama_family, tmp_path
):
    old = hub.add_repo("acme/moving", llama_family["ft1"])
    new = hub.add_repo("acme/moving", llama_family["ft2"])
    assert old != new
    settings = SourceSettings(hub_endpoint=hub.url, cache_dir=hub.cache_dir)
    for rev, expect_sha, ft in (("main", new, "ft2"), (old, old, "ft1")):
        out = tmp_path / f"out-{rev[:6]}"
        recipe = parse_recipe(
            {
                "merge_method": "linear",
                "models": [{"model": f"acme/moving@{rev}"}],
            }
        )
        result = run_merge(recipe, out, sources=settings)
        assert result.manifest["parents"][0]["revision"] == expect_sha
        merged = _load_output(out)
        original = load_file(llama_family[ft] / "model.safetensors")
        for name, t in original.items():
            assert torch.equal(merged[name], t), name


def test_cli_merges_a_hub_model_and_fails_cleanly_on_an_unknown_repo(hub, llama_family, tmp_path):
    sha = hub.add_repo("acme/cli-base", llama_family["base"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: ties\n"
        "base_model: acme/cli-base\n"
        f"models:\n  - model: {llama_family['ft1']}\n    parameters: {{density: 0.5}}\n"
    )
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(hub.cache_dir)}
    run = subprocess.run(
        [sys.executable, "-m", "weightsmith", "merge", str(recipe), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["parents"][0]["revision"] == sha

    recipe.write_text(recipe.read_text().replace("acme/cli-base", "acme/does-not-exist"))
    run = subprocess.run(
        [sys.executable, "-m", "weightsmith", "merge", str(recipe), "--out", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "acme/does-not-exist" in lines[0] and "not found" in lines[0]
    assert not (tmp_path / "p").exists()
