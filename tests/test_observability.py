"""Observability: ``/metrics`` from the job store and Redis, JSON logs, and no secret in any log.

Metric values are compared with figures computed here from the rows the test wrote. The
last test runs the real processes (uvicorn API, Celery worker, PostgreSQL, Redis database 9,
SeaweedFS, a local Hub with a private repo) with secrets configured, at DEBUG level, and
searches everything they logged for those secrets.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from app.main import create_app
from app.metrics import RUN_SECONDS_BUCKETS
from infra.db import make_engine, upgrade_database
from infra.db.models import Job
from infra.liveness import KEY_PREFIX, WorkerBeacon
from infra.logging import (
    JsonFormatter,
    configure_logging,
    log_context,
    redact,
    settings_secrets,
)
from infra.queue import InProcessQueue
from infra.secrets import new_key
from infra.settings import Settings
from schemas.jobs import JobCreate, JobKind
from testbed.api import MERGE_RECIPE
from testbed.postgres import fresh_database

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/9"  # this module's own Redis database
UVICORN = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app"]  # as docker/
WORKER = [sys.executable, "-m", "weightsmith", "worker", "--queues", "default"]


def scrape(
    client: TestClient, **headers: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _redis() -> Any:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({e})", pytrace=False)
    return client


@pytest.fixture(scope="module")
def metrics_db() -> Iterator[str]:
    """A PostgreSQL database of this module's own: metrics count every tenant's jobs."""
    with fresh_database("weightsmith_metrics") as url:
        yield url


@pytest.fixture
def postgres_url(metrics_db: str) -> str:
    """``database_url``'s PostgreSQL database here: this module's own, its jobs table empty."""
    url = metrics_db
    engine = make_engine(url)
    upgrade_database(engine)
    with engine.begin() as conn:  # every test starts from an empty jobs table
        conn.exec_driver_sql("DELETE FROM jobs")
    engine.dispose()
    return url


def make_client(tmp_path: Path, database_url: str, **overrides: Any) -> TestClient:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        object_store_url=f"file://{tmp_path}/artifacts",
        bootstrap_key_file=None,
        **overrides,
    )
    return TestClient(create_app(settings, queue=InProcessQueue(lambda _: None)))


# ---- /metrics: the job store ----------------------------------------------------------------

# (kind, state, run seconds or None when it never started, bytes_done)
JOBS: list[tuple[str, str, float | None, int]] = [
    ("merge", "succeeded", 0.5, 1000),
    ("merge", "succeeded", 42.25, 2500),
    ("merge", "succeeded", 4000.0, 7),
    ("merge", "failed", 3.0, 10),
    ("merge", "cancelled", None, 0),  # cancelled while queued: no run time
    ("merge", "cancelled", 61.0, 99),
    ("merge", "queued", None, 0),
    ("merge", "queued", None, 0),
    ("merge", "running", None, 50),
    ("edit", "succeeded", 15.0, 123456),
    ("edit", "failed", 20000.0, 1),
    ("edit", "running", None, 0),
]


def test_metrics_report_jobs_run_times_and_bytes_from_the_job_store(
    tmp_path: Path, database_url: str
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with make_client(tmp_path, database_url, worker_lost_after=300) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        tenant = service.keys.ensure_tenant("metrics").id
        request = JobCreate(kind=JobKind.MERGE, recipe=MERGE_RECIPE, artifact_name="m")
        heartbeats = {"merge": now - timedelta(seconds=30), "edit": now - timedelta(seconds=900)}
        for i, (kind, state, run_s, nbytes) in enumerate(JOBS):
            job_id = service.jobs.create_job(tenant, request).job.id
            created = now - timedelta(hours=1, seconds=i)
            values: dict[str, Any] = {
                "kind": kind,
                "state": state,
                "bytes_done": nbytes,
                "created_at": created,
            }
            if run_s is not None:
                values["started_at"] = created + timedelta(seconds=5)
                values["finished_at"] = created + timedelta(seconds=5 + run_s)
            elif state in ("succeeded", "failed", "cancelled"):
                values["finished_at"] = created + timedelta(seconds=1)
            if state == "running":
                values["started_at"] = created
                values["heartbeat_at"] = heartbeats[kind]
            with service.engine.begin() as conn:
                conn.execute(update(Job).where(Job.id == job_id).values(**values))
        # A pending submission (key taken, not yet pinned) is no job yet: never counted.
        service.jobs.begin_job(tenant, request, idempotency_key="in-flight")

        samples = scrape(client)

    for kind in ("merge", "edit"):
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            expected = sum(1 for k, s, _, _ in JOBS if (k, s) == (kind, state))
            assert value(samples, "weightsmith_jobs", kind=kind, state=state) == expected
        for state in ("succeeded", "failed", "cancelled"):
            runs = [r for k, s, r, _ in JOBS if (k, s) == (kind, state) and r is not None]
            labels = {"kind": kind, "state": state}
            assert value(samples, "weightsmith_job_run_seconds_count", **labels) == len(runs)
            assert value(samples, "weightsmith_job_run_seconds_sum", **labels) == pytest.approx(
                sum(runs), abs=1e-3
            )
            for bound in RUN_SECONDS_BUCKETS:
                le = str(float(bound))
                assert value(samples, "weightsmith_job_run_seconds_bucket", le=le, **labels) == sum(
                    1 for r in runs if r <= bound
                ), (labels, bound)
        processed = sum(b for k, s, _, b in JOBS if (k, s) == (kind, "succeeded"))
        assert value(samples, "weightsmith_processed_bytes_total", kind=kind) == processed
    assert value(samples, "weightsmith_queue_depth") == 2
    # The oldest queued job is JOBS[6]: created 1 h + 6 s ago.
    assert value(samples, "weightsmith_oldest_queued_job_age_seconds") == pytest.approx(
        3606, abs=10
    )
    # The edit job's heartbeat is 900 s old, past worker_lost_after (300 s): its worker is lost.
    assert value(samples, "weightsmith_running_jobs_stale") == 1
    assert value(samples, "weightsmith_running_job_heartbeat_age_max_seconds") == pytest.approx(
        900, abs=10
    )
    assert value(samples, "weightsmith_metrics_source_up", source="job_store") == 1
    assert ("weightsmith_workers_alive", ()) not in samples  # no Redis broker: not reported


def test_metrics_count_requests_by_route_template(tmp_path: Path) -> None:
    with make_client(tmp_path, f"sqlite:///{tmp_path}/j.db") as client:
        for _ in range(3):
            client.get("/v1/jobs/00000000-0000-0000-0000-000000000000")  # 401: no key
        client.get("/healthz")
        samples = scrape(client)
    route = "/v1/jobs/{job_id}"
    assert (
        value(samples, "weightsmith_http_requests_total", method="GET", route=route, status="401")
        == 3
    )
    assert (
        value(samples, "weightsmith_http_request_duration_seconds_count", method="GET", route=route)
        == 3
    )


def test_metrics_need_the_scrape_token_when_one_is_set(tmp_path: Path) -> None:
    token = "scrape-" + secrets.token_hex(8)
    with make_client(tmp_path, f"sqlite:///{tmp_path}/j.db", metrics_token=token) as client:
        assert client.get("/metrics").status_code == 401
        r = client.get("/metrics", headers={"Authorization": "Bearer wrong-token"})
        assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem")
        assert (
            "weightsmith_jobs"
            in client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).text
        )
    with make_client(tmp_path, f"sqlite:///{tmp_path}/k.db") as client:
        assert client.get("/metrics").status_code == 200  # no token configured: open


# ---- /metrics: Redis (broker queues, worker liveness) ----------------------------------------


def test_metrics_report_broker_queue_lengths_and_live_workers(tmp_path: Path) -> None:
    from infra.queue import CeleryQueue

    r = _redis()
    r.flushdb()
    queue = CeleryQueue(REDIS_URL, gpu_kinds={"edit"})
    for i in range(3):
        queue.enqueue(f"job-{i}", kind="merge")
    queue.enqueue("job-gpu", kind="edit")
    queue.close()
    beacon = WorkerBeacon(REDIS_URL, "w1@test", queues=["default"], interval_s=0.2, ttl_s=2)
    beacon.start()
    # A worker that died: its key is left to expire.
    r.set(KEY_PREFIX + "dead@test", json.dumps({"at": time.time(), "queues": [], "pid": 1}), ex=1)
    try:
        with make_client(tmp_path, f"sqlite:///{tmp_path}/j.db", broker_url=REDIS_URL) as client:
            first = scrape(client)
            time.sleep(1.5)
            later = scrape(client)
            beacon.stop()
            stopped = scrape(client)
    finally:
        beacon.stop()
        r.flushdb()
    assert value(first, "weightsmith_broker_queue_messages", queue="default") == 3
    assert value(first, "weightsmith_broker_queue_messages", queue="gpu") == 1
    assert value(first, "weightsmith_metrics_source_up", source="broker") == 1
    assert value(first, "weightsmith_workers_alive") == 2
    assert value(later, "weightsmith_workers_alive") == 1  # the dead one expired
    age = value(later, "weightsmith_worker_heartbeat_age_seconds", worker="w1@test")
    assert 0 <= age < 1.0  # beats every 0.2 s
    assert value(stopped, "weightsmith_workers_alive") == 0  # a clean stop removes the key


def test_metrics_survive_an_unreachable_broker(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    with make_client(tmp_path, f"sqlite:///{tmp_path}/j.db", broker_url=url) as client:
        samples = scrape(client)
    assert value(samples, "weightsmith_metrics_source_up", source="broker") == 0
    assert value(samples, "weightsmith_metrics_source_up", source="job_store") == 1


# ---- logs ------------------------------------------------------------------------------------


def _capture(settings: Settings) -> tuple[io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = configure_logging(settings, stream=stream)
    return stream, handler


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_json_logs_carry_the_job_and_tenant_of_their_context(
    tmp_path: Path, restore_logging: None
) -> None:
    stream, _ = _capture(Settings(data_dir=tmp_path, log_format="json", log_level="DEBUG"))
    log = logging.getLogger("weightsmith.test")
    log.debug("outside")
    with log_context(job_id="job-1", tenant="acme"):
        log.info("inside %s", "a job")
        try:
            raise ValueError("bad tensor")
        except ValueError:
            log.exception("it failed")
    log.warning("after")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["message"] for e in lines] == ["outside", "inside a job", "it failed", "after"]
    assert [e.get("job_id") for e in lines] == [None, "job-1", "job-1", None]
    assert [e.get("tenant") for e in lines] == [None, "acme", "acme", None]
    assert [e["level"] for e in lines] == ["DEBUG", "INFO", "ERROR", "WARNING"]
    assert {e["logger"] for e in lines} == {"weightsmith.test"}
    assert "ValueError: bad tensor" in lines[2]["exception"]
    assert all(datetime.fromisoformat(e["timestamp"]).tzinfo is not None for e in lines)


def test_text_logs_and_the_level_setting(tmp_path: Path, restore_logging: None) -> None:
    stream, _ = _capture(Settings(data_dir=tmp_path, log_format="text", log_level="WARNING"))
    log = logging.getLogger("weightsmith.test")
    with log_context(job_id="job-7"):
        log.info("hidden")
        log.warning("shown")
    text = stream.getvalue()
    assert "hidden" not in text
    assert "WARNING weightsmith.test [job=job-7]: shown" in text


API_KEY = "wsk_0123456789_" + "5e" * 32
HF_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        (f"Authorization: Bearer {API_KEY}", "Bearer ***", API_KEY[15:]),
        (f"GET /v1/jobs?key={API_KEY}", "wsk_0123456789_***", API_KEY[15:]),
        (f"{{'authorization': 'bearer {HF_TOKEN}'}}", "bearer ***", HF_TOKEN[3:]),
        (f"token={HF_TOKEN} endpoint=hf_endpoint", "hf_endpoint", HF_TOKEN[3:]),
        (
            "https://s3/b/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F20240101"
            "&X-Amz-Signature=0123abcd&X-Amz-Expires=60",
            "X-Amz-Signature=***&X-Amz-Expires=60",
            "0123abcd",
        ),
        ("postgresql://ws:pa55word@db/ws failed", "postgresql://ws:***@db/ws", "pa55word"),
        ("redis://:brokerpass@redis:6379/0", "redis://:***@redis", "brokerpass"),
    ],
)
def test_redaction_hides_secrets_and_keeps_the_rest(text: str, kept: str, gone: str) -> None:
    shown = redact(text)
    assert kept in shown and gone not in shown


def test_configured_secrets_are_redacted_literally_even_in_tracebacks(
    tmp_path: Path, restore_logging: None
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        log_format="json",
        hf_token="plain-token-without-prefix",
        object_store_url="s3://ak:s3cr%2Fet-key@bucket/p?endpoint=http://h:1",
    )
    assert {"plain-token-without-prefix", "s3cr/et-key", "s3cr%2Fet-key"} <= set(
        settings_secrets(settings)
    )
    stream, _ = _capture(settings)
    log = logging.getLogger("weightsmith.test")
    try:
        raise RuntimeError("login with plain-token-without-prefix and s3cr/et-key failed")
    except RuntimeError:
        log.exception("request with %s", "plain-token-without-prefix")
    out = stream.getvalue()
    assert "plain-token-without-prefix" not in out and "s3cr/et-key" not in out
    entry = json.loads(out)
    assert entry["message"] == "request with ***"
    assert "RuntimeError: login with *** and *** failed" in entry["exception"]


def test_the_json_formatter_writes_one_line_per_record() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "two\nlines", None, None)
    line = JsonFormatter().format(record)
    assert "\n" not in line and json.loads(line)["message"] == "two\nlines"


# ---- the real processes: no secret in any log -----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _call(
    url: str, headers: dict[str, str], body: Any = None, method: str | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url,
        data=data,
        headers={**headers, "Content-Type": "application/json"},
        method=method or ("POST" if data is not None else "GET"),
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _problems(log: Path) -> str:
    """The warnings and errors of a JSON log, for a failure message."""
    keep = [line for line in log.read_text().splitlines() if '"level": "WARNING"' in line]
    keep += [line for line in log.read_text().splitlines() if '"level": "ERROR"' in line]
    return "\n".join(keep)[-6000:]


def _stop(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_no_secret_reaches_the_logs_of_the_api_or_the_worker(
    tmp_path: Path, hub: Any, s3_server: Any, llama_family: dict[str, Path]
) -> None:
    r = _redis()
    r.flushdb()
    hf_token = "hf_" + secrets.token_urlsafe(30).replace("-", "a").replace("_", "b")
    api_key = f"wsk_{secrets.token_hex(5)}_{secrets.token_hex(32)}"
    stranger = f"wsk_{secrets.token_hex(5)}_{secrets.token_hex(32)}"  # a key nobody issued
    metrics_token = "metrics-" + secrets.token_hex(16)
    secret_key = new_key()
    operator_token = "hf_" + secrets.token_hex(20)  # configured, never granted: unused
    hub.add_repo("acme/private-ft1", llama_family["ft1"], private_token=hf_token)
    hub.add_repo("acme/private-ft2", llama_family["ft2"], private_token=hf_token)
    port = _free_port()
    with fresh_database("weightsmith_logs") as db_url:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSMITH_")},
            "PYTHONPATH": str(ROOT),
            "WEIGHTSMITH_DATA_DIR": str(tmp_path / "data"),
            "WEIGHTSMITH_DATABASE_URL": db_url,
            "WEIGHTSMITH_BROKER_URL": REDIS_URL,
            "WEIGHTSMITH_OBJECT_STORE_URL": s3_server.url(
                f"logs-{secrets.token_hex(4)}", create_bucket="true"
            ),
            "WEIGHTSMITH_HF_ENDPOINT": hub.url,
            "WEIGHTSMITH_HF_TOKEN": operator_token,
            "WEIGHTSMITH_SECRET_KEYS": secret_key,
            "WEIGHTSMITH_BOOTSTRAP_API_KEY": api_key,
            "WEIGHTSMITH_METRICS_TOKEN": metrics_token,
            "WEIGHTSMITH_LOG_FORMAT": "json",
            "WEIGHTSMITH_LOG_LEVEL": "DEBUG",
            "WEIGHTSMITH_WORKER_HEARTBEAT_INTERVAL": "1",
            "WEIGHTSMITH_WORKER_LOST_AFTER": "5",
            "WEIGHTSMITH_JOB_HARD_TIME_LIMIT": "120",
            "WEIGHTSMITH_VISIBILITY_TIMEOUT": "900",
        }
        upgrade_database(db_url)  # the worker may start before the API has migrated
        api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
        with api_log.open("wb") as out:
            api = subprocess.Popen(
                [*UVICORN, "--host", "127.0.0.1", "--port", str(port)],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        with worker_log.open("wb") as out:
            worker = subprocess.Popen(
                [*WORKER, "--hostname", f"logs-{secrets.token_hex(3)}@%h"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {api_key}"}
        try:
            deadline = time.monotonic() + 90
            while True:
                assert api.poll() is None, api_log.read_text()
                assert time.monotonic() < deadline, api_log.read_text()
                try:
                    urllib.request.urlopen(f"{base}/healthz", timeout=1).close()
                    break
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.2)
            # The tenant's own token reads its private repos (the API stores it sealed).
            status, _ = _call(f"{base}/v1/tenant/hub-token", auth, {"token": hf_token}, "PUT")
            assert status == 204
            recipe = {
                "merge_method": "linear",
                "models": [
                    {"model": "acme/private-ft1", "parameters": {"weight": 0.5}},
                    {"model": "acme/private-ft2", "parameters": {"weight": 0.5}},
                ],
                "seed": 3,
            }
            status, job = _call(
                f"{base}/v1/jobs", auth, {"kind": "merge", "recipe": recipe, "artifact_name": "x"}
            )
            assert status == 202, job
            # Secrets where clients put them by mistake: a query string, an unknown key.
            assert _call(f"{base}/v1/jobs?api_key={api_key}&hf={hf_token}", auth)[0] == 200
            assert _call(f"{base}/v1/jobs", {"Authorization": f"Bearer {stranger}"})[0] == 401
            deadline = time.monotonic() + 180
            while job["state"] in ("queued", "running"):
                assert worker.poll() is None, worker_log.read_text()[-4000:]
                assert time.monotonic() < deadline, worker_log.read_text()[-4000:]
                time.sleep(0.3)
                job = _call(f"{base}/v1/jobs/{job['id']}", auth)[1]
            assert job["state"] == "succeeded", (job["error"], _problems(worker_log))
            # A download redirects to a presigned S3 URL (followed here): signed, never logged.
            manifest = _call(f"{base}/v1/artifacts/x/versions/1", auth)[1]
            first = manifest["files"][0]["path"]
            assert _call(f"{base}/v1/artifacts/x/versions/1/files/{first}", auth)[0] == 200
            assert _call(f"{base}/metrics", {})[0] == 401
            status, text = _call(f"{base}/metrics", {"Authorization": f"Bearer {metrics_token}"})
            assert status == 200
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            assert value(samples, "weightsmith_jobs", kind="merge", state="succeeded") == 1
            assert value(samples, "weightsmith_processed_bytes_total", kind="merge") == float(
                job["progress"]["bytes_done"]
            )
            assert value(samples, "weightsmith_workers_alive") == 1
        finally:
            _stop(worker)
            _stop(api)
            r.flushdb()

    api_text, worker_text = api_log.read_text(), worker_log.read_text()
    for secret in (
        hf_token,
        hf_token[3:],
        api_key,
        api_key.rsplit("_", 1)[1],
        stranger.rsplit("_", 1)[1],
        metrics_token,
        s3_server.secret_key,
        secret_key,
        operator_token,
    ):
        assert secret not in api_text, f"a secret is in the API log: {secret[:6]}…"
        assert secret not in worker_text, f"a secret is in the worker log: {secret[:6]}…"

    # The API logs JSON only; the job's lines name the job and, once authenticated, the tenant.
    api_lines = [json.loads(line) for line in api_text.splitlines() if line.strip()]
    access = [e for e in api_lines if e["logger"] == "uvicorn.access"]
    assert access, "uvicorn's access log went missing"
    mine = [e for e in access if f"/v1/jobs/{job['id']}" in e["message"]]
    assert mine and all(e.get("job_id") == job["id"] for e in mine)
    assert all(e.get("tenant") == "default" for e in mine)
    # The configured key is replaced whole; the token too.
    assert any("/v1/jobs?api_key=***&hf=hf_***" in e["message"] for e in access)
    # The worker's log records are JSON too (Celery's start-up banner is plain text) and its
    # lines about the job carry the job id.
    worker_entries = [json.loads(line) for line in worker_text.splitlines() if line.startswith("{")]
    assert any(
        e.get("job_id") == job["id"] and e["logger"] == "weightsmith.runner" for e in worker_entries
    )
