"""Webhooks: job events written to the outbox with their transition, delivered signed
(Standard Webhooks) to a real local HTTP receiver, retried with backoff, logged per attempt,
never delivered twice by racing dispatchers; subscriptions through the API; no delivery to
private addresses unless the operator allows them. On SQLite and PostgreSQL.

Signatures are checked with a verifier written here from the Standard Webhooks spec (plain
hmac/hashlib), independent of service.webhooks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select

from infra.db import ApiKeys, JobStore, make_engine, upgrade_database
from infra.db.webhooks import WebhookAttemptRow, WebhookMessage, WebhookStore
from infra.secrets import SecretBox, new_key
from infra.settings import Settings
from schemas.jobs import ArtifactRef, JobCreate, JobError, JobKind, JobState
from service.webhooks import (
    DispatcherLoop,
    RetryPolicy,
    WebhookDispatcher,
    WebhookUrlRefused,
    check_webhook_url,
)
from testbed.api import merge_job
from tests.support.api import MakeApi

ROOT = Path(__file__).resolve().parent.parent
RECIPE = {
    "merge_method": "linear",
    "models": [
        {"model": "org/a", "parameters": {"weight": 0.5}},
        {"model": "org/b", "parameters": {"weight": 0.5}},
    ],
}


# ---- an independent Standard Webhooks verifier ------------------------------------------------


def verify_standard_webhook(
    secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300
) -> dict[str, Any]:
    """Check a delivery as a receiver would; returns the parsed body or fails the test."""
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret[len("whsec_") :])
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    assert abs(time.time() - int(timestamp)) < tolerance_s, "stale timestamp"
    to_sign = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, to_sign, hashlib.sha256).digest()).decode()
    offered = [part.split(",", 1) for part in headers["webhook-signature"].split(" ")]
    assert any(
        version == "v1" and hmac.compare_digest(sig, expected) for version, sig in offered
    ), "signature does not verify"
    payload: dict[str, Any] = json.loads(body)
    return payload


# ---- a real HTTP receiver --------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()

    @property
    def event(self) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.body)
        return payload


class Receiver:
    """A threading HTTP server on 127.0.0.1 that records every POST and answers the next
    scripted status (200 once the script is used up)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.requests: list[Received] = []
        self.statuses = list(statuses or [])
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    receiver.requests.append(
                        Received(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            time.monotonic(),
                        )
                    )
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait_for(self, n: int, timeout: float = 15) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            assert time.monotonic() < deadline, f"got {len(self.requests)} of {n} requests"
            time.sleep(0.02)
        return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


# ---- database, store, dispatchers ------------------------------------------------------------


@pytest.fixture
def jobs(engine: Engine) -> JobStore:
    return JobStore(engine, max_attempts=3, worker_lost_after=timedelta(seconds=60))


BOX = SecretBox([new_key()])  # seals the signing secrets in the stores these tests make


@pytest.fixture
def hooks(engine: Engine) -> WebhookStore:
    return WebhookStore(engine, BOX)


@pytest.fixture
def tenant(engine: Engine) -> int:
    return ApiKeys(engine).ensure_tenant("acme").id


MakeDispatcher = Callable[..., WebhookDispatcher]


@pytest.fixture
def make_dispatcher(engine: Engine) -> Iterator[MakeDispatcher]:
    made: list[WebhookDispatcher] = []

    def make(
        delays: tuple[float, ...] = (0.05, 0.1),
        *,
        allow_private: bool = True,
        on: Any = None,
        **kwargs: Any,
    ) -> WebhookDispatcher:
        """``on``: another engine (sealing with BOX), or a Service whose database and secret
        box to dispatch from."""
        if on is None or isinstance(on, Engine):
            store = WebhookStore(on if on is not None else engine, BOX)
        else:
            store = WebhookStore(on.engine, on.box)
        d = WebhookDispatcher(
            store,
            timeout_s=5,
            retry=RetryPolicy(delays, jitter=0),
            allow_private=allow_private,
            **kwargs,
        )
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def job_request(callback_url: str | None = None) -> JobCreate:
    return JobCreate(
        kind=JobKind.MERGE, recipe=RECIPE, artifact_name="soup", callback_url=callback_url
    )


