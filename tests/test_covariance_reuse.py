"""Covariance that is fast and reused (issue 17 items 4 and 5):

- a sampled corpus is counted into C while it is sampled (one KV-cached pass); that C is
  the C of a full forward pass over the finished samples, computed here independently in
  float64 with a plain hook;
- each C is keyed by a hash of exactly the tensors that feed its layer's key (checked per
  architecture family against the autograd graph of the key), so an edit of a layer's
  output projection, or of a later layer, keeps the C of that layer and earlier ones;
- an edited checkpoint's edits count the tokens its parent edit sampled.

Tiny random models built here; nothing is slow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from infra.storage import LocalObjectStore
from schemas.edit_recipe import parse_edit_recipe
from testbed.tiny_models import save_tokenizer
from tests.support.edit_families import FAMILIES, family_config, family_model
from tests.support.tiny_edit import tiny_model
from workers.edit import LocalCovarianceCache, run_edit
from workers.edit.architectures import architecture_for, feeding_tensors
from workers.edit.covariance import (
    COMPUTED,
    ObjectStoreCovarianceCache,
    SampleKey,
    covariances,
    feeding_hashes,
    sample_with_statistics,
    sampled_corpus,
)
from workers.tensors import CheckpointReader

# ---- C counted while sampling = C of a full forward pass over the samples ------------------


def _tokenizer() -> Any:
    from testbed.tiny_models import build_tokenizer

    return build_tokenizer()


@torch.no_grad()
def _full_pass_C(model: Any, module: str, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """(1/N) Σ aᵀa in float64 over the first ``tokens`` keys (row after row) of a plain
    full-sequence forward of every row, no cache."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(module).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    try:
        model(input_ids=ids.long(), use_cache=False)
    finally:
        handle.remove()
    a = torch.cat(seen)[:tokens].double()
    return a.T @ a / tokens


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral", "gemma2", "gpt_neox"])
def test_counting_keys_while_sampling_gives_the_C_of_a_full_pass_over_the_samples(family):
    model = family_model(family)
    arch = architecture_for(model.config)
    corpus = sampled_corpus(model, _tokenizer(), seed=3, max_length=16, sampler="m")
    tokens = 5 * 16 + 9  # the last row counts 9 of its 16 tokens

    ids, C, n = sample_with_statistics(corpus, arch, [0, 2], tokens, rows_at_once=4)

    assert n == tokens and ids.shape == (6, 16) and ids.dtype == torch.int32
    for layer in (0, 2):
        expected = _full_pass_C(model, arch.module_name(layer), ids, tokens)
        err = (C[layer].double() - expected).norm() / expected.norm()
        assert err < 1e-5, (layer, float(err))


@torch.no_grad()
def test_sampled_rows_do_not_depend_on_the_batching_and_draw_from_the_top_k():
    model = family_model("llama")
    arch = architecture_for(model.config)
    corpus = sampled_corpus(model, _tokenizer(), seed=7, max_length=16, sampler="m")

    one, _, _ = sample_with_statistics(corpus, arch, [1], 6 * 16, rows_at_once=6)
    two, _, _ = sample_with_statistics(corpus, arch, [1], 6 * 16, rows_at_once=4)
    other_seed = sampled_corpus(model, _tokenizer(), seed=8, max_length=16, sampler="m")
    three, _, _ = sample_with_statistics(other_seed, arch, [1], 6 * 16)

    assert torch.equal(one, two) and not torch.equal(one, three)
    # every sampled token is among the 50 most likely of a full forward pass at its position
    logits = model(input_ids=one.long(), use_cache=False).logits[:, :-1]
    top = logits.topk(50, dim=-1).indices
    assert bool((top == one[:, 1:].long().unsqueeze(-1)).any(-1).all())


# ---- which tensors feed a layer's key -------------------------------------------------------


def _stored_names(model: Any, tmp_path: Path) -> list[str]:
    model.save_pretrained(str(tmp_path))
    with CheckpointReader(tmp_path) as reader:
        return list(reader.names)


