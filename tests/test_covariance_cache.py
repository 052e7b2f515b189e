"""The covariance cache in object storage (workers.edit.covariance.ObjectStoreCovarianceCache)
and the covariance corpora a service job reads (s3://, artifact://, local paths).

Runs against the local object store and a real S3 server (SeaweedFS, testbed/s3.py);
the model is a tiny random Llama built in the test, so nothing here is slow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from infra.artifacts import publish_artifact
from infra.settings import Settings
from infra.storage import LocalObjectStore
from schemas.edit_recipe import parse_edit_recipe
from schemas.tenants import S3GrantInfo, TenantAccess, normalize_endpoint
from tests.support.stores import make_store
from workers.edit.architectures import architecture_for
from workers.edit.covariance import (
    COMPUTED,
    Corpus,
    CovarianceKey,
    ObjectStoreCovarianceCache,
    covariances,
)
from workers.errors import InputError
from workers.inputs import fetch_corpus

KEY = CovarianceKey("org/model@" + "a" * 40, 3, "c" * 64, 4096)
PROVENANCE = {"model": "org/model", "corpus_source": "text", "tokens_used": 4096}


@pytest.fixture(params=["local", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    return make_store(request.param, request, tmp_path)


def _entry_keys(objects: Any) -> list[str]:
    return sorted(info.key for info in objects.list("_cache/covariance/"))


def test_a_stored_covariance_comes_back_bit_for_bit_with_its_provenance(objects):
    cache = ObjectStoreCovarianceCache(objects)
    C = torch.randn(48, 48, generator=torch.Generator().manual_seed(0))
    assert cache.get(KEY) is None

    cache.put(KEY, C, PROVENANCE)
    hit = cache.get(KEY)

    assert hit is not None
    assert hit[0].dtype == torch.float32 and torch.equal(hit[0], C)
    assert hit[1]["key"] == asdict(KEY) and hit[1]["model"] == "org/model"
    keys = _entry_keys(objects)
    assert len(keys) == 2 and keys[1].endswith("/provenance.json")
    stored = json.loads(objects.get_bytes(keys[1]))
    data = objects.get_bytes(keys[0])
    assert stored["sha256"] == hashlib.sha256(data).hexdigest()
    assert stored["size"] == len(data) and keys[0].endswith(stored["file"])


def test_a_second_writer_of_the_same_key_keeps_the_first_entry(objects):
    cache = ObjectStoreCovarianceCache(objects)
    first, second = torch.eye(8), 2 * torch.eye(8)
    cache.put(KEY, first, PROVENANCE)
    cache.put(KEY, second, PROVENANCE)  # e.g. two jobs computed it concurrently

    hit = cache.get(KEY)
    assert hit is not None and torch.equal(hit[0], first)
    assert len(_entry_keys(objects)) == 2  # the loser removed its own statistic


def test_a_corrupt_entry_is_a_miss_and_is_removed(objects):
    cache = ObjectStoreCovarianceCache(objects)
    cache.put(KEY, torch.eye(8), PROVENANCE)
    data_key = _entry_keys(objects)[0]
    objects.put_bytes(data_key, b"not the bytes the provenance names")

    assert cache.get(KEY) is None
    assert _entry_keys(objects) == []
    cache.put(KEY, torch.eye(8), PROVENANCE)  # recomputed and stored again
    assert cache.get(KEY) is not None


def test_another_key_with_the_same_file_stem_is_not_served(tmp_path):
    cache = ObjectStoreCovarianceCache(LocalObjectStore(tmp_path))
    cache.put(KEY, torch.eye(8), PROVENANCE)
    # same 16-hex prefixes, another full corpus hash: as after a prefix collision
    other = CovarianceKey(KEY.inputs, KEY.layer, "c" * 63 + "d", KEY.tokens)
    assert other.file_stem == KEY.file_stem
    assert cache.get(other) is None


# ---- covariances() through the object-store cache, on a tiny real model --------------------


def _tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _corpus() -> Corpus:
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 64, (4, 12), generator=g) for _ in range(3)]

    def batches(_sampled: Any = None) -> Any:  # a text-like corpus: no sampling steps
        for ids in rows:
            yield ids, torch.ones_like(ids)

    return Corpus("random ids", "e" * 64, batches, "text")


def _expected_C(model: Any, layer: int, tokens: int) -> torch.Tensor:
    """(1/N) Σ aᵀa over the first ``tokens`` inputs of down_proj, by a plain hook."""
    seen: list[torch.Tensor] = []
    handle = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for ids, _ in _corpus().batches():
            model(input_ids=ids)
    handle.remove()
    a = torch.cat(seen)[:tokens].double()
    return (a.T @ a / tokens).float()


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_second_job_reuses_the_cached_covariance_instead_of_recomputing(kind, request, tmp_path):
    model = _tiny_llama()
    arch = architecture_for(model.config)
    revision = "sha256:" + "1" * 64
    cache = ObjectStoreCovarianceCache(make_store(kind, request, tmp_path))
    before = COMPUTED["layers"]

    C1, rec1 = covariances(
        model, arch, [1], _corpus(), 100, model_revision=revision, cache=cache, model_label="t"
    )
    C2, rec2 = covariances(
        model, arch, [1], _corpus(), 100, model_revision=revision, cache=cache, model_label="t"
    )

    assert COMPUTED["layers"] == before + 1  # computed once, read the second time
    assert [r["cache"] for r in rec1 + rec2] == ["miss", "hit"]
    assert rec2[0]["created_at"] == rec1[0]["created_at"]
    assert torch.equal(C1[1], C2[1])
    assert torch.allclose(C1[1], _expected_C(model, 1, 100), rtol=1e-5, atol=1e-6)
    p = rec2[0]
    assert (p["model"], p["model_revision"], p["layer"], p["tokens"]) == ("t", revision, 1, 100)
    assert (p["corpus_source"], p["corpus_hash"], p["tokens_used"]) == ("text", "e" * 64, 100)
    assert {"seed", "created_at", "code_version", "module"} <= set(p)


# ---- covariance corpora of a service job -----------------------------------------------------


class _Watch:
    def check(self) -> None:
        pass


def _recipe(*paths: str) -> Any:
    return parse_edit_recipe(
        {
            "edit_method": "rome",
            "model": "./m",
            "requests": [
                {"prompt": "The capital of Japan is", "subject": "Japan", "target_new": "X"}
            ],
            "covariance": {"source": "text", "paths": list(paths)},
        }
    )


def _publish_text(objects: Any, tmp_path: Path, name: str, text: bytes) -> None:
    folder = tmp_path / f"pub-{name}"
    folder.mkdir()
    (folder / "corpus.txt").write_bytes(text)
    manifest = {
        "kind": "corpus",
        "files": [
            {"path": "corpus.txt", "size": len(text), "sha256": hashlib.sha256(text).hexdigest()}
        ],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    publish_artifact(objects, "acme", name, folder, job_id=f"job-{name}")


CORPORA_BUCKET = "corpora-granted"


def _granted(s3_server) -> TenantAccess:
    """Tenant acme, granted s3://corpora-granted/corpora/ with the server's credentials."""
    grant = S3GrantInfo(
        id="g1",
        bucket=CORPORA_BUCKET,
        prefix="corpora/",
        endpoint=normalize_endpoint(s3_server.endpoint),
        region=s3_server.region,
        credentials="keys",
        access_key_id=s3_server.access_key,
        secret_access_key=s3_server.secret_key,
    )
    return TenantAccess(tenant_id=1, name="acme", disabled=False, s3_grants=(grant,))


