"""Latency and throughput of the REST API on loopback: POST /v1/jobs and GET /v1/jobs/{id},
and the queue-to-start latency of an idle worker.

The service runs as it does in production: uvicorn in its own process (``--factory
app.main:create_app``, settings from the environment), PostgreSQL as the job store and
Redis as the Celery broker. Three phases, each printed as a table:

1. queue-to-start: a real ``weightsmith worker`` (Celery, prefork) listens on the broker;
   ``--starts`` jobs (a linear merge of two tiny local checkpoints) are submitted one at a
   time, each after the previous has finished and the worker has been idle for a moment;
   the figure is the job store's ``started_at - created_at`` (claim time minus the time the
   API recorded the job: enqueue, broker, prefetch, claim). The worker is stopped after.
2. paced load (the targets): ``--clients`` concurrent clients (default 50) on their own
   connections, each submitting a job and reading it back once every ``--interval`` seconds
   (default 1 s, i.e. 50 POST/s + 50 GET/s offered; start times are spread over the
   interval), for ``--duration`` seconds. This is how API users behave: they submit and
   poll, they do not hammer in a tight loop.
3. saturation: the same clients in a closed loop with no pause, until ``--requests``
   submissions are done: the ceiling on this machine (requests/s) and what latency looks
   like past it (by Little's law, latency = clients / throughput once saturated).

Plus ``/healthz`` in a closed loop (no auth, no database) as the framework's ceiling. The
client runs on the same machine and competes for its cores.

    python bench/api_bench.py                          # PostgreSQL + Redis on 127.0.0.1
    python bench/api_bench.py --database sqlite --no-broker   # (no queue-to-start phase)
    python bench/api_bench.py --requests 5000 --workers 2

Load-phase recipes name ``s3://`` models, which need no pinning (hub pinning costs a round
trip to the Hub and is not what this measures); no worker consumes those jobs. Targets
(issue 3): POST p99 ≤ 50 ms and GET p99 ≤ 20 ms at 50 concurrent clients (phase 2);
queue-to-start ≤ 500 ms with an idle worker (phase 1).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2

ROOT = Path(__file__).resolve().parent.parent
JOB = {
    "kind": "merge",
    "artifact_name": "bench",
    "recipe": {
        "merge_method": "ties",
        "base_model": "s3://models/base",
        "models": [
            {"model": "s3://models/math", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "s3://models/code", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "seed": 7,
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh database for the run, dropped afterwards."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url)
    name = f"weightsmith_bench_{secrets.token_hex(4)}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()


@contextmanager
def api_server(env: dict[str, str], workers: int) -> Iterator[str]:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "app.main:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the API exited with code {proc.returncode} while starting")
            try:
                if httpx2.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the API did not become ready within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _client(
    http: httpx2.AsyncClient,
    remaining: list[int],
    post_ms: list[float],
    get_ms: list[float],
    errors: list[str],
) -> None:
    while remaining[0] > 0:
        remaining[0] -= 1
        await _submit_and_read(http, post_ms, get_ms, errors)


async def _submit_and_read(
    http: httpx2.AsyncClient, post_ms: list[float], get_ms: list[float], errors: list[str]
) -> None:
    """Submit one job and read it back, timing each request (errors are recorded)."""
    t0 = time.perf_counter()
    r = await http.post("/v1/jobs", json=JOB)
    t1 = time.perf_counter()
    if r.status_code != 202:
        errors.append(f"POST {r.status_code}: {r.text[:200]}")
        return
    post_ms.append((t1 - t0) * 1000)
    t2 = time.perf_counter()
    g = await http.get(f"/v1/jobs/{r.json()['id']}")
    t3 = time.perf_counter()
    if g.status_code != 200:
        errors.append(f"GET {g.status_code}: {g.text[:200]}")
        return
    get_ms.append((t3 - t2) * 1000)


async def _paced_client(
    http: httpx2.AsyncClient,
    offset: float,
    interval: float,
    until: float,
    post_ms: list[float],
    get_ms: list[float],
    errors: list[str],
) -> None:
    """One submit + read-back every ``interval`` seconds, starting ``offset`` s in."""
    due = time.perf_counter() + offset
    while due < until:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        due += interval
        await _submit_and_read(http, post_ms, get_ms, errors)


async def paced(
    url: str, key: str, clients: int, interval: float, duration: float
) -> dict[str, Any]:
    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as http:
        warm: list[Any] = [[clients], [], [], []]
        await asyncio.gather(*(_client(http, *warm) for _ in range(clients)))
        post_ms: list[float] = []
        get_ms: list[float] = []
        errors: list[str] = []
        start = time.perf_counter()
        until = start + duration
        await asyncio.gather(
            *(
                _paced_client(
                    http, interval * i / clients, interval, until, post_ms, get_ms, errors
                )
                for i in range(clients)
            )
        )
        elapsed = time.perf_counter() - start
    return {"post": post_ms, "get": get_ms, "errors": errors, "elapsed": elapsed}


async def load(url: str, key: str, clients: int, requests: int) -> dict[str, Any]:
    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as http:
        # Warm-up (connections, pools, caches), not counted.
        warm: list[Any] = [[clients * 2], [], [], []]
        await asyncio.gather(*(_client(http, *warm) for _ in range(clients)))
        post_ms: list[float] = []
        get_ms: list[float] = []
        errors: list[str] = []
        remaining = [requests]
        start = time.perf_counter()
        await asyncio.gather(
            *(_client(http, remaining, post_ms, get_ms, errors) for _ in range(clients))
        )
        elapsed = time.perf_counter() - start
        # The same clients on /healthz (no auth, no database): the framework's ceiling here.
        health_ms: list[float] = []
        left = [requests]

        async def health() -> None:
            while left[0] > 0:
                left[0] -= 1
                t0 = time.perf_counter()
                await http.get("/healthz")
                health_ms.append((time.perf_counter() - t0) * 1000)

        health_start = time.perf_counter()
        await asyncio.gather(*(health() for _ in range(clients)))
        health_elapsed = time.perf_counter() - health_start
    return {
        "post": post_ms,
        "get": get_ms,
        "errors": errors,
        "elapsed": elapsed,
        "health": health_ms,
        "health_elapsed": health_elapsed,
    }


def _tiny_checkpoints(root: Path) -> list[Path]:
    """Two tiny random Llama checkpoints (a merge of them takes milliseconds)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        path = root / f"tiny-{i}"
        LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
        paths.append(path)
    return paths