def run_to_success(jobs: JobStore, job_id: str) -> None:
    assert jobs.claim(job_id, "w1") is not None
    ref = ArtifactRef(name="soup", version=1, uri="artifact://soup@1")
    assert jobs.finish_succeeded(job_id, ref, worker_id="w1") is not None


def drain(dispatcher: WebhookDispatcher, done: Callable[[], bool], timeout: float = 15) -> None:
    """Run dispatcher rounds until ``done()`` (retries become due as time passes)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "deliveries did not finish in time"
        dispatcher.deliver_all_due()
        time.sleep(0.01)


def messages(engine: Engine) -> list[WebhookMessage]:
    with engine.connect() as conn:
        from sqlalchemy.orm import Session

        with Session(bind=conn) as s:
            return list(s.scalars(select(WebhookMessage).order_by(WebhookMessage.created_at)))


# ---- the outbox --------------------------------------------------------------------------------


def test_a_transition_writes_its_event_to_the_outbox_even_if_no_dispatcher_runs(
    jobs: JobStore, tenant: int, engine: Engine, receiver: Receiver
) -> None:
    job = jobs.create_job(tenant, job_request(receiver.url)).job
    run_to_success(jobs, job.id)

    rows = messages(engine)
    # The callback gets running and the final state (queued is the answer to the POST).
    assert [(m.event_type, m.state, m.attempts) for m in rows] == [
        ("job.running", "pending", 0),
        ("job.succeeded", "pending", 0),
    ]
    final = json.loads(rows[1].body)
    assert final["type"] == "job.succeeded"
    assert final["data"]["id"] == job.id and final["data"]["state"] == "succeeded"
    assert final["data"]["artifact"]["uri"] == "artifact://soup@1"
    assert receiver.requests == []


def test_the_event_is_committed_with_the_transition_by_a_process_that_dies_right_after(
    database_url: str, engine: Engine, tenant: int
) -> None:
    code = f"""
import os
from datetime import timedelta
from infra.db import JobStore, make_engine
from schemas.jobs import ArtifactRef, JobCreate
store = JobStore(make_engine({database_url!r}), max_attempts=3, worker_lost_after=timedelta(60))
job = store.create_job({tenant}, JobCreate.model_validate({{
    "kind": "merge", "recipe": {RECIPE!r}, "artifact_name": "soup",
    "callback_url": "https://hooks.example.com/x"}})).job
store.claim(job.id, "w")
store.finish_succeeded(job.id, ArtifactRef(name="soup", version=1, uri="u"), worker_id="w")
os._exit(0)  # no cleanup, no dispatcher, no flush of anything else
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)

    assert [m.event_type for m in messages(engine)] == ["job.running", "job.succeeded"]


