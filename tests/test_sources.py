"""Resolving model references: the Hub (through a local fake Hub endpoint), local paths, others."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from schemas.references import ModelReference, ReferenceKind
from testbed.hub import HubServer
from workers.errors import SourceError
from workers.sources import (
    ResolvedModel,
    SourceSettings,
    SourceUnavailable,
    pin_reference,
    resolve_reference,
    select_files,
)

TOKEN = "hf_testSecretToken1234567890abcdef"
AUX = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
       "special_tokens_map.json"}  # fmt: skip


def write_checkpoint(folder: Path, *, seed: int = 0, shards: int = 1) -> dict[str, torch.Tensor]:
    """A tiny real checkpoint: safetensors weights, config and tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 12, generator=g),
        "model.norm.weight": torch.ones(8),
    }
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(folder / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
              "seed": seed}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    return tensors


def add_junk(folder: Path) -> set[str]:
    """Files a merge never needs (and must never download)."""
    (folder / "training_args.bin").write_bytes(b"\x80\x04" + b"x" * 2_000_000)
    (folder / "optimizer.pt").write_bytes(b"\x80\x04" + b"y" * 500_000)
    (folder / "README.md").write_text("# tiny\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / "original").mkdir()
    save_file({"w": torch.zeros(4)}, str(folder / "original" / "consolidated.safetensors"))
    return {"training_args.bin", "optimizer.pt", "README.md", ".gitattributes",
            "original/consolidated.safetensors"}  # fmt: skip


@pytest.fixture
def settings(hub: HubServer, tmp_path: Path) -> SourceSettings:
    return SourceSettings(hub_endpoint=hub.url, cache_dir=tmp_path / "hf-cache")


def ref(s: str) -> ModelReference:
    return ModelReference.model_validate(s)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- hub: happy paths


def test_main_resolves_to_commit_and_downloads(hub, settings, tmp_path):
    tensors = write_checkpoint(tmp_path / "v1")
    sha = hub.add_repo("org/tiny", tmp_path / "v1")

    resolved = resolve_reference(ref("org/tiny"), settings)

    assert isinstance(resolved, ResolvedModel)
    assert resolved.revision == sha
    assert resolved.pinned == ref(f"org/tiny@{sha}") and resolved.pinned.is_immutable
    assert resolved.reference == ref("org/tiny")
    assert set(resolved.files) == AUX | {"model.safetensors"}
    assert resolved.path.is_dir() and sha in str(resolved.path)
    for name, info in resolved.files.items():
        local = resolved.path / name
        assert local.read_bytes() == (tmp_path / "v1" / name).read_bytes()
        assert info.size == local.stat().st_size
        assert info.sha256 == sha256(local)
    loaded = load_file(str(resolved.path / "model.safetensors"))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)

    # Resolving again uses the cache: no new download.
    hub.reset_requests()
    again = resolve_reference(ref("org/tiny"), settings)
    assert again.files == resolved.files
    assert hub.downloaded("org/tiny") == set()


def test_moved_branch_resolves_to_new_commit_and_old_sha_keeps_old_files(hub, settings, tmp_path):
    write_checkpoint(tmp_path / "v1", seed=1)
    write_checkpoint(tmp_path / "v2", seed=2)
    sha1 = hub.add_repo("org/tiny", tmp_path / "v1")
    assert pin_reference(ref("org/tiny"), settings) == ref(f"org/tiny@{sha1}")
    sha2 = hub.add_repo("org/tiny", tmp_path / "v2")
    assert sha1 != sha2 and hub.commit_of("org/tiny") == sha2

    new = resolve_reference(ref("org/tiny@main"), settings)
    old = resolve_reference(ref(f"org/tiny@{sha1}"), settings)

    assert new.revision == sha2 and old.revision == sha1
    assert json.loads((new.path / "config.json").read_text())["seed"] == 2
    assert json.loads((old.path / "config.json").read_text())["seed"] == 1
    assert (new.path / "model.safetensors").read_bytes() == (
        tmp_path / "v2" / "model.safetensors"
    ).read_bytes()
    assert (old.path / "model.safetensors").read_bytes() == (
        tmp_path / "v1" / "model.safetensors"
    ).read_bytes()
    assert pin_reference(ref("org/tiny"), settings) == ref(f"org/tiny@{sha2}")
    # Every file request named the commit, never the branch.
    resolve_paths = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert resolve_paths and all("/resolve/main/" not in p for p in resolve_paths)