@contextmanager
def celery_worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "weightsmith", "worker", "--queues", "default"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def queue_to_start(url: str, key: str, models: list[Path], starts: int) -> dict[str, Any]:
    """``started_at - created_at`` of jobs submitted one by one to an idle worker (ms)."""
    from datetime import datetime

    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
    }
    body = {"kind": "merge", "recipe": recipe, "artifact_name": "queue-to-start"}
    delays: list[float] = []
    errors: list[str] = []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx2.Client(base_url=url, headers=headers, timeout=30) as http:
        for i in range(starts + 1):  # the first one waits for the worker to boot: not counted
            time.sleep(0.5)  # the worker is idle, waiting on the broker
            r = http.post("/v1/jobs", json=body)
            if r.status_code != 202:
                errors.append(f"POST {r.status_code}: {r.text[:200]}")
                continue
            job_id = r.json()["id"]
            deadline = time.monotonic() + (180 if i == 0 else 60)
            while True:
                view = http.get(f"/v1/jobs/{job_id}").json()
                if view["state"] in ("succeeded", "failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"queue-to-start: job {job_id} still {view['state']}")
                time.sleep(0.02)
            if view["state"] != "succeeded":
                errors.append(f"job {job_id} {view['state']}: {view.get('error')}")
                continue
            started = datetime.fromisoformat(view["started_at"])
            created = datetime.fromisoformat(view["created_at"])
            if i > 0:
                delays.append((started - created).total_seconds() * 1000)
    return {"delays": delays, "errors": errors}


def report_queue_to_start(result: dict[str, Any]) -> None:
    delays = result["delays"]
    print("\nqueue-to-start, idle Celery worker (job store: started_at - created_at)")
    if delays:
        print(
            f"  n={len(delays)}  p50 {statistics.median(delays):.0f} ms  "
            f"p99 {_percentile(delays, 99):.0f} ms  max {max(delays):.0f} ms"
        )
    if result["errors"]:
        print(f"  {len(result['errors'])} errors, first: {result['errors'][0]}")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def report(result: dict[str, Any], title: str) -> None:
    elapsed = result["elapsed"]
    print(f"\n{title}, {elapsed:.2f} s")
    print(f"{'route':<22}{'n':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'req/s':>9}")
    for label, key in (("POST /v1/jobs", "post"), ("GET /v1/jobs/{id}", "get")):
        values = result[key]
        if not values:
            print(f"{label:<22}{0:>7}")
            continue
        print(
            f"{label:<22}{len(values):>7}"
            f"{statistics.median(values):>9.1f}"
            f"{_percentile(values, 90):>9.1f}"
            f"{_percentile(values, 99):>9.1f}"
            f"{max(values):>9.1f}"
            f"{len(values) / elapsed:>9.0f}"
        )
    health = result.get("health")
    if health:
        print(
            f"{'GET /healthz (ref.)':<22}{len(health):>7}{statistics.median(health):>9.1f}"
            f"{_percentile(health, 90):>9.1f}{_percentile(health, 99):>9.1f}"
            f"{max(health):>9.1f}{len(health) / result['health_elapsed']:>9.0f}"
        )
    total = len(result["post"]) + len(result["get"])
    print(f"overall: {total / elapsed:.0f} requests/s")
    if result["errors"]:
        print(f"{len(result['errors'])} errors, first: {result['errors'][0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument(
        "--requests", type=int, default=2000, help="saturation: job submissions (each + a GET)"
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="paced: seconds between a client's jobs"
    )
    parser.add_argument("--duration", type=float, default=30.0, help="paced: seconds")
    parser.add_argument("--starts", type=int, default=20, help="queue-to-start: jobs")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument(
        "--postgres-admin-url",
        default=os.environ.get(
            "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
        help="a database on the server where the bench database is created and dropped",
    )
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument(
        "--no-broker", action="store_true", help="in-process queue instead of Celery/Redis"
    )
    args = parser.parse_args(argv)

    key = f"wsk_{secrets.token_hex(5)}_{secrets.token_hex(32)}"
    with tempfile.TemporaryDirectory(prefix="weightsmith-bench-") as tmp:
        env = {
            "WEIGHTSMITH_DATA_DIR": tmp,
            "WEIGHTSMITH_OBJECT_STORE_URL": f"file://{tmp}/artifacts",
            "WEIGHTSMITH_BOOTSTRAP_API_KEY": key,
            "WEIGHTSMITH_BOOTSTRAP_TENANT": "bench",
            "WEIGHTSMITH_BROKER_URL": "" if args.no_broker else args.broker_url,
        }
        with _database(args, tmp) as database_url:
            env["WEIGHTSMITH_DATABASE_URL"] = database_url
            print(
                f"database: {args.database}, broker: "
                f"{'in-process' if args.no_broker else args.broker_url}, "
                f"uvicorn workers: {args.workers}"
            )
            env["WEIGHTSMITH_ALLOW_LOCAL_PATHS"] = "true"  # the queue-to-start checkpoints
            starts: dict[str, Any] | None = None
            try:
                if not args.no_broker:
                    _purge_queue(args.broker_url)
                with api_server(env, args.workers) as url:
                    if not args.no_broker and args.starts > 0:
                        models = _tiny_checkpoints(Path(tmp))
                        with celery_worker(env, Path(tmp) / "worker.log"):
                            starts = queue_to_start(url, key, models, args.starts)
                    steady = asyncio.run(
                        paced(url, key, args.clients, args.interval, args.duration)
                    )
                    result = asyncio.run(load(url, key, args.clients, args.requests))
            finally:
                if not args.no_broker:
                    _purge_queue(args.broker_url)
    if starts is not None:
        report_queue_to_start(starts)
    offered = args.clients / args.interval
    report(
        steady,
        f"paced: {args.clients} concurrent clients, each one job + one read every "
        f"{args.interval:g} s ({offered:.0f} POST/s + {offered:.0f} GET/s offered)",
    )
    report(result, f"saturation: {args.clients} concurrent clients in a closed loop")
    failed = bool(result["errors"] or steady["errors"] or (starts and starts["errors"]))
    return 1 if failed else 0


@contextmanager
def _database(args: argparse.Namespace, tmp: str) -> Iterator[str]:
    if args.database == "sqlite":
        yield f"sqlite:///{tmp}/bench.db"
    else:
        with postgres_database(args.postgres_admin_url) as url:
            yield url


def _purge_queue(broker_url: str) -> None:
    """Drop the messages sent to the unconsumed queues, so no later worker runs them."""
    import redis

    client = redis.Redis.from_url(broker_url)
    client.delete("default", "gpu")
    client.close()


if __name__ == "__main__":
    raise SystemExit(main())