def test_an_event_that_cannot_be_recorded_undoes_its_transition(
    jobs: JobStore, tenant: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = jobs.create_job(tenant, job_request("https://hooks.example.com/x")).job

    def broken(*_: Any) -> int:
        raise RuntimeError("outbox unavailable")

    monkeypatch.setattr("infra.db.jobstore.record_job_event", broken)
    with pytest.raises(RuntimeError):
        jobs.claim(job.id, "w1")

    again = jobs.get(tenant, job.id)
    assert again is not None and (again.state, again.attempts) == ("queued", 0)


def test_subscriptions_get_the_event_types_they_chose(
    jobs: JobStore, hooks: WebhookStore, tenant: int, engine: Engine
) -> None:
    everything = hooks.create_subscription(tenant, "https://a.example.com/", ["job.queued"])
    failures = hooks.create_subscription(tenant, "https://b.example.com/", ["job.failed"])
    other = ApiKeys(engine).ensure_tenant("globex").id
    hooks.create_subscription(other, "https://c.example.com/", ["job.queued", "job.failed"])

    job = jobs.create_job(tenant, job_request()).job
    jobs.finish_failed(job.id, JobError(message="boom"))

    got = {(m.event_type, m.subscription_id) for m in messages(engine)}
    assert got == {("job.queued", everything.id), ("job.failed", failures.id)}


def test_cancel_and_lost_worker_outcomes_are_events_too(
    jobs: JobStore, tenant: int, engine: Engine
) -> None:
    queued = jobs.create_job(tenant, job_request("https://hooks.example.com/q")).job
    jobs.request_cancel(tenant, queued.id)
    # Every worker is taken as lost at once: three takeovers use up the attempts.
    hasty = JobStore(engine, max_attempts=3, worker_lost_after=timedelta(seconds=0))
    lost = hasty.create_job(tenant, job_request("https://hooks.example.com/l")).job
    for worker in ("w1", "w2", "w3"):
        assert hasty.claim(lost.id, worker) is not None
    assert hasty.recover_lost_jobs() == []  # out of attempts: failed, not requeued

    by_url = {(m.url, m.event_type) for m in messages(engine)}
    assert ("https://hooks.example.com/q", "job.cancelled") in by_url
    assert ("https://hooks.example.com/l", "job.failed") in by_url


# ---- delivery and signatures -------------------------------------------------------------------


def test_deliveries_are_signed_per_standard_webhooks(
    jobs: JobStore,
    hooks: WebhookStore,
    tenant: int,
    receiver: Receiver,
    make_dispatcher: MakeDispatcher,
) -> None:
    job = jobs.create_job(tenant, job_request(receiver.url)).job
    run_to_success(jobs, job.id)

    assert make_dispatcher().deliver_all_due() == 2

    secret = hooks.signing_secret(tenant).secret
    got = [verify_standard_webhook(secret, r.headers, r.body) for r in receiver.wait_for(2)]
    # Sent concurrently: in no particular order (the body says which state it announces).
    got.sort(key=lambda e: e["timestamp"])
    assert [e["type"] for e in got] == ["job.running", "job.succeeded"]
    assert all(e["data"]["id"] == job.id for e in got)
    assert [e["data"]["state"] for e in got] == ["running", "succeeded"]
    assert {r.headers["content-type"] for r in receiver.requests} == {"application/json"}
    ids = {r.headers["webhook-id"] for r in receiver.requests}
    assert len(ids) == 2 and all(i.startswith("msg_") for i in ids)
    # A tampered body or another secret does not verify.
    first = receiver.requests[0]
    with pytest.raises(AssertionError, match="signature"):
        verify_standard_webhook(secret, first.headers, first.body.replace(b"job.", b"job.x", 1))
    sub = hooks.create_subscription(tenant, receiver.url, ["job.queued"])
    with pytest.raises(AssertionError, match="signature"):
        verify_standard_webhook(sub.secret, first.headers, first.body)


def test_a_failing_receiver_is_retried_with_growing_delays_under_one_message_id(
    jobs: JobStore,
    hooks: WebhookStore,
    tenant: int,
    receiver: Receiver,
    make_dispatcher: MakeDispatcher,
    engine: Engine,
) -> None:
    receiver.statuses = [500, 503]
    hooks.create_subscription(tenant, receiver.url, ["job.queued"])
    dispatcher = make_dispatcher((0.1, 0.5, 0.5))
    job = jobs.create_job(tenant, job_request()).job

    drain(dispatcher, lambda: messages(engine)[0].state == "succeeded")

    got = receiver.wait_for(3)
    assert len({r.headers["webhook-id"] for r in got}) == 1  # stable across retries
    assert len({r.body for r in got}) == 1  # the same bytes every time
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.5 and gaps[1] > gaps[0]
    log = hooks.deliveries_of_job(tenant, job.id)
    assert len(log) == 1
    assert [(a.attempt, a.status_code) for a in log[0].attempts] == [(1, 500), (2, 503), (3, 200)]
    assert log[0].attempts[0].error is not None and "HTTP 500" in log[0].attempts[0].error
    assert log[0].delivered_at is not None and log[0].next_attempt_at is None


def test_a_receiver_that_never_succeeds_fails_the_delivery_after_the_last_retry(
    jobs: JobStore,
    hooks: WebhookStore,
    tenant: int,
    receiver: Receiver,
    make_dispatcher: MakeDispatcher,
    engine: Engine,
) -> None:
    receiver.statuses = [500] * 10
    sub = hooks.create_subscription(tenant, receiver.url, ["job.queued"])
    jobs.create_job(tenant, job_request())

    drain(make_dispatcher((0.05, 0.05)), lambda: messages(engine)[0].state == "failed")
    time.sleep(0.2)
    make_dispatcher().deliver_all_due()  # nothing is due any more

    assert len(receiver.requests) == 3
    (delivery,) = hooks.deliveries_of_subscription(tenant, sub.id)
    assert delivery.state == "failed" and delivery.next_attempt_at is None
    assert [a.status_code for a in delivery.attempts] == [500, 500, 500]


def test_an_unreachable_receiver_is_recorded_as_an_error_without_status(
    jobs: JobStore, hooks: WebhookStore, tenant: int, make_dispatcher: MakeDispatcher
) -> None:
    dead = Receiver()
    url = dead.url
    dead.close()  # nothing listens there now
    job = jobs.create_job(tenant, job_request(url)).job
    jobs.claim(job.id, "w1")

    make_dispatcher().deliver_all_due()

    (delivery,) = hooks.deliveries_of_job(tenant, job.id)
    (attempt,) = delivery.attempts
    assert attempt.status_code is None and attempt.error and "ConnectError" in attempt.error
    assert delivery.state == "pending" and delivery.next_attempt_at is not None


def test_two_dispatchers_racing_deliver_each_message_once(
    database_url: str,
    jobs: JobStore,
    hooks: WebhookStore,
    tenant: int,
    receiver: Receiver,
    make_dispatcher: MakeDispatcher,
    engine: Engine,
) -> None:
    hooks.create_subscription(tenant, receiver.url, ["job.queued"])
    for _ in range(24):
        jobs.create_job(tenant, job_request())
    engines = [make_engine(database_url), make_engine(database_url)]
    dispatchers = [make_dispatcher(on=e, concurrency=3) for e in engines]
    barrier = threading.Barrier(2)
    counts: list[int] = [0, 0]

    def run(i: int) -> None:
        barrier.wait()
        counts[i] = dispatchers[i].deliver_all_due()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert len(ids) == 24 and len(set(ids)) == 24
    assert sum(counts) == 24
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(WebhookAttemptRow)) == 24
    assert {m.state for m in messages(engine)} == {"succeeded"}
    for e in engines:
        e.dispose()


