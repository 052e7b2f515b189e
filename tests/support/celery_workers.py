"""Real Celery workers for the tests: Redis on loopback, ``weightsmith worker`` processes
started on a queue of the test's own (so other workers on the same Redis never interfere)
and stopped again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parent.parent.parent


def closed_port() -> int:
    """A loopback port nothing listens on (a Hub endpoint that refuses connections)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def check_redis() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({e}). Start it: redis-server --daemonize "
            'yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no',
            pytrace=False,
        )


def start_worker(
    queue: str, hostname: str, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """``weightsmith worker --queues QUEUE`` in a session of its own, output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weightsmith",
                "worker",
                "--queues",
                queue,
                "--hostname",
                hostname,
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the worker's process group, SIGKILL if it has not exited within 10 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