def test_tags_resolve_too(hub, settings, tmp_path):
    write_checkpoint(tmp_path / "v1")
    sha = hub.add_repo("org/tiny", tmp_path / "v1")
    hub.set_ref("org/tiny", "v1.0", sha)
    assert pin_reference(ref("org/tiny@v1.0"), settings).revision == sha


def test_only_needed_files_are_requested(hub, settings, tmp_path):
    write_checkpoint(tmp_path / "repo")
    junk = add_junk(tmp_path / "repo")
    hub.add_repo("org/tiny", tmp_path / "repo")

    resolved = resolve_reference(ref("org/tiny"), settings)

    wanted = AUX | {"model.safetensors"}
    assert set(resolved.files) == wanted
    requested = hub.file_requests("org/tiny")
    assert set(requested) == wanted
    assert not any(j in r.path for r in hub.requests for j in junk)
    assert not any((resolved.path / j).exists() for j in junk)


def test_sharded_checkpoint_fetches_only_the_indexed_shards(hub, settings, tmp_path):
    tensors = write_checkpoint(tmp_path / "repo", shards=2)
    # a duplicate of the weights in another layout, as some repos ship (never needed)
    save_file(tensors, str(tmp_path / "repo" / "consolidated.safetensors"))
    hub.add_repo("org/sharded", tmp_path / "repo")

    resolved = resolve_reference(ref("org/sharded"), settings)

    shards = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert set(resolved.files) == AUX | shards | {"model.safetensors.index.json"}
    assert "consolidated.safetensors" not in hub.file_requests("org/sharded")
    loaded = {}
    for s in shards:
        loaded.update(load_file(str(resolved.path / s)))
    assert set(loaded) == set(tensors)


def test_index_naming_a_missing_shard_is_an_error(hub, settings, tmp_path):
    write_checkpoint(tmp_path / "repo", shards=2)
    (tmp_path / "repo" / "model-00002-of-00002.safetensors").unlink()
    hub.add_repo("org/broken", tmp_path / "repo")
    with pytest.raises(SourceError, match=r"model-00002-of-00002\.safetensors"):
        resolve_reference(ref("org/broken"), settings)


def test_paginated_tree_listing(hub, settings, tmp_path):
    hub.tree_page_size = 2
    write_checkpoint(tmp_path / "repo")
    add_junk(tmp_path / "repo")
    hub.add_repo("org/tiny", tmp_path / "repo")
    resolved = resolve_reference(ref("org/tiny"), settings)
    assert "model.safetensors" in resolved.files
    assert hub.count(path_contains="/tree/") > 2


def test_lfs_files_redirected_to_a_cdn_host(hub, tmp_path):
    hub.lfs_redirect = True
    write_checkpoint(tmp_path / "repo")
    hub.add_repo("org/gated", tmp_path / "repo", gated=True, private_token=TOKEN)
    settings = SourceSettings(hub_endpoint=hub.url, hub_token=TOKEN, cache_dir=tmp_path / "c")

    resolved = resolve_reference(ref("org/gated"), settings)

    assert resolved.files["model.safetensors"].sha256 == sha256(
        tmp_path / "repo" / "model.safetensors"
    )
    cdn = [r for r in hub.requests if r.path.startswith("/_cdn/")]
    assert cdn and all(r.method == "GET" and not r.authorized for r in cdn)


# --------------------------------------------------------------------------- hub: errors


def test_unknown_repo(hub, settings):
    with pytest.raises(SourceError) as info:
        resolve_reference(ref("org/missing"), settings)
    err = info.value
    assert not isinstance(err, SourceUnavailable)
    assert "not found on the Hub" in err.message and "set a token" in err.message
    assert err.model == "org/missing"
    with pytest.raises(SourceError, match="not found on the Hub"):
        pin_reference(ref("org/missing"), settings)


def test_unknown_revision(hub, settings, tmp_path):
    write_checkpoint(tmp_path / "repo")
    hub.add_repo("org/tiny", tmp_path / "repo")
    with pytest.raises(SourceError, match="revision 'nope' not found"):
        resolve_reference(ref("org/tiny@nope"), settings)
    with pytest.raises(SourceError, match="not found"):
        pin_reference(ref("org/tiny@" + "0" * 40), settings)