def test_the_dispatcher_thread_delivers_without_being_asked(
    engine: Engine, jobs: JobStore, tenant: int, receiver: Receiver
) -> None:
    settings = Settings(webhook_allow_private=True, webhook_poll_interval=0.05)
    loop = DispatcherLoop.from_settings(settings, engine)
    loop.start()
    try:
        job = jobs.create_job(tenant, job_request(receiver.url)).job
        jobs.claim(job.id, "w1")
        loop.wake()
        (got,) = receiver.wait_for(1)
    finally:
        loop.stop(timeout=10)
    assert got.event["type"] == "job.running"


def test_deleting_a_subscription_drops_its_pending_deliveries(
    jobs: JobStore,
    hooks: WebhookStore,
    tenant: int,
    receiver: Receiver,
    make_dispatcher: MakeDispatcher,
    engine: Engine,
) -> None:
    sub = hooks.create_subscription(tenant, receiver.url, ["job.queued"])
    jobs.create_job(tenant, job_request())
    assert hooks.delete_subscription(tenant, sub.id)

    assert messages(engine) == []
    assert make_dispatcher().deliver_all_due() == 0


# ---- addresses (SSRF) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[::ffff:a9fe:a9fe]/",  # 169.254.169.254, IPv4-mapped, in hex
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://0.0.0.0/",
        "http://[::]/",
        "http://224.0.0.1/",
        "http://100.64.0.1/",  # carrier-grade NAT
        "http://240.0.0.1/",  # reserved
        "http://[2002:7f00:1::]/",  # 6to4 wrapping 127.0.0.1
        "http://[64:ff9b::a00:1]/",  # NAT64 wrapping 10.0.0.1
        "http://localhost:8000/hook",  # a name resolving to loopback
    ],
)
def test_non_public_addresses_are_refused(url: str) -> None:
    with pytest.raises(WebhookUrlRefused, match="WEIGHTSMITH_WEBHOOK_ALLOW_PRIVATE"):
        check_webhook_url(url, allow_private=False)


