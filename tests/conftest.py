import pytest

from tests.hubserver import hub  # noqa: F401
from tests.pg import pg_url  # noqa: F401
from tests.s3server import s3_server  # noqa: F401
from tests.smollm2 import smollm2  # noqa: F401

# ---------------------------------------------------------------------------------------------
# Tiny real checkpoints for the merge tests (builders in tests/models.py). Each fixture
# returns {"base": Path, "ft1": Path, ...}; fine-tunes are the base plus seeded noise.
# tests.models is imported lazily: it pulls in transformers, which tests without models
# should not pay for.


def _models():
    from tests import models

    return models


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """Tiny Llama (4 layers, untied lm_head), single-file: base + ft1, ft2, ft3."""
    return _models().build_family("llama", tmp_path_factory.mktemp("llama_family"), 11, 3)


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory):
    """Tiny GPT-2 (3 layers, tied embeddings, no lm_head.weight on disk): base + ft1, ft2."""
    return _models().build_family("gpt2", tmp_path_factory.mktemp("gpt2_family"), 22, 2)


@pytest.fixture(scope="session")
def sharded_llama_family(tmp_path_factory):
    """Tiny Llama saved in ~100 KB shards (index json + several shards): base + ft1, ft2.

    ft1 uses 200 KB shards, so the inputs' shard boundaries differ.
    """
    return _models().build_family(
        "llama",
        tmp_path_factory.mktemp("sharded_llama_family"),
        33,
        2,
        max_shard_size=_models().SHARDED_SIZE,
        finetune_shard_sizes=["200KB", _models().SHARDED_SIZE],
    )


@pytest.fixture(scope="session")
def bf16_llama_family(tmp_path_factory):
    """Tiny Llama stored in bfloat16, like most real checkpoints: base + ft1, ft2.

    Its task vectors are coarse (many entries of equal magnitude, and exact zeros where the
    noise was below half a bf16 ulp), which pins down tie-breaking at top-k cuts and ranks.
    """
    import torch

    root = tmp_path_factory.mktemp("bf16_llama_family")
    return _models().build_family("llama", root, 44, 2, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def llama_alt_tokenizer(llama_family, tmp_path_factory):
    """A fine-tune of llama_family's base whose tokenizer has a different vocabulary of the
    same size (for tokenizer_source). Returns its Path."""
    return _models().build_finetune(
        llama_family["base"],
        tmp_path_factory.mktemp("llama_alt_tokenizer") / "ft_alt",
        4242,
        shared_seed=11 * 1000,
        tokenizer_variant=1,
    )