def _corpora_bucket(s3_server) -> Any:
    from infra.storage.s3 import S3ObjectStore

    return S3ObjectStore(
        CORPORA_BUCKET,
        endpoint_url=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        create_bucket=True,
    )


def test_corpora_from_s3_an_artifact_and_a_local_path_arrive_byte_for_byte(s3_server, tmp_path):
    text = b"The old bridge was built more than a century ago.\n"
    _corpora_bucket(s3_server).put_bytes("corpora/bridge.txt", text)
    objects = LocalObjectStore(tmp_path / "artifacts")
    _publish_text(objects, tmp_path, "corpora", text)
    local = tmp_path / "local.txt"
    local.write_bytes(text)
    settings = Settings(
        data_dir=tmp_path / "data", object_store_url=s3_server.url("x"), allow_local_paths=True
    )
    recipe = _recipe(
        f"s3://{CORPORA_BUCKET}/corpora/bridge.txt", "artifact://corpora@1/corpus.txt", str(local)
    )

    files = fetch_corpus(
        recipe, settings, objects, _granted(s3_server), tmp_path / "work", _Watch()
    )

    assert [f.read_bytes() for f in files] == [text, text, text]


@pytest.mark.parametrize(
    ("path", "allow_local", "field", "message"),
    [
        ("s3://{granted}/corpora/missing.txt", True, "covariance.paths[0]", "does not exist or"),
        ("s3://{granted}/elsewhere/a.txt", True, "covariance.paths[0]", "does not exist or"),
        ("s3://{bucket}/x/acme/corpora/v1/corpus.txt", True, "covariance.paths[0]", "does not"),
        ("artifact://corpora@1/other.txt", True, "covariance.paths[0]", "has no file 'other.txt'"),
        ("artifact://corpora@7/corpus.txt", True, "covariance.paths[0]", "has no version 7"),
        ("artifact://nothing@1/corpus.txt", True, "covariance.paths[0]", "has no version 1"),
        ("/no/such/corpus.txt", True, "covariance.paths[0]", "does not exist"),
        ("{local}", False, "covariance.paths[0]", "WEIGHTSMITH_ALLOW_LOCAL_PATHS"),
        ("{data}/weightsmith.db", True, "covariance.paths[0]", "service's own data"),
    ],
)
def test_a_missing_or_refused_corpus_is_an_input_error_naming_the_field(
    s3_server, tmp_path, path, allow_local, field, message
):
    objects = LocalObjectStore(tmp_path / "artifacts")
    _publish_text(objects, tmp_path, "corpora", b"some text\n")
    _corpora_bucket(s3_server)
    local = tmp_path / "local.txt"
    local.write_text("some text\n")
    settings = Settings(
        data_dir=tmp_path / "data",
        object_store_url=s3_server.url("x"),
        allow_local_paths=allow_local,
    )
    raw = path.format(
        bucket=s3_server.bucket, granted=CORPORA_BUCKET, local=local, data=tmp_path / "data"
    )
    recipe = _recipe(raw)

    with pytest.raises(InputError) as e:
        fetch_corpus(recipe, settings, objects, _granted(s3_server), tmp_path / "work", _Watch())

    assert e.value.field == field
    assert message in str(e.value)
