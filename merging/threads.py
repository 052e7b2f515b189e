"""Independent pieces of a tensor's math on the machine's cores at once.

torch's own threads are set by the engine (one core is left to the read-ahead and writer
threads); numpy's vectorised routines (compares, counts, partition, sort) run on the
calling thread only, but release the GIL while they run. Where a method has one such job
per model (each model's rank windows, for example), ``each`` runs them on a small shared
pool, as many at once as the process may use cores. Each job must touch only its own
state: the results are the same in any order.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0  # the process that made ``_pool``
_limit: int | None = None  # ``limit``
_inside = threading.local()  # .job: this thread runs a job of ``each``


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cores() -> int:
    """The jobs ``each`` runs at once: ``machine_cores``, at most this process's ``limit``."""
    n = machine_cores()
    return min(n, _limit) if _limit is not None else n


def limit(n: int | None) -> None:
    """Run at most ``n`` jobs at once in this process (one: each job on the caller's
    thread): for a process given a share of the machine's cores, such as one of a local
    merge's worker processes; None: as many as it may use cores. Set before the first
    ``each``."""
    global _limit
    _limit = None if n is None else max(1, n)


def each(job: Callable[[T], object], items: Iterable[T]) -> None:
    """``job(item)`` for every item, on up to ``cores()`` threads; the first error is
    raised after every job has ended (none is left running)."""
    todo = list(items)
    if len(todo) < 2 or cores() < 2 or getattr(_inside, "job", False):
        # (a job's own jobs run in it: the pool's threads waiting on the pool could all
        # be waiting)
        for item in todo:
            job(item)
        return

    def run(item: T) -> None:
        _inside.job = True
        try:
            job(item)
        finally:
            _inside.job = False

    futures = [_shared_pool().submit(run, item) for item in todo]
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:
        raise errors[0]


def spans(n: int, *, least: int = 1) -> list[tuple[int, int]]:
    """[start, stop) ranges splitting ``n`` items into up to ``cores()`` parts of at least
    ``least`` items each (one range where there is one core or too little to split)."""
    parts = max(1, min(cores(), n // max(1, least)))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if a < b] or [(0, n)]


def _shared_pool() -> ThreadPoolExecutor:
    """The pool, made on first use in this process: a process forked from one that had it
    (a prefork worker's child) gets its own, as the threads did not come along."""
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(cores(), thread_name_prefix="merge-math")
            _pool_pid = os.getpid()
        return _pool
