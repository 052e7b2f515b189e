"""Seeded draws (merging/randomness.py): in chunks, and made ahead on a thread.

The expectation for every stream is ``uniform`` of the whole count: one generator per
(seed, model index, tensor name), drawn at once, computed here independently of the chunking
and of the thread.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from merging.randomness import DrawsAhead, DrawStream, draw_stream, uniform

NAME = "model.layers.0.mlp.up_proj.weight"


def _taken(stream: DrawStream, sizes: list[int]) -> torch.Tensor:
    return torch.cat([torch.empty(0)] + [stream.take(n).clone() for n in sizes])


@pytest.mark.parametrize("sizes", [[10_000], [7] * 1428 + [4], [4096, 4096, 1808], [5], [3, 0, 2]])
def test_takes_in_any_sizes_are_the_draws_of_the_whole_count(sizes):
    numel = sum(sizes)
    want = uniform(11, 2, NAME, torch.Size([numel]))
    assert torch.equal(_taken(DrawStream(11, 2, NAME, None), sizes), want)


@pytest.mark.parametrize(("chunk", "ahead_bytes"), [(1000, 1 << 20), (333, 2000), (1 << 20, 0)])
def test_draws_made_ahead_are_the_generators_draws(chunk, ahead_bytes):
    """In order, with streams skipped (their chunks dropped), a stream asked for twice or out
    of order (then drawn by the caller), takes across chunk boundaries, and a queue small
    enough to make the thread wait."""
    order = [(m, f"t{t}", n) for t, n in enumerate([2500, 10, 0, 4001]) for m in (0, 1)]
    ahead = DrawsAhead(5, order, chunk=chunk, ahead_bytes=ahead_bytes)
    try:
        asks = [(0, "t0", [1000, 1500]), (1, "t0", [2500]), (1, "t1", [3, 7])]  # (0, t1) skipped
        asks += [(0, "t2", [])]  # a stream of no draws
        asks += [(1, "t3", [4001]), (0, "t3", [17, 3984]), (1, "t3", [999, 3002])]
        for m, name, sizes in asks:
            got = _taken(draw_stream(5, m, name, ahead), sizes)
            assert torch.equal(got, uniform(5, m, name, torch.Size([sum(sizes)]))), (m, name)
        # another seed is never served by these draws
        other = _taken(draw_stream(6, 1, "t0", ahead), [2500])
        assert torch.equal(other, uniform(6, 1, "t0", torch.Size([2500])))
    finally:
        ahead.close()


def test_close_stops_a_thread_waiting_for_room():
    ahead = DrawsAhead(1, [(0, "big", 10_000_000)], chunk=1000, ahead_bytes=4000)
    time.sleep(0.05)  # the thread has made its one chunk and waits for room
    started = time.monotonic()
    ahead.close()
    assert time.monotonic() - started < 5
    assert not any(t.name == "draws-ahead" and t.is_alive() for t in threading.enumerate())
    # after close, streams are drawn by the caller
    got = _taken(draw_stream(1, 0, "big", ahead), [10])
    assert torch.equal(got, uniform(1, 0, "big", torch.Size([10])))