def test_gated_repo_needs_the_token_and_never_shows_it(hub, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    write_checkpoint(tmp_path / "repo")
    sha = hub.add_repo("org/gated", tmp_path / "repo", gated=True, private_token=TOKEN)
    base = SourceSettings(hub_endpoint=hub.url, cache_dir=tmp_path / "cache")

    with pytest.raises(SourceError) as anonymous:
        resolve_reference(ref("org/gated"), base)
    assert "gated or private" in anonymous.value.message
    assert "token" in anonymous.value.message
    assert not isinstance(anonymous.value, SourceUnavailable)

    wrong = SourceSettings(hub_endpoint=hub.url, hub_token=TOKEN[::-1], cache_dir=base.cache_dir)
    with pytest.raises(SourceError) as denied:
        resolve_reference(ref("org/gated"), wrong)
    assert "gated or private" in denied.value.message
    assert TOKEN[::-1] not in str(denied.value) and TOKEN[::-1] not in repr(wrong)

    good = SourceSettings(hub_endpoint=hub.url, hub_token=TOKEN, cache_dir=base.cache_dir)
    resolved = resolve_reference(ref("org/gated"), good)
    assert resolved.revision == sha and "model.safetensors" in resolved.files
    assert TOKEN not in repr(good) and TOKEN not in repr(resolved)

    out, err = capfd.readouterr()
    logged = caplog.text + out + err + "".join(str(r.args) for r in caplog.records)
    assert caplog.records  # something was logged, and none of it is the token
    assert TOKEN not in logged and TOKEN[::-1] not in logged


def test_private_repo(hub, tmp_path):
    write_checkpoint(tmp_path / "repo")
    hub.add_repo("org/private", tmp_path / "repo", private_token=TOKEN)
    anonymous = SourceSettings(hub_endpoint=hub.url, cache_dir=tmp_path / "cache")
    with pytest.raises(SourceError, match="set a token") as info:
        pin_reference(ref("org/private"), anonymous)
    assert TOKEN not in str(info.value)
    with_token = SourceSettings(hub_endpoint=hub.url, hub_token=TOKEN, cache_dir=tmp_path / "c")
    assert "model.safetensors" in resolve_reference(ref("org/private"), with_token).files


def test_corrupted_lfs_file_is_reported_and_deleted(hub, settings, tmp_path):
    write_checkpoint(tmp_path / "repo")
    hub.add_repo("org/tiny", tmp_path / "repo")
    good = sha256(tmp_path / "repo" / "model.safetensors")
    served = hub.corrupt("org/tiny", "model.safetensors")  # same size, other bytes

    with pytest.raises(SourceUnavailable) as info:
        resolve_reference(ref("org/tiny"), settings)
    err = info.value
    assert isinstance(err, SourceError) and err.retryable
    assert err.file == "model.safetensors" and "model.safetensors" in str(err)
    assert good in err.message and hashlib.sha256(served).hexdigest() in err.message
    blobs = list((settings.cache_dir or tmp_path).rglob("blobs/*"))
    assert all(b.read_bytes() != served for b in blobs if b.is_file())

    hub.restore("org/tiny", "model.safetensors")
    resolved = resolve_reference(ref("org/tiny"), settings)
    assert resolved.files["model.safetensors"].sha256 == good


def test_truncated_lfs_file(hub, settings, tmp_path):
    write_checkpoint(tmp_path / "repo")
    hub.add_repo("org/tiny", tmp_path / "repo")
    data = (tmp_path / "repo" / "model.safetensors").read_bytes()
    hub.corrupt("org/tiny", "model.safetensors", data[:-10])
    with pytest.raises(SourceUnavailable, match=r"model\.safetensors"):
        resolve_reference(ref("org/tiny"), settings)


def test_corrupted_small_file_is_caught_by_its_blob_id(hub, settings, tmp_path):
    write_checkpoint(tmp_path / "repo")
    hub.add_repo("org/tiny", tmp_path / "repo")
    original = (tmp_path / "repo" / "config.json").read_bytes()
    hub.corrupt("org/tiny", "config.json", original.replace(b"llama", b"LLAMA"))
    with pytest.raises(SourceError, match=r"config\.json") as info:
        resolve_reference(ref("org/tiny"), settings)
    assert info.value.file == "config.json"


def test_pickle_only_repo_is_refused_unless_allowed(hub, settings, tmp_path):
    write_checkpoint(tmp_path / "repo")
    (tmp_path / "repo" / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(3)}, tmp_path / "repo" / "pytorch_model.bin")
    (tmp_path / "repo" / "training_args.bin").write_bytes(b"junk")
    hub.add_repo("org/pickle", tmp_path / "repo")

    with pytest.raises(SourceError, match="pickle") as info:
        resolve_reference(ref("org/pickle"), settings)
    assert "allow_pickle" in info.value.message
    assert hub.downloaded("org/pickle") == set()

    allowed = SourceSettings(hub_endpoint=hub.url, cache_dir=settings.cache_dir, allow_pickle=True)
    resolved = resolve_reference(ref("org/pickle"), allowed)
    assert set(resolved.files) == AUX | {"pytorch_model.bin"}
    assert "training_args.bin" not in hub.file_requests("org/pickle")


