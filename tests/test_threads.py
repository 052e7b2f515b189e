"""merging.threads: independent jobs on the cores, and row ranges split between them."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from merging import threads


@pytest.mark.parametrize("cores", [1, 2, 4])
def test_spans_cover_every_item_once_in_order(cores, monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: cores)
    for n, least in [(0, 1), (1, 1), (7, 1), (10, 3), (10, 20), (1001, 100)]:
        got = threads.spans(n, least=least)
        assert [i for a, b in got for i in range(a, b)] == list(range(n)), (n, least)
        assert len(got) <= max(1, cores)
        if len(got) > 1:
            assert min(b - a for a, b in got) >= least
    assert len(threads.spans(1001, least=100)) == min(cores, 10)


def test_each_runs_jobs_at_once_and_raises_the_first_error_after_all_ended(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 2)
    started: list[str] = []
    both = threading.Barrier(2, timeout=10)  # only passes if two jobs run at the same time

    def job(i: int) -> None:
        started.append(threading.current_thread().name)
        both.wait()

    threads.each(job, [0, 1])
    assert all(name.startswith("merge-math") for name in started)

    ended: list[int] = []

    def failing(i: int) -> None:
        if i == 0:
            raise ValueError("job 0 failed")
        time.sleep(0.2)
        ended.append(i)

    with pytest.raises(ValueError, match="job 0 failed"):
        threads.each(failing, [0, 1, 2])
    assert sorted(ended) == [1, 2]  # the others had ended when the error was raised


def test_each_runs_inline_on_one_core(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 1)
    names: list[str] = []
    threads.each(lambda i: names.append(threading.current_thread().name), range(3))
    assert names == [threading.current_thread().name] * 3


@pytest.mark.timeout(60)
def test_each_inside_a_job_runs_inline(monkeypatch):
    """A job that calls ``each`` runs its own jobs itself: with every pool thread in a job
    waiting on the pool, nothing would run them (this would hang, not fail)."""
    monkeypatch.setattr(threads, "cores", lambda: 2)
    inner: list[tuple[str, str]] = []

    def outer(i: int) -> None:
        me = threading.current_thread().name
        threads.each(lambda k: inner.append((me, threading.current_thread().name)), range(3))

    threads.each(outer, range(4))
    assert len(inner) == 12 and all(a == b for a, b in inner)


@pytest.mark.timeout(60)
def test_a_forked_child_gets_a_pool_of_its_own(monkeypatch):
    """A prefork worker's child forked after its parent made the pool: the parent's threads
    did not come along, so jobs handed to the inherited pool would never run (a hang)."""
    import multiprocessing

    monkeypatch.setattr(threads, "cores", lambda: 2)
    threads.each(lambda i: None, range(2))  # the parent's pool exists
    context = multiprocessing.get_context("fork")
    done = context.Queue()
    child = context.Process(target=_jobs_in_child, args=(done,), daemon=True)
    child.start()
    child.join(20)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0 and done.get(timeout=1) == [0, 1, 4, 9]


def _jobs_in_child(done: Any) -> None:
    got = [0] * 4

    def square(i: int) -> None:
        got[i] = i * i

    threads.each(square, range(4))
    done.put(got)


def test_a_limit_of_one_runs_jobs_on_the_callers_thread(monkeypatch):
    """A local merge's worker process gets a share of the cores (``_start_process``): with
    one, its jobs run on its own thread, not on a pool that would oversubscribe them."""
    import torch

    import workers.merge.parts as parts

    monkeypatch.setattr(threads, "_limit", None)
    monkeypatch.setattr(parts, "_channel", None)
    before = torch.get_num_threads()
    try:
        parts._start_process(None, None, 1)
        assert threads.cores() == 1
        names: list[str] = []
        threads.each(lambda i: names.append(threading.current_thread().name), range(3))
        assert names == [threading.current_thread().name] * 3
        threads.limit(None)
        assert threads.cores() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)
