"""Settings of the weightsmith service and workers: one place, read from the environment.

Every variable starts with ``WEIGHTSMITH_``; the two Hugging Face ones also fall back to the
names ``huggingface_hub`` uses. Durations are in seconds. With no variable set, everything
runs on one machine with no server: a SQLite job store, an in-process worker and a local
artifact directory (the "embedded default"); production sets the URLs.

``WEIGHTSMITH_DATA_DIR``
    Folder for the embedded defaults (SQLite database, artifacts, bootstrap key file).
    Default ``~/.local/share/weightsmith``.
``WEIGHTSMITH_DATABASE_URL``
    Job store, a SQLAlchemy URL: ``postgresql://user:pass@host/db`` (driven by psycopg 3) or
    ``sqlite:///path``. Default ``sqlite:///<data dir>/weightsmith.db``.
``WEIGHTSMITH_BROKER_URL``
    Celery broker, e.g. ``redis://host:6379/0``. Unset: jobs run in an in-process worker.
``WEIGHTSMITH_OBJECT_STORE_URL``
    Where artifacts are published: ``s3://bucket/prefix`` or ``file:///path``.
    Default ``file://<data dir>/artifacts``.
``WEIGHTSMITH_HF_ENDPOINT`` (or ``HF_ENDPOINT``)
    Hugging Face Hub endpoint. Default: the client's own (``https://huggingface.co``).
``WEIGHTSMITH_HF_TOKEN`` (or ``HF_TOKEN``)
    Hub access token for gated or private repositories. Kept secret: never shown in
    ``repr``, ``str`` or logs.
``WEIGHTSMITH_ALLOW_LOCAL_PATHS``
    Whether recipes sent to the service may name local paths on the worker. Default false
    (a client must not read the server's disk); the CLI always allows them.
``WEIGHTSMITH_ALLOW_PICKLE``
    Whether a recipe's ``allow_pickle: true`` is honoured at all. Default false.
``WEIGHTSMITH_MAX_ATTEMPTS``
    Times a job may be started before it is failed (a worker killed by running out of memory
    is redelivered, a transient failure such as an unreachable source is retried; this stops
    the loop). Bad input and programming errors are never retried. Default 3.
``WEIGHTSMITH_JOB_HARD_TIME_LIMIT``
    Seconds after which a running job is killed. Default 21600 (6 hours).
``WEIGHTSMITH_VISIBILITY_TIMEOUT``
    Seconds the broker waits for an acknowledgement before redelivering a task; must exceed
    the hard time limit, or a long job would run twice. Default: hard limit + 10 % (at
    least 10 minutes more).
``WEIGHTSMITH_WORKER_HEARTBEAT_INTERVAL``
    Seconds between a running job's heartbeats (progress updates count). Also the backoff
    before retrying a transient failure, doubled per attempt (at most the lost-after time).
    Default 30.
``WEIGHTSMITH_WORKER_LOST_AFTER``
    Seconds without a heartbeat after which a running job's worker is taken as lost, so a
    redelivered message may start the job again. Also how often the workers sweep for lost
    jobs, and how long a job may stay queued without a message in the broker before it is
    sent again. Default 300; at least twice the interval.
``WEIGHTSMITH_GPU_JOB_KINDS``
    Comma-separated job kinds (``merge``, ``edit``) the API sends to the ``gpu`` queue, where
    GPU workers listen (``weightsmith worker --queues gpu``); the others go to ``default``.
    Default: none (everything on ``default``).
``WEIGHTSMITH_WORKER_DEVICE``
    Where a worker computes the jobs it takes from the ``gpu`` queue, and every job of the
    in-process worker of ``weightsmith serve``: ``auto`` (``cuda`` when torch sees a CUDA
    GPU, else ``cpu``), ``cpu``, ``cuda`` or ``cuda:N``. Jobs from the other queues compute on
    the CPU. ``cuda`` on a machine without a GPU stops ``serve`` at start and fails a Celery
    worker's GPU jobs before any work, naming this variable. Default ``auto``.
``WEIGHTSMITH_AUTH_CACHE_SECONDS``
    How long the API may trust its memory of an API key it has looked up (saves a database
    round trip per request); a key revoked by another process stops working within this
    time. Default 5; 0 asks the database on every request.
``WEIGHTSMITH_WEBHOOK_ALLOW_PRIVATE``
    Whether webhook URLs (a job's ``callback_url``, subscriptions) may point at private,
    loopback, link-local or otherwise non-public addresses. Default false: such URLs are
    refused at submission and again at delivery (the resolved address is the one connected
    to). Turn on only where every receiver is trusted (tests, a closed network).
``WEIGHTSMITH_WEBHOOK_TIMEOUT``
    Seconds a webhook receiver has to connect and answer. Default 10.
``WEIGHTSMITH_WEBHOOK_RETRY_DELAYS``
    Comma-separated seconds to wait before each retry of a failed delivery; their count caps
    the retries (attempts = delays + 1), after which the delivery is failed. Default
    ``5,30,120,600,3600,14400`` (7 attempts over about 5 hours).
``WEIGHTSMITH_WEBHOOK_RETRY_JITTER``
    Each retry delay varies randomly by up to this fraction (0 to 1). Default 0.2.
``WEIGHTSMITH_WEBHOOK_POLL_INTERVAL``
    Seconds between a dispatcher's looks for due deliveries. Default 2.
``WEIGHTSMITH_MAX_BODY_BYTES``
    Largest request body the API reads, in bytes (default 1048576, 1 MiB), for every route
    that does not declare a larger limit of its own (``app.limits.BODY_LIMITS``). A larger
    ``Content-Length`` is answered 413 at once; a streamed body is counted as it arrives and
    answered 413 as soon as it passes the limit (nothing more is read).
``WEIGHTSMITH_BOOTSTRAP_TENANT``
    Tenant that owns the bootstrap API key. Default ``default``.
``WEIGHTSMITH_BOOTSTRAP_API_KEY``
    An API key (``wsk_<prefix>_<secret>``, e.g. from a secret store) registered for the
    bootstrap tenant at service start unless its prefix is already known (a revoked key
    stays revoked). Kept secret.
``WEIGHTSMITH_BOOTSTRAP_KEY_FILE``
    When no bootstrap key is given and the database holds no API key at all, the service
    creates one at start and writes it to this file (mode 0600), so the first user can log
    in; only its prefix is logged. Default ``<data dir>/bootstrap-api-key``; an empty value
    turns this off (then create keys with the CLI).
``WEIGHTSMITH_SECRET_KEYS``
    Comma-separated Fernet keys (``weightsmith secrets new-key``) that encrypt the secrets
    the database keeps: tenants' Hub tokens, S3 grants' secret keys, webhook signing
    secrets. The first key encrypts, all of them decrypt (rotation: put a new key first,
    run ``weightsmith secrets rotate``, then drop the old one). Unset: a key is kept in
    ``<data dir>/secret-key`` (mode 0600), which every process sharing the database must
    then share; set this variable when the API and workers run on different hosts. Kept
    secret.
``WEIGHTSMITH_LOG_FORMAT``
    ``text`` (lines for people, the default) or ``json`` (one JSON object per line, for a
    log collector). API, worker and beat alike; see ``infra.logging``.
``WEIGHTSMITH_LOG_LEVEL``
    ``DEBUG``, ``INFO`` (default), ``WARNING``, ``ERROR`` or ``CRITICAL``.
``WEIGHTSMITH_METRICS_TOKEN``
    When set, ``GET /metrics`` needs ``Authorization: Bearer <this token>`` (a scraper's
    credential, not an API key). Unset: ``/metrics`` is open, like ``/healthz``; keep it
    on an internal network. Kept secret.
``WEIGHTSMITH_MAX_UPLOAD_BYTES``
    Most bytes one upload (``POST /v1/uploads``: a tenant's own checkpoint) may declare in
    all. Default 200000000000 (200 GB). Completing an upload needs this much free space in
    the API's temporary directory (``TMPDIR``) at worst: the files are assembled there,
    verified and published.
``WEIGHTSMITH_MAX_UPLOAD_FILE_BYTES``
    Most bytes one file of an upload may have. Default 50000000000 (50 GB).
``WEIGHTSMITH_MAX_UPLOAD_FILES``
    Most files one upload may declare. Default 1000 (at most 10000).
``WEIGHTSMITH_MERGE_MAX_PARALLELISM``
    Most parts a merge may be split into (a recipe's ``parallelism`` above it is refused,
    422 naming the field; at most 64). Default 8.
``WEIGHTSMITH_MERGE_PARALLEL_ABOVE``
    Bytes of output above which a merge whose recipe gives no ``parallelism`` is split
    anyway, into about one part per this many bytes (at most the maximum above); each part
    is a range of whole output shards, run by any worker (docs/recipes.md, "parallelism").
    Unset (the default): only recipes that ask are split.
``WEIGHTSMITH_MERGE_PARTS_SWEEP_AFTER``
    Seconds after its last write at which a split merge's work files (``_parts/{job}/`` in
    the artifact store) are swept when their job has ended or is unknown: the leftovers of a
    crashed coordinator or of a part still uploading when its job ended. A job that ends
    removes its own at once; every worker's housekeeping (the lost-job sweep) removes the
    rest. Default 3600 (1 hour); 0 sweeps them as soon as their job has ended.
``WEIGHTSMITH_MAX_UPLOAD_CHUNK_BYTES``
    Most bytes one ``PUT /v1/uploads/{id}/files/{path}`` may carry; the route streams the
    body to a temporary file and stops reading past this. Default 67108864 (64 MiB). The
    general request-body limit must let this route's chunks through.
``WEIGHTSMITH_UPLOAD_EXPIRY``
    Seconds after its last write (creation, a chunk, a completion attempt) at which an
    unfinished upload expires; its staged bytes are swept. Default 86400 (24 hours).
``WEIGHTSMITH_MAX_OPEN_UPLOADS``
    Most unpublished, unexpired uploads one tenant may hold at once. Default 16.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.devices import check_device_name
from schemas.limits import MAX_MERGE_PARALLELISM

ENV_PREFIX = "WEIGHTSMITH_"

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)[^@/\s]*@")


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "weightsmith"


def redact_url(url: str) -> str:
    """``scheme://user:secret@host`` → ``scheme://user:***@host``; other URLs unchanged."""
    return _URL_PASSWORD.sub(r"\g<head>***@", url)