def test_repo_without_weights(hub, settings, tmp_path):
    hub.add_repo("org/empty", {"README.md": b"# nothing", "config.json": b"{}"})
    with pytest.raises(SourceError, match="no model weights"):
        resolve_reference(ref("org/empty"), settings)


def test_download_size_limit(hub, tmp_path):
    write_checkpoint(tmp_path / "repo")
    hub.add_repo("org/tiny", tmp_path / "repo")
    limited = SourceSettings(hub_endpoint=hub.url, cache_dir=tmp_path / "c", max_download_bytes=10)
    with pytest.raises(SourceError, match="max_download_bytes"):
        resolve_reference(ref("org/tiny"), limited)
    assert hub.downloaded("org/tiny") == set()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_endpoint_is_retryable(tmp_path):
    dead = SourceSettings(hub_endpoint=f"http://127.0.0.1:{_closed_port()}", hub_token=TOKEN,
                          cache_dir=tmp_path / "c")  # fmt: skip
    with pytest.raises(SourceUnavailable) as info:
        resolve_reference(ref("org/tiny"), dead)
    assert info.value.retryable
    assert "could not be reached" in info.value.message
    assert TOKEN not in str(info.value)
    with pytest.raises(SourceUnavailable):
        pin_reference(ref("org/tiny"), dead)


def test_server_error_is_retryable(hub, settings, tmp_path):
    write_checkpoint(tmp_path / "repo")
    hub.add_repo("org/tiny", tmp_path / "repo")
    hub.fail("/api/models/org/tiny", 503, times=1)
    with pytest.raises(SourceUnavailable, match="503"):
        resolve_reference(ref("org/tiny"), settings)
    assert resolve_reference(ref("org/tiny"), settings).files


def test_pinned_model_resolves_from_the_cache_when_the_hub_is_down(hub, tmp_path):
    write_checkpoint(tmp_path / "repo")
    sha = hub.add_repo("org/tiny", tmp_path / "repo")
    cache = tmp_path / "cache"
    first = resolve_reference(
        ref(f"org/tiny@{sha}"), SourceSettings(hub_endpoint=hub.url, cache_dir=cache)
    )
    dead = SourceSettings(hub_endpoint=f"http://127.0.0.1:{_closed_port()}", cache_dir=cache)

    again = resolve_reference(ref(f"org/tiny@{sha}"), dead)
    assert again.files == first.files and again.path == first.path
    with pytest.raises(SourceUnavailable):  # a branch cannot be pinned without the Hub
        resolve_reference(ref("org/tiny"), dead)


def test_pin_reference_downloads_nothing(hub, settings, tmp_path):
    write_checkpoint(tmp_path / "repo")
    sha = hub.add_repo("org/tiny", tmp_path / "repo")
    assert pin_reference(ref("org/tiny"), settings) == ref(f"org/tiny@{sha}")
    assert pin_reference(ref(f"org/tiny@{sha[:10]}"), settings) == ref(f"org/tiny@{sha}")
    assert hub.file_requests("org/tiny") == {}
    for other in ("./local/dir", "s3://bucket/prefix", "artifact://merged@3"):
        assert pin_reference(ref(other), settings) == ref(other)


# --------------------------------------------------------------------------- local paths


def test_local_directory_relative_to_base_dir(tmp_path):
    write_checkpoint(tmp_path / "models" / "a")
    add_junk(tmp_path / "models" / "a")
    resolved = resolve_reference(ref("./models/a"), SourceSettings(), base_dir=tmp_path)
    assert resolved.path == (tmp_path / "models" / "a").resolve()
    assert resolved.revision is None
    assert resolved.pinned == ModelReference(kind=ReferenceKind.LOCAL, location=str(resolved.path))
    assert set(resolved.files) == AUX | {"model.safetensors"}
    assert (
        resolved.files["model.safetensors"].size
        == (resolved.path / "model.safetensors").stat().st_size
    )