def _graph_leaves(model: Any, module: str) -> set[int]:
    """ids of the parameters the key of ``module`` is computed from: the leaves of its
    autograd graph (structural, so a tensor with an exactly cancelling effect still
    counts)."""
    got: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(module).register_forward_pre_hook(
        lambda _m, args: got.setdefault("key", args[0])
    )
    try:
        with torch.enable_grad():
            model(input_ids=torch.tensor([[3, 9, 4, 17, 5, 11]]), use_cache=False)
    finally:
        handle.remove()
    leaves, seen, stack = set(), set(), [got["key"].grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


def _variants() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [(family, {}) for family in FAMILIES]
    out.append(("gpt_neox", {"use_parallel_residual": False}))  # attention feeds the MLP
    return out


@pytest.mark.parametrize(("family", "changes"), _variants())
def test_the_hash_covers_exactly_the_tensors_the_key_is_computed_from(family, changes, tmp_path):
    config = family_config(family)
    for k, v in changes.items():
        setattr(config, k, v)
    model = getattr(transformers, FAMILIES[family][1])(config).eval()
    arch = architecture_for(model.config)
    names = _stored_names(model, tmp_path)
    params = dict(model.named_parameters(remove_duplicate=False))
    # a tensor stored under another name than its parameter (GPT-NeoX's output head is
    # saved as embed_out): the parameters not stored under their own name must feed no key
    renamed = {n: p for n, p in params.items() if n not in names}
    for layer in range(model.config.num_hidden_layers):
        leaves = _graph_leaves(model, arch.module_name(layer))
        expected = sorted(n for n in names if n in params and id(params[n]) in leaves)
        assert not any(id(p) in leaves for p in renamed.values() if not _stored(p, params, names))
        assert feeding_tensors(arch, model.config, names, layer) == expected, layer


def _stored(p: torch.Tensor, params: dict[str, Any], names: list[str]) -> bool:
    """Whether ``p`` is stored under some name (tied weights share one)."""
    return any(params[n] is p for n in names if n in params)


def _rewrite_tensor(folder: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("changed", "kept_layers"),
    [
        ("model.layers.1.mlp.down_proj.weight", {0, 1}),  # the edited projection of layer 1
        ("model.layers.2.self_attn.q_proj.weight", {0, 1}),  # a later layer
        ("model.norm.weight", {0, 1, 2}),  # after every layer
        ("lm_head.weight", {0, 1, 2}),
        ("model.layers.1.mlp.up_proj.weight", {0}),  # feeds layer 1's key
        ("model.layers.0.input_layernorm.weight", set()),
        ("model.embed_tokens.weight", set()),
    ],
)
def test_a_layers_hash_changes_exactly_when_a_tensor_feeding_it_changes(
    changed, kept_layers, tmp_path
):
    config = family_config("llama")
    config.tie_word_embeddings = False
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(str(tmp_path))
    arch = architecture_for(model.config)
    before = feeding_hashes(tmp_path, arch, model.config, [0, 1, 2])

    _rewrite_tensor(tmp_path, changed)
    after = feeding_hashes(tmp_path, arch, model.config, [0, 1, 2])

    assert before is not None and after is not None
    assert {layer for layer in before if before[layer] == after[layer]} == kept_layers


# ---- sequential edits ---------------------------------------------------------------------

FACT = {"prompt": "w5 w6 w7 w8", "subject": "w8", "target_new": "w20 w21"}
QUICK = {"v_num_grad_steps": 3, "v_lr": 0.5, "context_template_counts": [[2, 3]]}


def _edit(model: Path, layer: int, cache: Any, out: Path | None = None) -> dict[str, Any]:
    recipe = parse_edit_recipe(
        {
            "edit_method": "rome",
            "model": str(model),
            "requests": [FACT],
            "hyperparameters": {**QUICK, "layers": [layer]},
            "covariance": {"source": "model_samples", "tokens": 256, "max_length": 16},
            "on_gate_failure": "publish_flagged",
        }
    )
    return run_edit(recipe, out, cache=cache).manifest


def _counts() -> tuple[int, int]:
    return COMPUTED["samples"], COMPUTED["layers"]


def test_sequential_edits_reuse_the_parents_samples_and_every_C_the_edit_did_not_feed(tmp_path):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(str(base))
    save_tokenizer(base)
    cache = LocalCovarianceCache(tmp_path / "cache")
    start = _counts()

    first = _edit(base, 1, cache, tmp_path / "e1")  # samples once, C of layer 1
    _edit(base, 0, cache)  # C of layer 0 over the same samples
    assert _counts() == (start[0] + 1, start[1] + 2)
    assert first["covariance_samples"]["sampler"] == first["model_revision"]

    again = _edit(tmp_path / "e1", 1, cache)  # layer 1's own output projection changed
    earlier = _edit(tmp_path / "e1", 0, cache)
    assert _counts() == (start[0] + 1, start[1] + 2)
    assert again["covariance"][0]["cache"] == earlier["covariance"][0]["cache"] == "hit"
    assert again["covariance_samples"] == first["covariance_samples"]

    later = _edit(tmp_path / "e1", 2, cache)  # fed by the edited layer 1: computed anew
    assert _counts() == (start[0] + 1, start[1] + 3)
    record = later["covariance"][0]
    assert (
        record["cache"] == "miss" and record["corpus_hash"] == first["covariance"][0]["corpus_hash"]
    )

    # that C is the edited model's, over the parent's samples (checked independently)
    where = {k: v for k, v in first["covariance_samples"].items() if k != "corpus_hash"}
    kept = cache.get_samples(SampleKey(**where))
    assert kept is not None
    edited = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "e1")).eval()
    expected = _full_pass_C(edited, "model.layers.2.mlp.down_proj", kept[0], 256)
    got = cache.get(_key(record))
    assert got is not None
    assert torch.allclose(got[0].double(), expected, rtol=1e-4, atol=1e-6)


