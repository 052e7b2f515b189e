"""Settings: embedded defaults, the environment, secrets kept out of sight, consistency."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import infra.settings
from infra.settings import Settings, env_var_names, get_settings, redact_url


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting leaks in from the machine running the tests; HOME is a fresh folder."""
    for name in env_var_names():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    get_settings.cache_clear()


def test_defaults_run_everything_on_one_machine(tmp_path: Path) -> None:
    s = Settings()
    data = tmp_path / "home" / ".local" / "share" / "weightsmith"
    assert s.data_dir == data
    assert s.database_url == f"sqlite:///{data}/weightsmith.db"
    assert s.object_store_url == f"file://{data}/artifacts"
    assert s.broker_url is None and s.embedded_worker
    assert s.hf_endpoint is None and s.hf_token is None
    assert (s.allow_local_paths, s.allow_pickle) == (False, False)
    assert s.max_attempts == 3
    assert s.visibility_timeout > s.job_hard_time_limit
    assert s.bootstrap_tenant == "default" and s.bootstrap_api_key is None
    assert s.bootstrap_key_file == data / "bootstrap-api-key"


def test_every_variable_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = {
        "WEIGHTSMITH_DATA_DIR": str(tmp_path / "data"),
        "WEIGHTSMITH_DATABASE_URL": "postgresql://ws:pw@db:5432/weightsmith",
        "WEIGHTSMITH_BROKER_URL": "redis://redis:6379/0",
        "WEIGHTSMITH_OBJECT_STORE_URL": "s3://artifacts/prod",
        "WEIGHTSMITH_HF_ENDPOINT": "http://127.0.0.1:9999",
        "WEIGHTSMITH_HF_TOKEN": "hf_secret",
        "WEIGHTSMITH_ALLOW_LOCAL_PATHS": "true",
        "WEIGHTSMITH_ALLOW_PICKLE": "1",
        "WEIGHTSMITH_MAX_ATTEMPTS": "5",
        "WEIGHTSMITH_JOB_HARD_TIME_LIMIT": "7200",
        "WEIGHTSMITH_VISIBILITY_TIMEOUT": "9000",
        "WEIGHTSMITH_WORKER_HEARTBEAT_INTERVAL": "10",
        "WEIGHTSMITH_WORKER_LOST_AFTER": "60",
        "WEIGHTSMITH_GPU_JOB_KINDS": "merge,edit",
        "WEIGHTSMITH_WORKER_DEVICE": "CUDA:0",
        "WEIGHTSMITH_AUTH_CACHE_SECONDS": "0.5",
        "WEIGHTSMITH_WEBHOOK_ALLOW_PRIVATE": "true",
        "WEIGHTSMITH_WEBHOOK_TIMEOUT": "3",
        "WEIGHTSMITH_WEBHOOK_RETRY_DELAYS": "1,10,60",
        "WEIGHTSMITH_WEBHOOK_RETRY_JITTER": "0",
        "WEIGHTSMITH_WEBHOOK_POLL_INTERVAL": "0.5",
        "WEIGHTSMITH_BOOTSTRAP_TENANT": "ops",
        "WEIGHTSMITH_BOOTSTRAP_API_KEY": "wsk_0123456789_" + "ab" * 32,
        "WEIGHTSMITH_BOOTSTRAP_KEY_FILE": str(tmp_path / "key"),
        "WEIGHTSMITH_LOG_FORMAT": "JSON",
        "WEIGHTSMITH_LOG_LEVEL": "warning",
        "WEIGHTSMITH_METRICS_TOKEN": "scrape-secret",
        "WEIGHTSMITH_SECRET_KEYS": "key-one,key-two",
        "WEIGHTSMITH_MAX_UPLOAD_BYTES": "1000000",
        "WEIGHTSMITH_MAX_UPLOAD_FILE_BYTES": "500000",
        "WEIGHTSMITH_MAX_UPLOAD_FILES": "20",
        "WEIGHTSMITH_MAX_UPLOAD_CHUNK_BYTES": "4096",
        "WEIGHTSMITH_UPLOAD_EXPIRY": "600",
        "WEIGHTSMITH_MAX_OPEN_UPLOADS": "3",
        "WEIGHTSMITH_MAX_BODY_BYTES": "2097152",
        "WEIGHTSMITH_MERGE_MAX_PARALLELISM": "4",
        "WEIGHTSMITH_MERGE_PARALLEL_ABOVE": "1000000000",
        "WEIGHTSMITH_MERGE_PARTS_SWEEP_AFTER": "120",
    }
    # Every documented WEIGHTSMITH_ variable is exercised here.
    assert {n for n in env_var_names() if n.startswith("WEIGHTSMITH_")} == set(env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert s.data_dir == tmp_path / "data"
    assert s.database_url == env["WEIGHTSMITH_DATABASE_URL"]
    assert s.broker_url == "redis://redis:6379/0" and not s.embedded_worker
    assert s.object_store_url == "s3://artifacts/prod"
    assert s.hf_endpoint == "http://127.0.0.1:9999"
    assert s.hf_token is not None and s.hf_token.get_secret_value() == "hf_secret"
    assert s.allow_local_paths and s.allow_pickle
    assert (s.max_attempts, s.job_hard_time_limit, s.visibility_timeout) == (5, 7200, 9000)
    assert (s.worker_heartbeat_interval, s.worker_lost_after) == (10, 60)
    assert s.gpu_kinds == {"merge", "edit"}
    assert s.worker_device == "cuda:0"  # a name only: whether the GPU exists is checked later
    assert s.auth_cache_seconds == 0.5
    assert s.webhook_allow_private and s.webhook_timeout == 3
    assert s.webhook_retry_delays_s == (1.0, 10.0, 60.0)
    assert (s.webhook_retry_jitter, s.webhook_poll_interval) == (0.0, 0.5)
    assert s.bootstrap_tenant == "ops"
    assert s.bootstrap_api_key is not None
    assert s.bootstrap_api_key.get_secret_value() == env["WEIGHTSMITH_BOOTSTRAP_API_KEY"]
    assert s.bootstrap_key_file == tmp_path / "key"
    assert (s.log_format, s.log_level) == ("json", "WARNING")
    assert s.metrics_token is not None and s.metrics_token.get_secret_value() == "scrape-secret"
    assert s.secret_keys is not None and s.secret_keys.get_secret_value() == "key-one,key-two"
    assert (s.max_upload_bytes, s.max_upload_file_bytes, s.max_upload_files) == (
        10**6,
        5 * 10**5,
        20,
    )
    assert (s.max_upload_chunk_bytes, s.upload_expiry, s.max_open_uploads) == (4096, 600, 3)
    assert s.max_body_bytes == 2 * 1024 * 1024
    assert (s.merge_max_parallelism, s.merge_parallel_above) == (4, 10**9)
    assert s.merge_parts_sweep_after == 120


def test_defaults_follow_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WEIGHTSMITH_DATA_DIR", "~/ws")
    s = Settings()
    home = tmp_path / "home"
    assert s.data_dir == home / "ws"
    assert s.database_url == f"sqlite:///{home}/ws/weightsmith.db"
    assert s.object_store_url == f"file://{home}/ws/artifacts"


def test_hugging_face_variables_fall_back_to_the_hub_clients_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_plain")
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.local")
    s = Settings()
    assert s.hf_token is not None and s.hf_token.get_secret_value() == "hf_plain"
    assert s.hf_endpoint == "http://hub.local"
    monkeypatch.setenv("WEIGHTSMITH_HF_TOKEN", "hf_ours")
    s = Settings()
    assert s.hf_token is not None and s.hf_token.get_secret_value() == "hf_ours"


def test_secrets_never_show_in_repr_str_or_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTSMITH_HF_TOKEN", "hf_topsecret")
    monkeypatch.setenv("WEIGHTSMITH_BOOTSTRAP_API_KEY", "wsk_0123456789_" + "cd" * 32)
    monkeypatch.setenv("WEIGHTSMITH_DATABASE_URL", "postgresql://ws:dbpassword@db/ws")
    monkeypatch.setenv("WEIGHTSMITH_BROKER_URL", "redis://:brokerpass@redis:6379/0")
    s = Settings()
    for shown in (repr(s), str(s)):
        for secret in ("hf_topsecret", "cd" * 32, "dbpassword", "brokerpass"):
            assert secret not in shown
        assert "postgresql://ws:***@db/ws" in shown
    monkeypatch.setenv("WEIGHTSMITH_MAX_ATTEMPTS", "zero")
    with pytest.raises(ValidationError) as err:
        Settings()
    assert "hf_topsecret" not in str(err.value) and "dbpassword" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://u:p%40ss@h:5432/db", "postgresql+psycopg://u:***@h:5432/db"),
        ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
        ("sqlite:////var/lib/ws.db", "sqlite:////var/lib/ws.db"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("https://user@host/x", "https://user@host/x"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_visibility_timeout_must_outlast_the_hard_time_limit() -> None:
    assert Settings(job_hard_time_limit=100).visibility_timeout == 700
    assert Settings(job_hard_time_limit=36000).visibility_timeout == 39600
    with pytest.raises(ValidationError, match="longer than WEIGHTSMITH_JOB_HARD_TIME_LIMIT"):
        Settings(job_hard_time_limit=3600, visibility_timeout=3600)


def test_a_worker_is_not_declared_lost_between_two_heartbeats() -> None:
    with pytest.raises(ValidationError, match="at least twice"):
        Settings(worker_heartbeat_interval=30, worker_lost_after=45)


@pytest.mark.parametrize("name", ["max_attempts", "job_hard_time_limit"])
def test_limits_must_be_positive(name: str) -> None:
    with pytest.raises(ValidationError):
        Settings.model_validate({name: 0})


def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "WEIGHTSMITH_BROKER_URL",
        "WEIGHTSMITH_HF_TOKEN",
        "WEIGHTSMITH_BOOTSTRAP_KEY_FILE",
    ):
        monkeypatch.setenv(name, "")
    s = Settings()
    assert s.broker_url is None and s.hf_token is None and s.bootstrap_key_file is None


def test_every_variable_is_documented_in_the_module_docstring() -> None:
    doc = infra.settings.__doc__ or ""
    names = env_var_names()
    assert names == sorted(set(names))
    missing = [n for n in names if f"``{n}``" not in doc]
    assert missing == []
    assert all(n.startswith("WEIGHTSMITH_") or n.startswith("HF_") for n in names)


def test_get_settings_reads_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTSMITH_MAX_ATTEMPTS", "7")
    first = get_settings()
    monkeypatch.setenv("WEIGHTSMITH_MAX_ATTEMPTS", "8")
    assert get_settings() is first and first.max_attempts == 7


@pytest.mark.parametrize("value", ["gpu", "merge,", "merge;edit", " merge"])
def test_gpu_job_kinds_names_job_kinds(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("WEIGHTSMITH_GPU_JOB_KINDS", value)
    with pytest.raises(ValidationError, match="gpu_job_kinds"):
        Settings()


def test_the_api_routes_gpu_kinds_to_the_gpu_queue() -> None:
    from infra.queue import CeleryQueue
    from service.context import default_queue

    queue = default_queue(Settings(broker_url="redis://127.0.0.1:6379/0", gpu_job_kinds="edit"))
    assert isinstance(queue, CeleryQueue)
    assert (queue.queue_for("edit"), queue.queue_for("merge")) == ("gpu", "default")
    queue.close()