def _data_dir(data: dict[str, Any]) -> Path:
    # Defaults derived from the data dir see it validated (it is declared first).
    return Path(data.get("data_dir") or default_data_dir())


def _visibility_default(data: dict[str, Any]) -> int:
    hard = int(data.get("job_hard_time_limit", 0))
    return hard + max(600, hard // 10)


class Settings(BaseSettings):
    """Validated settings; build with ``Settings()`` (reads the environment) or get_settings()."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        validate_default=True,
        validate_by_name=True,
        # A validation error must not echo the input: it holds the token and database URL.
        hide_input_in_errors=True,
    )

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str = Field(default_factory=lambda d: f"sqlite:///{_data_dir(d)}/weightsmith.db")
    broker_url: str | None = None
    object_store_url: str = Field(default_factory=lambda d: f"file://{_data_dir(d)}/artifacts")
    hf_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("WEIGHTSMITH_HF_ENDPOINT", "HF_ENDPOINT")
    )
    hf_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("WEIGHTSMITH_HF_TOKEN", "HF_TOKEN")
    )
    allow_local_paths: bool = False
    allow_pickle: bool = False
    max_attempts: int = Field(default=3, ge=1, le=100)
    job_hard_time_limit: int = Field(default=6 * 3600, ge=1)
    visibility_timeout: int = Field(default_factory=_visibility_default, ge=1)
    worker_heartbeat_interval: int = Field(default=30, ge=1)
    worker_lost_after: int = Field(default=300, ge=1)
    gpu_job_kinds: str = Field(default="", pattern=r"^(|(merge|edit)(,(merge|edit))*)$")
    worker_device: str = "auto"
    auth_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    webhook_allow_private: bool = False
    webhook_timeout: float = Field(default=10.0, gt=0, le=300)
    webhook_retry_delays: str = Field(
        default="5,30,120,600,3600,14400", pattern=r"^\s*(\d+(\.\d+)?\s*(,\s*\d+(\.\d+)?\s*)*)?$"
    )
    webhook_retry_jitter: float = Field(default=0.2, ge=0, le=1)
    webhook_poll_interval: float = Field(default=2.0, gt=0, le=3600)
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30)
    bootstrap_tenant: str = Field(default="default", min_length=1, max_length=100)
    bootstrap_api_key: SecretStr | None = None
    bootstrap_key_file: Path | None = Field(
        default_factory=lambda d: _data_dir(d) / "bootstrap-api-key"
    )

    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    metrics_token: SecretStr | None = None
    secret_keys: SecretStr | None = None
    max_upload_bytes: int = Field(default=200 * 10**9, ge=1)
    max_upload_file_bytes: int = Field(default=50 * 10**9, ge=1)
    max_upload_files: int = Field(default=1000, ge=1, le=10_000)
    max_upload_chunk_bytes: int = Field(default=64 * 2**20, ge=1, le=5 * 2**30)
    upload_expiry: int = Field(default=24 * 3600, ge=1)
    max_open_uploads: int = Field(default=16, ge=1)
    merge_max_parallelism: int = Field(default=8, ge=1, le=MAX_MERGE_PARALLELISM)
    merge_parallel_above: int | None = Field(default=None, ge=1)
    merge_parts_sweep_after: int = Field(default=3600, ge=0)

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_case(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case(cls, v: Any) -> Any:
        return v.strip().upper() if isinstance(v, str) else v

    @field_validator("worker_device", mode="before")
    @classmethod
    def _device_name(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        try:
            return check_device_name(v.strip().lower())
        except ValueError as e:
            raise ValueError(f"{ENV_PREFIX}WORKER_DEVICE: {e}") from None

    @field_validator("data_dir")
    @classmethod
    def _expand_data_dir(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("bootstrap_key_file", mode="before")
    @classmethod
    def _empty_is_off(cls, v: Any) -> Any:
        if isinstance(v, str):
            return Path(v).expanduser() if v.strip() else None
        return v

    @field_validator(
        "broker_url",
        "hf_endpoint",
        "hf_token",
        "bootstrap_api_key",
        "metrics_token",
        "secret_keys",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.visibility_timeout <= self.job_hard_time_limit:
            raise ValueError(
                f"WEIGHTSMITH_VISIBILITY_TIMEOUT ({self.visibility_timeout}s) must be longer than "
                f"WEIGHTSMITH_JOB_HARD_TIME_LIMIT ({self.job_hard_time_limit}s): the broker would "
                "redeliver a job that is still running"
            )
        if self.worker_lost_after < 2 * self.worker_heartbeat_interval:
            raise ValueError(
                f"WEIGHTSMITH_WORKER_LOST_AFTER ({self.worker_lost_after}s) must be at least twice "
                f"WEIGHTSMITH_WORKER_HEARTBEAT_INTERVAL ({self.worker_heartbeat_interval}s), or a "
                "live worker's job could be started again"
            )
        return self

    @property
    def gpu_kinds(self) -> frozenset[str]:
        """Job kinds the API routes to the ``gpu`` queue (WEIGHTSMITH_GPU_JOB_KINDS)."""
        return frozenset(k for k in self.gpu_job_kinds.split(",") if k)

    @property
    def webhook_retry_delays_s(self) -> tuple[float, ...]:
        """``WEIGHTSMITH_WEBHOOK_RETRY_DELAYS`` as numbers (empty: no retry)."""
        return tuple(float(d) for d in self.webhook_retry_delays.split(",") if d.strip())

    @property
    def embedded_worker(self) -> bool:
        """True when no broker is configured: jobs run in a worker inside the service."""
        return self.broker_url is None

    def __repr_args__(self) -> Any:
        # Secrets are SecretStr already; URLs may carry a password in their user info.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if isinstance(value, str) else value


def env_var_names() -> list[str]:
    """Every environment variable this module reads, sorted (e.g. to check compose.yaml)."""
    names: set[str] = set()
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(ENV_PREFIX + field_name.upper())
    return sorted(names)


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once. Tests build ``Settings(...)`` directly instead."""
    return Settings()