def _key(record: dict[str, Any]) -> Any:
    from workers.edit.covariance import CovarianceKey

    return CovarianceKey(**record["key"])


def test_kept_samples_round_trip_through_the_object_store_cache(tmp_path):
    cache = ObjectStoreCovarianceCache(LocalObjectStore(tmp_path))
    key = SampleKey("org/m@" + "a" * 40, "model_samples/v2 seed=0", 48)
    ids = torch.randint(0, 100, (3, 16), dtype=torch.int32)

    assert cache.get_samples(key) is None
    cache.put_samples(key, ids, {"corpus_hash": "h"})
    hit = cache.get_samples(key)

    assert hit is not None and torch.equal(hit[0], ids) and hit[1]["corpus_hash"] == "h"
    stored = [i.key for i in LocalObjectStore(tmp_path).list("_cache/covariance/")]
    assert any(k.endswith("provenance.json") and "/samples-" in k for k in stored)
    assert json.loads(
        LocalObjectStore(tmp_path).get_bytes(
            next(k for k in stored if k.endswith("provenance.json"))
        )
    )["key"] == {"sampler": key.sampler, "spec": key.spec, "tokens": 48}


def test_a_parents_samples_count_only_with_the_content_hash_the_parent_recorded(tmp_path):
    model = family_model("llama")
    arch = architecture_for(model.config)
    cache = LocalCovarianceCache(tmp_path)
    parent = sampled_corpus(model, _tokenizer(), seed=1, max_length=16, sampler="parent")
    _, records = covariances(model, arch, [1], parent, 64, model_revision="p", cache=cache)
    recorded = records[0]["corpus_hash"]
    samples = COMPUTED["samples"]

    def child(name: str, parents: Any) -> str:
        corpus = sampled_corpus(
            model, _tokenizer(), seed=1, max_length=16, sampler=name, parents=parents
        )
        _, records = covariances(model, arch, [0], corpus, 64, model_revision=name, cache=cache)
        return str(records[0]["corpus_hash"])

    # naming the parent's revision without its content hash finds nothing: sampled anew
    # (by the same weights, so the same text: sampling is deterministic)
    assert child("child1", [("parent", "0" * 64)]) == recorded
    assert COMPUTED["samples"] == samples + 1
    assert child("child2", [("parent", recorded)]) == recorded
    assert COMPUTED["samples"] == samples + 1


def test_hashing_the_feeding_tensors_honours_a_cancel_and_skips_a_pickle_checkpoint(tmp_path):
    from workers.errors import CancelledError

    model = family_model("llama")
    arch = architecture_for(model.config)
    model.save_pretrained(str(tmp_path / "safe"))
    with pytest.raises(CancelledError):
        feeding_hashes(tmp_path / "safe", arch, model.config, [2], cancelled=lambda: True)

    (tmp_path / "pickle").mkdir()
    torch.save(model.state_dict(), tmp_path / "pickle" / "pytorch_model.bin")
    assert feeding_hashes(tmp_path / "pickle", arch, model.config, [2]) is None


class _Watch:
    def report_inputs(self, *_: Any) -> None:
        pass

    def check(self) -> None:
        pass


def test_an_edited_artifact_input_tells_its_edit_which_samples_its_parent_counted(tmp_path):
    from infra.artifacts import publish_artifact
    from infra.settings import Settings
    from schemas.tenants import TenantAccess
    from workers.edit.engine import parent_samples
    from workers.inputs import resolve_inputs
    from workers.sources import SourceSettings

    objects = LocalObjectStore(tmp_path / "artifacts")
    edited = tmp_path / "edited"
    tiny_model("llama").save_pretrained(str(edited))
    save_tokenizer(edited)
    _edit(edited, 1, LocalCovarianceCache(tmp_path / "cache"), tmp_path / "e1")
    manifest = json.loads((tmp_path / "e1" / "manifest.json").read_text())
    publish_artifact(objects, "acme", "edited", tmp_path / "e1", job_id="job-1")
    recipe = parse_edit_recipe(
        {
            "edit_method": "rome",
            "model": "artifact://edited@1",
            "requests": [FACT],
        }
    )

    resolved = resolve_inputs(
        recipe,
        SourceSettings(),
        Settings(data_dir=tmp_path / "data"),
        objects,
        TenantAccess(tenant_id=1, name="acme", disabled=False),
        tmp_path / "work",
        _Watch(),  # type: ignore[arg-type]
    )["artifact://edited@1"]

    assert not (resolved.path / "manifest.json").exists()  # the folder holds the model only
    samples = manifest["covariance_samples"]
    assert parent_samples(resolved) == ((samples["sampler"], samples["corpus_hash"]),)
