"""Which Celery workers are alive: each worker announces itself in Redis, with an expiry.

A running job's heartbeat (``jobs.heartbeat_at``) only says something while the worker has a
job; an idle worker, or one whose consumer is wedged, writes nothing there. So every worker's
main process also keeps a key ``weightsmith:worker:<node name>`` in the broker's Redis, with
the time of its last beat, rewritten every ``WEIGHTSMITH_WORKER_HEARTBEAT_INTERVAL`` seconds
and expiring after ``WEIGHTSMITH_WORKER_LOST_AFTER``: a worker that dies (or loses Redis)
disappears by itself, one that stops cleanly deletes its key. ``/metrics`` counts the keys
(``weightsmith_workers_alive``) and shows each one's age.

Redis, not the job store: the beat is written often by every worker, needs no migration and
no cleanup, and lives where the workers already are (the broker). Without a Redis broker (the
embedded worker runs inside the API process) there is nothing to announce.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("weightsmith.liveness")

KEY_PREFIX = "weightsmith:worker:"
SOCKET_TIMEOUT_S = 2.0


def is_redis_url(url: str | None) -> bool:
    return url is not None and url.split("://", 1)[0] in ("redis", "rediss", "unix")


def redis_client(url: str) -> Any:
    """A Redis client for ``url`` that gives up after a couple of seconds."""
    import redis

    return redis.Redis.from_url(
        url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
    )


@dataclass(frozen=True)
class WorkerBeat:
    """One live worker: its node name, its last beat (unix seconds), queues and pid."""

    name: str
    at: float
    queues: tuple[str, ...]
    pid: int


class WorkerBeacon:
    """Keeps this worker's key alive from a daemon thread; :meth:`stop` deletes it."""

    def __init__(
        self, redis_url: str, name: str, *, queues: list[str], interval_s: float, ttl_s: float
    ) -> None:
        self.name = name
        self.key = KEY_PREFIX + name
        self.queues = list(queues)
        self.interval_s = interval_s
        self.ttl_s = max(1, int(ttl_s))
        self._redis = redis_client(redis_url)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-beacon", daemon=True)

    def beat(self) -> None:
        value = json.dumps({"at": time.time(), "queues": self.queues, "pid": os.getpid()})
        self._redis.set(self.key, value, ex=self.ttl_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=SOCKET_TIMEOUT_S * 2)
        try:
            self._redis.delete(self.key)
        except Exception:  # Redis is gone: the key expires by itself
            log.debug("could not delete %s", self.key, exc_info=True)
        self._redis.close()

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:  # a Redis blip: the next beat tries again
                log.warning("worker heartbeat to Redis failed", exc_info=True)
            if self._stopped.wait(self.interval_s):
                return


def read_worker_beats(client: Any) -> list[WorkerBeat]:
    """Every worker whose key has not expired, by name (``client``: see redis_client).
    Raises on a Redis error."""
    keys = sorted(client.scan_iter(match=KEY_PREFIX + "*", count=500))
    values = client.mget(keys) if keys else []
    beats: list[WorkerBeat] = []
    for key, raw in zip(keys, values, strict=True):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            data = json.loads(raw)
            name = (key.decode() if isinstance(key, bytes) else str(key))[len(KEY_PREFIX) :]
            beats.append(
                WorkerBeat(name, float(data["at"]), tuple(data["queues"]), int(data["pid"]))
            )
        except (ValueError, KeyError, TypeError):
            continue
    return beats
