"""The fixtures shared by the test modules: the real servers (testbed/), the database each
API test runs on, the app under test, and tiny real checkpoints.

Builders and checks live in ``tests/support/``; a test module never imports another."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from testbed import Unavailable
from testbed.hub import HubServer
from testbed.postgres import fresh_database
from testbed.s3 import S3Server, start_server, stop_server
from tests.support.api import MakeApi
from tests.support.handmade import FT1_DELTA, FT2_DELTA, base_tensors, shifted, write_model
from tests.support.serve import HUB_ENV, HeldHub, Server, running_serve

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from testbed.api import ApiHarness

# ---- markers --------------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where torch sees a CUDA GPU (skipped, not failed,
    elsewhere); torch is imported only when such a test was collected."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_tests:
        item.add_marker(skip)


# ---- the real servers ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of an empty PostgreSQL database that lives for the test session."""
    try:
        with fresh_database() as url:
            yield url
    except Unavailable as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the test session (see testbed/s3.py)."""
    try:
        server = start_server(tmp_path_factory.mktemp("seaweedfs"))
    except Unavailable as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors checkpoint directory (read-only: copy
    it before changing anything)."""
    from testbed.smollm2 import smollm2_checkpoint

    try:
        return smollm2_checkpoint()
    except Unavailable as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HubServer]:
    """A running fake Hub; ``HF_ENDPOINT`` and huggingface_hub's import-time constants point at it.

    huggingface_hub reads ``HF_ENDPOINT`` (and the cache location) once, at import: the fixture
    sets the variable for subprocesses and patches ``huggingface_hub.constants`` for code that
    relies on the defaults. Code under test should still pass ``endpoint=hub.url`` explicitly.
    ``hub.cache_dir`` is an empty HF cache directory (also the patched default), and tokens from
    the environment or a saved login are hidden. Xet is turned off (uploads go through LFS).
    """
    server = HubServer().start()
    cache_dir = tmp_path_factory.mktemp("hf-cache")
    server.cache_dir = cache_dir
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # this endpoint speaks Git LFS only
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - the server itself needs no huggingface_hub
        constants = None  # type: ignore[assignment]
    if constants is not None:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            server.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        token_dir = tmp_path_factory.mktemp("hf-token")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_dir / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(token_dir / "stored_tokens"))
    try:
        yield server
    finally:
        server.stop()


# ---- the database of each test: SQLite and PostgreSQL ---------------------------------------


@pytest.fixture
def postgres_url(pg_url: str) -> str:
    """The PostgreSQL database ``database_url`` uses: the session's, shared by its tests
    (each test makes its own tenants). A module may override it with one of its own."""
    return pg_url


# The PostgreSQL run of each such test is marked slow: `make test-fast` checks the logic on
# SQLite, `make test` (CI) runs both databases.
DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)]


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The test runs once per database: a new SQLite file in the data directory, then
    PostgreSQL (``postgres_url``)."""
    if request.param == "sqlite":
        (tmp_path / "data").mkdir(exist_ok=True)
        return f"sqlite:///{tmp_path}/data/jobs.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated engine on ``database_url`` with no jobs, keys or tenants in it."""
    from infra.db import make_engine, upgrade_database

    upgrade_database(database_url)
    eng = make_engine(database_url)
    if eng.dialect.name == "postgresql":  # one database per session: start each test empty
        with eng.begin() as conn:
            conn.exec_driver_sql("TRUNCATE jobs, api_keys, tenants RESTART IDENTITY CASCADE")
    yield eng
    eng.dispose()


# ---- the app --------------------------------------------------------------------------------


@pytest.fixture
def make_api(tmp_path: Path, database_url: str, s3_server: S3Server) -> Iterator[MakeApi]:
    """Start the real app with these settings overrides (stopped after), on the test's
    database, local artifacts and no Hub. Its queue records the ids it is handed, unless
    one is given (``queue=``) or ``queue_from_settings`` (Celery with a broker); a
    ``settings_class`` may add settings of its own. Each
    harness has a tenant of its own, granted ``s3://models/`` (testbed/api.py)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from infra.queue import InProcessQueue, JobQueue
    from infra.settings import Settings
    from testbed.api import ApiHarness, models_bucket

    stack: list[TestClient] = []

    def make(
        *,
        queue: JobQueue | None = None,
        queue_from_settings: bool = False,
        settings_class: type[Settings] = Settings,
        **overrides: Any,
    ) -> ApiHarness:
        enqueued: list[str] = []
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "database_url": database_url,
            "object_store_url": f"file://{tmp_path}/artifacts",
            "broker_url": None,
            "hf_endpoint": None,
            "hf_token": None,
            "bootstrap_api_key": None,
            "bootstrap_key_file": None,
            "allow_local_paths": False,
            **overrides,
        }
        settings = settings_class(**values)
        if queue is None and not queue_from_settings:
            queue = InProcessQueue(enqueued.append)
        client = TestClient(create_app(settings, queue=queue), raise_server_exceptions=False)
        client.__enter__()
        stack.append(client)
        harness = ApiHarness(client, settings, enqueued, tmp_path, models=models_bucket(s3_server))
        harness.tenant, harness.headers = harness.new_tenant()
        return harness

    yield make
    for client in reversed(stack):
        client.__exit__(None, None, None)


@pytest.fixture
def api(make_api: MakeApi) -> ApiHarness:
    return make_api()


# ---- weightsmith serve as a process (CLI and client tests) ----------------------------------


@pytest.fixture(scope="module")
def hub_server() -> Iterator[HeldHub]:
    with HeldHub() as hub:
        yield hub


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, hub_server: HeldHub) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("served")
    env = {**HUB_ENV, "HF_ENDPOINT": hub_server.url, "HF_HUB_CACHE": str(root / "hf-cache")}
    with running_serve(root, timeout=90, env=env) as (url, log):
        key = (root / "data" / "bootstrap-api-key").read_text().strip()
        yield Server(url, key, root / "data", log)


# ---- checkpoints -----------------------------------------------------------------------------


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    """tmp_path/models/{base, ft1, ft2}: ft1 = base + 0.5, ft2 = base + 1.5 everywhere."""
    write_model(tmp_path / "models" / "base", base_tensors())
    write_model(tmp_path / "models" / "ft1", shifted(FT1_DELTA))
    write_model(tmp_path / "models" / "ft2", shifted(FT2_DELTA))
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Tiny real checkpoints for the merge tests (builders in testbed/tiny_models.py). Each fixture
# returns {"base": Path, "ft1": Path, ...}; fine-tunes are the base plus seeded noise.
# testbed.tiny_models is imported lazily: it pulls in transformers, which tests without models
# should not pay for.


def _models():
    from testbed import tiny_models as models

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


@pytest.fixture(scope="session")
def llama_small_vocab(llama_family, tmp_path_factory):
    """llama_family's ft2 cut to a vocabulary of 200 tokens of its own (tokenizer variant 2,
    config vocab_size 200): a fine-tune whose vocabulary differs in size. Returns its Path."""
    return _models().build_resized_finetune(
        llama_family["ft2"], tmp_path_factory.mktemp("llama_small_vocab") / "ft_small", 200, 2
    )
