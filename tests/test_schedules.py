"""Schedules: the API (CRUD, validation, tenants), the cron rules, the fire (idempotent,
only_if_inputs_changed against a local Hub and artifacts), the embedded ticker, and beat
with celery-redbeat in a real Redis (DB 5): entries follow the API, reconcile heals a
flushed Redis, and two beats send one fire.

Runs with real components: SQLite and PostgreSQL, Redis at 127.0.0.1:6379/5, the local Hub
endpoint of testbed/hub.py. No timing is asserted.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from infra.db import Job
from infra.db.schedules import ScheduleStore
from infra.schedules import (
    FIRE_SCHEDULE_TASK,
    LIGHT_QUEUE,
    RedBeatSchedules,
    ScheduleBeat,
    ScheduleTicker,
    entry_name,
    redbeat_config,
)
from schemas.schedules import CronError, parse_cron
from service.scheduling import Scheduling
from testbed.api import MERGE_RECIPE, ApiHarness
from testbed.hub import HubServer
from tests.support.api import MakeApi

REDIS_URL = "redis://127.0.0.1:6379/5"
T0 = datetime(2026, 3, 2, 3, 0, tzinfo=UTC)  # a Monday, 03:00 UTC


def schedule_body(**overrides: Any) -> dict[str, Any]:
    return {"cron": "0 3 * * *", "recipe": MERGE_RECIPE, "artifact_name": "nightly", **overrides}


@pytest.fixture
def redis_db() -> Iterator[Any]:
    """Redis DB 5, empty before and after."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({e}). Start it: redis-server --daemonize "
            'yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no',
            pytrace=False,
        )
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def create(api: ApiHarness, **overrides: Any) -> dict[str, Any]:
    response = api.client.post(
        "/v1/schedules", json=schedule_body(**overrides), headers=api.headers
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def scheduling(api: ApiHarness) -> Scheduling:
    return Scheduling.for_service(api.service)


def runs(api: ApiHarness, schedule_id: str, **params: Any) -> dict[str, Any]:
    response = api.client.get(
        f"/v1/schedules/{schedule_id}/runs", params=params, headers=api.headers
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# ---- cron ---------------------------------------------------------------------------------


def test_cron_times_are_computed_in_utc() -> None:
    daily = parse_cron("0 3 * * *")
    assert daily.next_after(T0) == T0 + timedelta(days=1)
    assert daily.latest_at_or_before(T0 + timedelta(seconds=59)) == T0
    assert daily.latest_at_or_before(T0 - timedelta(minutes=1)) == T0 - timedelta(days=1)
    weekdays = parse_cron("30 9 * * mon-fri")
    friday = datetime(2026, 3, 6, 10, 0, tzinfo=UTC)
    assert weekdays.next_after(friday) == datetime(2026, 3, 9, 9, 30, tzinfo=UTC)
    quarter = parse_cron("*/15 * * * *")
    assert quarter.next_after(T0 + timedelta(minutes=1)) == T0 + timedelta(minutes=15)


def test_both_day_fields_restricted_match_either_day_as_in_cron() -> None:
    # The 13th, or any Friday: 2026-03-06 is a Friday, the 13th of March a Friday too.
    cron = parse_cron("0 0 13 * 5")
    assert cron.next_after(T0) == datetime(2026, 3, 6, tzinfo=UTC)
    assert cron.next_after(datetime(2026, 3, 13, 1, tzinfo=UTC)) == datetime(
        2026, 3, 20, tzinfo=UTC
    )
    assert parse_cron("0 0 13 * *").next_after(T0) == datetime(2026, 3, 13, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0 25 * * *", "cron field 2 (hour) '25': 25 is out of range; valid values are 0-23"),
        ("61 * * * *", "cron field 1 (minute) '61': 61 is out of range; valid values are 0-59"),
        ("* * * foo *", "cron field 4 (month) 'foo': 'foo' is not a number"),
        ("* * * *", "a cron expression has 5 fields"),
        ("*/0 * * * *", "step '0' must be a whole number"),
        ("0 0 30 2 *", "never fires"),
    ],
)
def test_a_bad_cron_expression_names_the_field_and_what_is_valid(text: str, expected: str) -> None:
    with pytest.raises(CronError) as err:
        parse_cron(text)
    assert expected in str(err.value)


# ---- API ----------------------------------------------------------------------------------


def test_schedules_are_created_read_listed_changed_and_deleted(api: ApiHarness) -> None:
    created = create(api)
    assert created["kind"] == "merge" and created["timezone"] == "UTC"
    assert created["enabled"] is True and created["only_if_inputs_changed"] is False
    assert created["next_run_at"] is not None and created["last_run_at"] is None
    sid = created["id"]

    got = api.client.get(f"/v1/schedules/{sid}", headers=api.headers).json()
    assert got["recipe"] == MERGE_RECIPE and got["cron"] == "0 3 * * *"
    assert datetime.fromisoformat(got["next_run_at"]).time().isoformat() == "03:00:00"

    listed = api.client.get("/v1/schedules", headers=api.headers).json()
    assert [s["id"] for s in listed["items"]] == [sid]

    off = api.client.patch(f"/v1/schedules/{sid}", json={"enabled": False}, headers=api.headers)
    assert off.status_code == 200 and off.json()["next_run_at"] is None
    retimed = api.client.patch(
        f"/v1/schedules/{sid}", json={"enabled": True, "cron": "15 4 * * *"}, headers=api.headers
    ).json()
    assert retimed["cron"] == "15 4 * * *"
    assert datetime.fromisoformat(retimed["next_run_at"]).time().isoformat() == "04:15:00"

    assert api.client.delete(f"/v1/schedules/{sid}", headers=api.headers).status_code == 204
    assert api.client.get(f"/v1/schedules/{sid}", headers=api.headers).status_code == 404


def test_a_bad_cron_field_is_refused_with_a_pointer(api: ApiHarness) -> None:
    response = api.client.post(
        "/v1/schedules", json=schedule_body(cron="0 24 * * *"), headers=api.headers
    )
    assert response.status_code == 422
    problem = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert problem["errors"][0]["pointer"] == "/cron"
    assert "field 2 (hour)" in problem["errors"][0]["detail"]
    assert "0-23" in problem["errors"][0]["detail"]


def test_a_bad_recipe_is_refused_as_post_jobs_refuses_it(api: ApiHarness) -> None:
    recipe = {**MERGE_RECIPE, "models": [{"model": "s3://models/math", "parameters": {}}]}
    recipe["merge_method"] = "no-such-method"
    schedule = api.client.post(
        "/v1/schedules", json=schedule_body(recipe=recipe), headers=api.headers
    )
    job = api.submit({"kind": "merge", "recipe": recipe, "artifact_name": "nightly"})
    assert schedule.status_code == job.status_code == 422
    assert schedule.json()["errors"] == job.json()["errors"]
    assert any(e["pointer"].startswith("/recipe") for e in schedule.json()["errors"])


def test_a_local_path_input_is_refused_at_creation(api: ApiHarness) -> None:
    recipe = {**MERGE_RECIPE, "base_model": "/etc/models/base"}
    response = api.client.post(
        "/v1/schedules", json=schedule_body(recipe=recipe), headers=api.headers
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/recipe/base_model"


def test_unknown_ids_and_other_tenants_schedules_are_not_found(api: ApiHarness) -> None:
    sid = create(api)["id"]
    _, other = api.new_tenant()
    for method, path in [
        ("get", f"/v1/schedules/{sid}"),
        ("patch", f"/v1/schedules/{sid}"),
        ("delete", f"/v1/schedules/{sid}"),
        ("get", f"/v1/schedules/{sid}/runs"),
        ("get", "/v1/schedules/no-such-id"),
    ]:
        kwargs: dict[str, Any] = {"json": {"enabled": False}} if method == "patch" else {}
        response = getattr(api.client, method)(path, headers=other, **kwargs)
        assert response.status_code == 404, (method, path)
    assert api.client.get("/v1/schedules", headers=other).json()["items"] == []
    assert api.client.get(f"/v1/schedules/{sid}", headers=api.headers).status_code == 200
    assert api.client.get("/v1/schedules").status_code == 401


# ---- firing -------------------------------------------------------------------------------


def test_a_fire_makes_an_ordinary_job_once_per_scheduled_time(api: ApiHarness) -> None:
    sid = create(api)["id"]
    sched = scheduling(api)
    first = sched.fire(sid, T0)
    again = sched.fire(sid, T0 + timedelta(seconds=30))  # the same cron minute, redelivered
    assert first.run is not None and first.run.outcome == "job" and not first.duplicate
    assert again.duplicate and again.run is not None and again.run.job_id == first.run.job_id
    assert sched.store.count_jobs(sid) == 1
    assert api.enqueued == [first.run.job_id]

    job = api.client.get(f"/v1/jobs/{first.run.job_id}", headers=api.headers).json()
    assert job["schedule_id"] == sid and job["state"] == "queued"
    assert job["artifact_name"] == "nightly"

    second = sched.fire(sid, T0 + timedelta(days=1))
    assert second.run is not None and second.run.job_id != first.run.job_id
    listed = runs(api, sid)["items"]
    assert [r["job_id"] for r in listed] == [second.run.job_id, first.run.job_id]
    assert listed[0]["job"]["id"] == second.run.job_id
    got = api.client.get(f"/v1/schedules/{sid}", headers=api.headers).json()
    assert got["last_outcome"] == "job"
    assert datetime.fromisoformat(got["last_run_at"]) == T0 + timedelta(days=1)


def test_a_disabled_or_deleted_schedule_does_not_fire(api: ApiHarness) -> None:
    sid = create(api, enabled=False)["id"]
    sched = scheduling(api)
    assert sched.fire(sid, T0).run is None
    api.client.delete(f"/v1/schedules/{sid}", headers=api.headers)
    assert sched.fire(sid, T0).run is None
    assert api.enqueued == []


def test_a_fire_whose_input_is_gone_records_a_failed_run(make_api: MakeApi, hub: HubServer) -> None:
    api = make_api(hf_endpoint=hub.url)
    recipe = hub_recipe(hub)
    sid = create(api, recipe=recipe)["id"]
    hub.delete_repo("org/math")
    result = scheduling(api).fire(sid, T0)
    assert result.run is not None and result.run.outcome == "failed"
    assert "org/math" in (result.run.reason or "")
    assert runs(api, sid)["items"][0]["outcome"] == "failed"


def test_runs_are_paged_newest_first(api: ApiHarness) -> None:
    sid = create(api)["id"]
    sched = scheduling(api)
    for day in range(5):
        sched.fire(sid, T0 + timedelta(days=day))
    seen: list[str] = []
    cursor = None
    while True:
        page = runs(api, sid, limit=2, **({"cursor": cursor} if cursor else {}))
        seen += [r["scheduled_for"] for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [datetime.fromisoformat(s) for s in seen] == [
        T0 + timedelta(days=d) for d in range(4, -1, -1)
    ]


def hub_recipe(hub: HubServer) -> dict[str, Any]:
    for repo in ("org/base", "org/math", "org/code"):
        hub.add_repo(repo, {"config.json": repo.encode(), "model.safetensors": b"v1"})
    return {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/math", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "org/code@main", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "seed": 7,
    }


def test_only_if_inputs_changed_follows_hub_branches(make_api: MakeApi, hub: HubServer) -> None:
    api = make_api(hf_endpoint=hub.url)
    sid = create(api, recipe=hub_recipe(hub), only_if_inputs_changed=True)["id"]
    sched = scheduling(api)

    first = sched.fire(sid, T0)
    assert first.run is not None and first.run.outcome == "job"
    assert first.run.input_fingerprint is not None
    assert first.run.input_fingerprint["inputs"]["org/math"] == (
        f"org/math@{hub.commit_of('org/math')}"
    )

    unchanged = sched.fire(sid, T0 + timedelta(days=1))
    assert unchanged.run is not None and unchanged.run.outcome == "skipped"
    assert unchanged.run.reason == f"inputs unchanged since job {first.run.job_id}"

    new_sha = hub.add_repo("org/code", {"config.json": b"org/code", "model.safetensors": b"v2"})
    moved = sched.fire(sid, T0 + timedelta(days=2))
    assert moved.run is not None and moved.run.outcome == "job"
    job = api.client.get(f"/v1/jobs/{moved.run.job_id}", headers=api.headers).json()
    assert job["recipe"]["models"][1]["model"] == f"org/code@{new_sha}"

    listed = runs(api, sid)["items"]
    assert [r["outcome"] for r in listed] == ["job", "skipped", "job"]
    assert listed[1]["reason"] == f"inputs unchanged since job {first.run.job_id}"
    assert listed[1]["job"] is None
    assert sched.store.count_jobs(sid) == 2


def test_only_if_inputs_changed_follows_artifact_versions(api: ApiHarness) -> None:
    api.publish("parent", {"model.safetensors": b"one"})
    recipe = {**MERGE_RECIPE, "base_model": "artifact://parent"}
    sid = create(api, recipe=recipe, only_if_inputs_changed=True)["id"]
    sched = scheduling(api)

    first = sched.fire(sid, T0)
    assert first.run is not None and first.run.outcome == "job"
    # s3:// inputs have no version: the fingerprint says so, and such a schedule always runs.
    assert first.run.input_fingerprint is not None
    assert first.run.input_fingerprint["inputs"]["artifact://parent"] == "artifact://parent@1"
    assert first.run.input_fingerprint["unversioned"] == ["s3://models/code", "s3://models/math"]
    assert sched.fire(sid, T0 + timedelta(days=1)).run.outcome == "job"  # type: ignore[union-attr]


def test_only_if_inputs_changed_skips_until_a_new_artifact_version(api: ApiHarness) -> None:
    api.publish("parent", {"model.safetensors": b"one"})
    api.publish("donor", {"model.safetensors": b"two"})
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": "artifact://parent", "parameters": {"weight": 0.5}},
            {"model": "artifact://donor@latest", "parameters": {"weight": 0.5}},
        ],
    }
    sid = create(api, recipe=recipe, only_if_inputs_changed=True)["id"]
    sched = scheduling(api)

    first = sched.fire(sid, T0)
    skipped = sched.fire(sid, T0 + timedelta(days=1))
    assert skipped.run is not None and skipped.run.outcome == "skipped"
    api.publish("parent", {"model.safetensors": b"three"})
    second = sched.fire(sid, T0 + timedelta(days=2))
    assert first.run is not None and second.run is not None and second.run.outcome == "job"
    job = api.client.get(f"/v1/jobs/{second.run.job_id}", headers=api.headers).json()
    assert job["recipe"]["models"][0]["model"] == "artifact://parent@2"
    assert [r["outcome"] for r in runs(api, sid)["items"]] == ["job", "skipped", "job"]


def test_the_celery_task_fires_through_the_same_path(
    api: ApiHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import schedule_tasks

    sid = create(api)["id"]
    sched = scheduling(api)
    monkeypatch.setattr(schedule_tasks, "_scheduling_for", lambda pid: sched)
    first = schedule_tasks.fire_schedule.run(sid, T0.isoformat())
    again = schedule_tasks.fire_schedule.run(sid, T0.isoformat())
    assert first["outcome"] == "job" and again["duplicate"] is True
    assert again["job_id"] == first["job_id"] and api.enqueued == [first["job_id"]]


def test_the_embedded_ticker_fires_due_schedules_once(api: ApiHarness) -> None:
    sid = create(api, cron="*/5 * * * *")["id"]
    sched = scheduling(api)
    fired: list[tuple[str, datetime]] = []

    def fire(schedule_id: str, when: datetime) -> None:
        fired.append((schedule_id, when))
        sched.fire(schedule_id, when)

    ticker = ScheduleTicker(sched.store, fire)
    next_run = sched.store.get_with_tenant(sid)[0].next_run_at  # type: ignore[index]
    assert next_run is not None
    assert ticker.tick(next_run - timedelta(seconds=1)) == []
    assert ticker.tick(next_run + timedelta(seconds=10)) == [sid]
    assert ticker.tick(next_run + timedelta(seconds=20)) == []  # moved on to the next time
    assert fired == [(sid, next_run)]
    assert sched.store.count_jobs(sid) == 1


# ---- beat (celery-redbeat in Redis) ------------------------------------------------------


def beat_app() -> Any:
    from celery import Celery

    app = Celery("schedules-test", broker=REDIS_URL, set_as_current=False)
    app.conf.update(
        redbeat_config(REDIS_URL),
        result_expires=None,  # no backend-cleanup entry
        task_routes={FIRE_SCHEDULE_TASK: {"queue": LIGHT_QUEUE}},
    )
    return app


def entry_key(schedule_id: str, part: str = "") -> str:
    return "weightsmith:redbeat:" + entry_name(schedule_id, part)


def test_the_api_keeps_redbeat_entries_in_step(make_api: MakeApi, redis_db: Any) -> None:
    api = make_api(broker_url=REDIS_URL)
    sid = create(api)["id"]
    definition = json.loads(redis_db.hget(entry_key(sid), "definition"))
    assert definition["task"] == FIRE_SCHEDULE_TASK and definition["args"] == [sid]
    assert definition["options"] == {"queue": LIGHT_QUEUE}
    assert definition["schedule"]["minute"] == "0" and definition["schedule"]["hour"] == "3"
    due = redis_db.zscore("weightsmith:redbeat::schedule", entry_key(sid))
    assert datetime.fromtimestamp(due, UTC) > datetime.now(UTC)  # not fired at creation

    api.client.patch(f"/v1/schedules/{sid}", json={"cron": "0 0 13 * 5"}, headers=api.headers)
    assert not redis_db.exists(entry_key(sid))
    assert redis_db.exists(entry_key(sid, "dom")) and redis_db.exists(entry_key(sid, "dow"))

    api.client.patch(f"/v1/schedules/{sid}", json={"enabled": False}, headers=api.headers)
    assert redis_db.keys("weightsmith:redbeat:weightsmith.schedule.*") == []
    api.client.patch(f"/v1/schedules/{sid}", json={"enabled": True}, headers=api.headers)
    assert redis_db.exists(entry_key(sid, "dom"))

    assert api.client.delete(f"/v1/schedules/{sid}", headers=api.headers).status_code == 204
    assert redis_db.keys("weightsmith:redbeat:weightsmith.schedule.*") == []
    assert redis_db.zcard("weightsmith:redbeat::schedule") == 0


def test_reconcile_restores_a_flushed_redis_from_the_database(
    make_api: MakeApi, redis_db: Any
) -> None:
    api = make_api(broker_url=REDIS_URL)
    kept = create(api)["id"]
    off = create(api, enabled=False)["id"]
    redis_db.flushdb()
    stray = RedBeatSchedules.for_url(REDIS_URL)
    stray.put(
        SimpleNamespace(id="gone", enabled=True, cron="* * * * *")  # type: ignore[arg-type]
    )

    store = ScheduleStore(api.service.engine)  # (on PostgreSQL, other tests' schedules too)
    report = RedBeatSchedules.for_url(REDIS_URL).reconcile(store.enabled_schedules())
    assert entry_key(kept) in report.written and report.removed == [entry_key("gone")]
    assert redis_db.exists(entry_key(kept)) and not redis_db.exists(entry_key(off))
    assert not redis_db.exists(entry_key("gone"))

    meta_before = redis_db.hget(entry_key(kept), "meta")
    again = RedBeatSchedules.for_url(REDIS_URL).reconcile(store.enabled_schedules())
    assert again.written == [] and again.removed == [] and again.unchanged >= 1
    assert redis_db.hget(entry_key(kept), "meta") == meta_before  # last run time kept


def _messages(redis_db: Any) -> list[dict[str, Any]]:
    out = []
    for raw in redis_db.lrange(LIGHT_QUEUE, 0, -1):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        out.append({"task": message["headers"]["task"], "args": args, "kwargs": kwargs})
    return out


def test_two_beats_send_one_fire_and_it_makes_one_job(make_api: MakeApi, redis_db: Any) -> None:
    from redbeat import RedBeatSchedulerEntry
    from redbeat.schedulers import acquire_distributed_beat_lock

    api = make_api(broker_url=REDIS_URL)
    # Yearly, so no later fire can fall between the ticks below.
    sid = create(api, cron="0 0 1 1 *")["id"]
    store = ScheduleStore(api.service.engine)
    app = beat_app()
    # Both beats reconcile at start: the entry the API wrote is kept as it is.
    beat_a = ScheduleBeat(app=app, store=store, max_interval=1)
    beat_b = ScheduleBeat(app=beat_app(), store=store, max_interval=1)
    # Make the entry due now, as if its last fire was over a year ago.
    entry = RedBeatSchedulerEntry.from_key(entry_key(sid), app=app)
    entry.reschedule(last_run_at=datetime.now(UTC) - timedelta(days=400))

    def run_beat_b() -> None:
        # As a second `weightsmith beat` would: block on the lock, then tick (in one thread:
        # the lock token is thread-local).
        acquire_distributed_beat_lock(sender=SimpleNamespace(scheduler=beat_b))
        b_ticked.append(beat_b.lock is not None)
        beat_b.tick()
        beat_b.close()

    b_ticked: list[bool] = []
    acquire_distributed_beat_lock(sender=SimpleNamespace(scheduler=beat_a))
    waiting = threading.Thread(target=run_beat_b, daemon=True)
    waiting.start()
    beat_a.tick()
    beat_a.tick()  # not due again
    assert beat_b.lock is None and b_ticked == []  # B is still waiting for the lock
    beat_a.close()  # releases the lock: B takes over and finds nothing due
    waiting.join(timeout=30)
    assert b_ticked == [True]

    sent = [m for m in _messages(redis_db) if m["args"] == [sid]]
    assert len(sent) == 1
    assert sent[0]["task"] == FIRE_SCHEDULE_TASK and sent[0]["args"] == [sid]
    when = datetime.fromisoformat(sent[0]["kwargs"]["scheduled_for"])
    assert when == datetime(datetime.now(UTC).year, 1, 1, tzinfo=UTC)

    # The message delivered twice (redelivery) still makes one job.
    sched = scheduling(api)
    for _ in range(2):
        sched.fire(sent[0]["args"][0], when)
    assert store.count_jobs(sid) == 1
    assert len(api.enqueued) == 1
    job = api.service.jobs.get(api.service.keys.ensure_tenant(api.tenant).id, api.enqueued[0])
    assert isinstance(job, Job) and job.schedule_id == sid