def test_local_paths_relative_to_cwd_and_home(tmp_path, monkeypatch):
    write_checkpoint(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    assert resolve_reference(ref("./b"), SourceSettings()).path == (tmp_path / "b").resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_reference(ref("~/b"), SourceSettings()).path == (tmp_path / "b").resolve()


def test_local_single_safetensors_file(tmp_path):
    write_checkpoint(tmp_path / "c")
    resolved = resolve_reference(ref(str(tmp_path / "c" / "model.safetensors")), SourceSettings())
    assert resolved.path == (tmp_path / "c").resolve()
    assert set(resolved.files) == {"model.safetensors"}


def test_local_errors(tmp_path):
    with pytest.raises(SourceError, match="no such file or directory"):
        resolve_reference(ref("./nope"), SourceSettings(), base_dir=tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="not a checkpoint"):
        resolve_reference(ref(str(tmp_path / "notes.txt")), SourceSettings())
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no model weights"):
        resolve_reference(ref(str(tmp_path / "empty")), SourceSettings())
    torch.save({"w": torch.zeros(2)}, tmp_path / "empty" / "pytorch_model.bin")
    with pytest.raises(SourceError, match="pickle"):
        resolve_reference(ref(str(tmp_path / "empty")), SourceSettings())
    allowed = resolve_reference(ref(str(tmp_path / "empty")), SourceSettings(allow_pickle=True))
    assert set(allowed.files) == {"pytorch_model.bin"}


def test_local_paths_disabled(tmp_path):
    write_checkpoint(tmp_path / "d")
    off = SourceSettings(allow_local=False)
    for r in (str(tmp_path / "d"), "./d"):
        with pytest.raises(SourceError, match="local paths are disabled on this server") as info:
            resolve_reference(ref(r), off, base_dir=tmp_path)
        assert "s3://" in info.value.message and "artifact://" in info.value.message
    with pytest.raises(SourceError, match="local paths are disabled"):
        pin_reference(ref("./d"), off)


def test_hub_shaped_reference_to_an_existing_local_directory(hub, tmp_path):
    write_checkpoint(tmp_path / "org" / "tiny", seed=5)
    write_checkpoint(tmp_path / "hub-copy", seed=6)
    sha = hub.add_repo("org/tiny", tmp_path / "hub-copy")
    settings = SourceSettings(hub_endpoint=hub.url, cache_dir=tmp_path / "cache")

    local = resolve_reference(ref("org/tiny"), settings, base_dir=tmp_path)
    assert local.revision is None and local.path == (tmp_path / "org" / "tiny").resolve()
    assert pin_reference(ref("org/tiny"), settings, base_dir=tmp_path) == ref("org/tiny")
    assert hub.requests == []

    # an explicit revision, or local paths disabled, means the Hub
    assert resolve_reference(ref("org/tiny@main"), settings, base_dir=tmp_path).revision == sha
    remote_only = SourceSettings(
        hub_endpoint=hub.url, cache_dir=tmp_path / "cache", allow_local=False
    )
    assert resolve_reference(ref("org/tiny"), remote_only, base_dir=tmp_path).revision == sha


# --------------------------------------------------------------------------- service-only kinds


@pytest.mark.parametrize(
    "raw", ["s3://bucket/models/a", "artifact://merged", "artifact://merged@2"]
)
def test_service_only_references(raw):
    with pytest.raises(SourceError, match="resolves only inside the weightsmith service") as info:
        resolve_reference(ref(raw), SourceSettings())
    assert "submit the recipe as a job" in info.value.message
    assert info.value.model == raw


# --------------------------------------------------------------------------- file selection


def test_select_files_rules():
    def no_index(name):
        raise AssertionError(f"{name} should not be read")

    nested = [
        *("weights.safetensors", "onnx/decoder.safetensors", "original/tokenizer.model"),
        *("tokenizer.model", "qwen.tiktoken", "chat_template.jinja", "optimizer.pt"),
    ]
    sel = select_files(nested, allow_pickle=False, load_index=no_index)
    assert sel.weights == ("weights.safetensors",)
    assert set(sel.aux) == {"tokenizer.model", "qwen.tiktoken", "chat_template.jinja"}

    both = ["model.safetensors", "consolidated.safetensors", "pytorch_model.bin"]
    assert select_files(both, allow_pickle=True, load_index=no_index).weights == (
        "model.safetensors",
    )

    index = {"weight_map": {"a": "pytorch_model-1.bin", "b": "pytorch_model-2.bin"}}
    pickles = ["pytorch_model.bin.index.json", "pytorch_model-1.bin", "pytorch_model-2.bin",
               "training_args.bin"]  # fmt: skip
    sel = select_files(pickles, allow_pickle=True, load_index=lambda name: index)
    assert sel.pickle and sel.weights == (
        "pytorch_model.bin.index.json",
        "pytorch_model-1.bin",
        "pytorch_model-2.bin",
    )