def test_a_name_is_refused_if_any_of_its_addresses_is_private() -> None:
    def resolve(host: str, port: int) -> list[str]:
        return {"hooks.example.com": ["93.184.215.14", "10.0.0.7"]}[host]

    with pytest.raises(WebhookUrlRefused, match=r"10\.0\.0\.7"):
        check_webhook_url("https://hooks.example.com/x", allow_private=False, resolve=resolve)


def test_public_addresses_pass_and_other_schemes_do_not() -> None:
    def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("hooks.example.com", 443)
        return ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]

    target = check_webhook_url("https://hooks.example.com/x", allow_private=False, resolve=resolve)
    assert [str(a) for a in target.addresses] == [
        "93.184.215.14",
        "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
    ]
    for bad in ("ftp://hooks.example.com/", "file:///etc/passwd", "gopher://x/"):
        with pytest.raises(WebhookUrlRefused):
            check_webhook_url(bad, allow_private=True)
    assert check_webhook_url("http://127.0.0.1/", allow_private=True).addresses == ()


def test_delivery_connects_to_the_address_that_was_checked(
    jobs: JobStore, tenant: int, make_dispatcher: MakeDispatcher
) -> None:
    """DNS rebinding: the name resolved to a public address at the check; the request must go
    to that address (Host header and TLS name unchanged), not to a fresh lookup's answer."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    dispatcher = make_dispatcher(
        allow_private=False,
        resolve=lambda host, port: ["93.184.215.14"],
        transport=httpx.MockTransport(handler),
    )
    job = jobs.create_job(tenant, job_request("https://hooks.example.com:8443/in")).job
    jobs.claim(job.id, "w1")

    dispatcher.deliver_all_due()

    (request,) = seen
    assert request.url.host == "93.184.215.14" and request.url.port == 8443
    assert request.url.path == "/in"
    assert request.headers["host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"


def test_a_url_that_turned_private_is_refused_at_delivery(
    jobs: JobStore,
    hooks: WebhookStore,
    tenant: int,
    receiver: Receiver,
    make_dispatcher: MakeDispatcher,
) -> None:
    # Stored without the API's check (as by a rebinding name): the dispatcher checks again.
    job = jobs.create_job(tenant, job_request(receiver.url)).job
    jobs.claim(job.id, "w1")

    make_dispatcher(allow_private=False).deliver_all_due()

    assert receiver.requests == []
    (delivery,) = hooks.deliveries_of_job(tenant, job.id)
    error = delivery.attempts[0].error
    assert error is not None and "refused" in error and "loopback" in error


# ---- the API -----------------------------------------------------------------------------------


def test_subscriptions_are_created_listed_and_deleted_with_the_secret_shown_once(
    make_api: MakeApi,
) -> None:
    api = make_api()
    body = {
        "url": "https://93.184.215.14/ws",
        "events": ["job.succeeded", "job.failed"],
        "description": "CI",
    }
    created = api.client.post("/v1/webhooks", json=body, headers=api.headers)
    assert created.status_code == 201, created.text
    sub = created.json()
    assert sub["secret"].startswith("whsec_")
    assert len(base64.b64decode(sub["secret"][len("whsec_") :])) == 32
    assert sub["events"] == ["job.failed", "job.succeeded"] and sub["description"] == "CI"
    assert created.headers["location"] == f"/v1/webhooks/{sub['id']}"

    listed = api.client.get("/v1/webhooks", headers=api.headers).json()["items"]
    assert [s["id"] for s in listed] == [sub["id"]] and "secret" not in listed[0]
    one = api.client.get(f"/v1/webhooks/{sub['id']}", headers=api.headers).json()
    assert "secret" not in one and one["url"] == "https://93.184.215.14/ws"

    assert api.client.delete(f"/v1/webhooks/{sub['id']}", headers=api.headers).status_code == 204
    assert api.client.get(f"/v1/webhooks/{sub['id']}", headers=api.headers).status_code == 404
    assert api.client.get("/v1/webhooks", headers=api.headers).json()["items"] == []


def test_unknown_event_types_and_empty_lists_are_refused(make_api: MakeApi) -> None:
    api = make_api()
    for events, pointer in ((["job.succeeded", "job.exploded"], "/events/1"), ([], "/events")):
        r = api.client.post(
            "/v1/webhooks",
            json={"url": "https://hooks.example.com/", "events": events},
            headers=api.headers,
        )
        assert r.status_code == 422, r.text
        assert [e["pointer"] for e in r.json()["errors"]] == [pointer]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://localhost/",
    ],
)
def test_the_api_refuses_private_webhook_urls_naming_the_field(make_api: MakeApi, url: str) -> None:
    api = make_api()
    r = api.client.post(
        "/v1/webhooks", json={"url": url, "events": ["job.failed"]}, headers=api.headers
    )
    assert r.status_code == 422, r.text
    assert [e["pointer"] for e in r.json()["errors"]] == ["/url"]

    r = api.submit({**merge_job(), "callback_url": url})
    assert r.status_code == 422, r.text
    assert [e["pointer"] for e in r.json()["errors"]] == ["/callback_url"]
    assert api.enqueued == []


def test_another_tenants_subscriptions_and_deliveries_are_not_found(make_api: MakeApi) -> None:
    api = make_api(webhook_allow_private=True)
    sub = api.client.post(
        "/v1/webhooks",
        json={"url": "http://127.0.0.1:9/", "events": ["job.queued"]},
        headers=api.headers,
    ).json()
    job = api.submit().json()
    _, intruder = api.new_tenant()

    assert api.client.get("/v1/webhooks", headers=intruder).json()["items"] == []
    for path in (f"/v1/webhooks/{sub['id']}", f"/v1/webhooks/{sub['id']}/deliveries"):
        assert api.client.get(path, headers=intruder).status_code == 404
    assert api.client.delete(f"/v1/webhooks/{sub['id']}", headers=intruder).status_code == 404
    assert api.client.get(f"/v1/jobs/{job['id']}/deliveries", headers=intruder).status_code == 404
    # Still there for its owner, with the queued event waiting.
    mine = api.client.get(f"/v1/webhooks/{sub['id']}/deliveries", headers=api.headers).json()
    assert [(d["event_type"], d["state"]) for d in mine["items"]] == [("job.queued", "pending")]
    secrets = {
        api.client.get("/v1/webhooks/secret", headers=h).json()["secret"]
        for h in (api.headers, intruder)
    }
    assert len(secrets) == 2  # one callback secret per tenant


def test_a_job_callback_and_a_subscription_through_the_api_deliver_verifiable_events(
    make_api: MakeApi, receiver: Receiver, make_dispatcher: MakeDispatcher
) -> None:
    api = make_api(webhook_allow_private=True)
    secret = api.client.get("/v1/webhooks/secret", headers=api.headers).json()["secret"]
    assert api.client.get("/v1/webhooks/secret", headers=api.headers).json()["secret"] == secret
    sub = api.client.post(
        "/v1/webhooks",
        json={"url": receiver.url + "?sub=1", "events": ["job.queued", "job.succeeded"]},
        headers=api.headers,
    ).json()
    job = api.submit({**merge_job(), "callback_url": receiver.url}).json()
    run_to_success(api.service.jobs, job["id"])

    make_dispatcher(on=api.service).deliver_all_due()

    events = []
    for r in receiver.wait_for(4):
        by_sub = r.path.endswith("?sub=1")
        key = sub["secret"] if by_sub else secret
        events.append((by_sub, verify_standard_webhook(key, r.headers, r.body)["type"]))
    assert sorted(events) == [
        (False, "job.running"),
        (False, "job.succeeded"),
        (True, "job.queued"),
        (True, "job.succeeded"),
    ]
    final = api.client.get(f"/v1/jobs/{job['id']}", headers=api.headers).json()
    delivered = [json.loads(r.body) for r in receiver.requests]
    assert final in [e["data"] for e in delivered if e["type"] == "job.succeeded"]

    log = api.client.get(f"/v1/jobs/{job['id']}/deliveries", headers=api.headers).json()["items"]
    assert len(log) == 4
    assert {d["state"] for d in log} == {"succeeded"}
    assert all(d["attempts"][0]["status_code"] == 200 for d in log)
    assert {d["subscription_id"] for d in log} == {None, sub["id"]}


def test_permanent_failure_is_visible_through_the_api(
    make_api: MakeApi, receiver: Receiver, make_dispatcher: MakeDispatcher
) -> None:
    receiver.statuses = [500] * 10
    api = make_api(webhook_allow_private=True)
    sub = api.client.post(
        "/v1/webhooks", json={"url": receiver.url, "events": ["job.queued"]}, headers=api.headers
    ).json()
    api.submit()
    dispatcher = make_dispatcher((0.05,), on=api.service)

    def failed() -> bool:
        items = api.client.get(f"/v1/webhooks/{sub['id']}/deliveries", headers=api.headers).json()[
            "items"
        ]
        return bool(items) and items[0]["state"] == "failed"

    drain(dispatcher, failed)

    (d,) = api.client.get(f"/v1/webhooks/{sub['id']}/deliveries", headers=api.headers).json()[
        "items"
    ]
    assert d["next_attempt_at"] is None and d["delivered_at"] is None
    assert [(a["attempt"], a["status_code"]) for a in d["attempts"]] == [(1, 500), (2, 500)]
    assert all(a["error"].startswith("HTTP 500") for a in d["attempts"])
    assert all(a["duration_ms"] >= 0 for a in d["attempts"])


def test_job_states_and_event_types_agree() -> None:
    from schemas.webhooks import WebhookEventType

    assert [WebhookEventType.for_state(s).value for s in JobState] == [
        "job.queued",
        "job.running",
        "job.succeeded",
        "job.failed",
        "job.cancelled",
    ]


def test_a_job_run_by_the_embedded_worker_calls_back_when_it_finishes(
    tmp_path: Path, receiver: Receiver, llama_family: dict[str, Path]
) -> None:
    from tests.support.checkpoints import linear
    from workers.embedded import EmbeddedWorker

    settings = Settings(
        data_dir=tmp_path,
        allow_local_paths=True,
        webhook_allow_private=True,
        webhook_poll_interval=30,  # the worker wakes its dispatcher after each job
    )
    upgrade_database(settings.database_url)
    worker = EmbeddedWorker.from_settings(settings)
    tenant = ApiKeys(worker.store.engine).ensure_tenant("acme").id
    request = JobCreate(
        kind=JobKind.MERGE,
        recipe=linear(llama_family["ft1"], llama_family["ft2"]),
        artifact_name="soup",
        callback_url=receiver.url,
    )
    job_id = worker.store.create_job(tenant, request).job.id
    worker.start()  # picks up the queued job
    try:
        got = receiver.wait_for(2, timeout=120)
    finally:
        worker.stop(timeout=30)
        worker.store.engine.dispose()

    box = SecretBox.from_settings(settings)  # the worker's dispatcher seals with this one
    secret = WebhookStore(worker.store.engine, box).signing_secret(tenant).secret
    events = sorted(
        (verify_standard_webhook(secret, r.headers, r.body) for r in got),
        key=lambda e: e["timestamp"],
    )
    assert [(e["type"], e["data"]["id"]) for e in events] == [
        ("job.running", job_id),
        ("job.succeeded", job_id),
    ]
    assert events[1]["data"]["artifact"]["uri"] == "artifact://soup@1"
