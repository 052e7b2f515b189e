"""Latency and throughput of the REST API on loopback: POST /v1/jobs and GET /v1/jobs/{id}.

The service runs as it does in production: uvicorn in its own process (``--factory
app.main:create_app``, settings from the environment), PostgreSQL as the job store and
Redis as the Celery broker (the task is sent by name; no worker consumes it here, so the
figures are the API's alone). ``--clients`` concurrent clients (default 50) each submit a
job and read it back, in a loop, until ``--requests`` submissions are done; a warm-up
round is not counted. Prints p50/p90/p99/max and throughput per route, and the same for
``/healthz`` (no auth, no database) as the ceiling of the framework on this machine: the
client runs on the same machine and competes for its cores.

    python bench/api_bench.py                          # PostgreSQL + Redis on 127.0.0.1
    python bench/api_bench.py --database sqlite --no-broker
    python bench/api_bench.py --requests 5000 --workers 2

Recipes name ``s3://`` models, which need no pinning: hub pinning costs a round trip to the
Hub and is not what this measures. Targets (issue 3): POST p99 ≤ 50 ms, GET p99 ≤ 20 ms.
Queue-to-start latency needs a worker and is not measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
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
        t0 = time.perf_counter()
        r = await http.post("/v1/jobs", json=JOB)
        t1 = time.perf_counter()
        if r.status_code != 202:
            errors.append(f"POST {r.status_code}: {r.text[:200]}")
            continue
        post_ms.append((t1 - t0) * 1000)
        job_id = r.json()["id"]
        t2 = time.perf_counter()
        g = await http.get(f"/v1/jobs/{job_id}")
        t3 = time.perf_counter()
        if g.status_code != 200:
            errors.append(f"GET {g.status_code}: {g.text[:200]}")
            continue
        get_ms.append((t3 - t2) * 1000)


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


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def report(result: dict[str, Any], clients: int) -> None:
    elapsed = result["elapsed"]
    print(f"{clients} concurrent clients, {elapsed:.2f} s")
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
    health = result["health"]
    print(
        f"{'GET /healthz (ref.)':<22}{len(health):>7}{statistics.median(health):>9.1f}"
        f"{_percentile(health, 90):>9.1f}{_percentile(health, 99):>9.1f}{max(health):>9.1f}"
        f"{len(health) / result['health_elapsed']:>9.0f}"
    )
    total = len(result["post"]) + len(result["get"])
    print(f"overall: {total / elapsed:.0f} requests/s")
    if result["errors"]:
        print(f"{len(result['errors'])} errors, first: {result['errors'][0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=2000, help="job submissions (each + a GET)")
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
            try:
                with api_server(env, args.workers) as url:
                    result = asyncio.run(load(url, key, args.clients, args.requests))
            finally:
                if not args.no_broker:
                    _purge_queue(args.broker_url)
    report(result, args.clients)
    return 1 if result["errors"] else 0


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
