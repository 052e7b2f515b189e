"""workers/merge/allocator.py: fixed glibc malloc thresholds in a merge process.

Each case runs in a fresh interpreter (the settings are process-wide). A 1.5 MiB buffer
freed first sets glibc's moving thresholds low (mmap above 1.5 MiB, the heap's free top
trimmed above 3 MiB); then four 1 MiB buffers are allocated, touched and freed a hundred
times, and the loop's minor page faults are counted. Unfixed, the freed 4 MiB at the top
of the heap is returned to the system each round and faulted in again; with the
thresholds fixed it is reused: a few faults in all.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

_LOOP = """
import ctypes, json, resource, sys
from workers.merge import allocator
fixed = allocator.fix_malloc_thresholds() if sys.argv[1] == "fix" else False
again = allocator.fix_malloc_thresholds() if sys.argv[1] == "fix" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
first = libc.malloc(3 << 19); ctypes.memset(first, 1, 3 << 19); libc.free(first)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    blocks = [libc.malloc(1 << 20) for _ in range(4)]
    for p in blocks:
        ctypes.memset(p, 1, 1 << 20)  # touch every page
    for p in reversed(blocks):
        libc.free(p)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"fixed": fixed, "again": again, "faults": faults}))
"""


def _run(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _LOOP, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def test_fixed_thresholds_reuse_a_freed_buffer_instead_of_faulting_it_in_again():
    pages = 100 * (4 << 20) // 4096  # one fault per page per round, unfixed at worst
    fixed = _run("fix")
    assert fixed["fixed"] and fixed["again"]  # set once, and the second call says so too
    assert fixed["faults"] < pages // 20, fixed
    unfixed = _run("leave")
    assert unfixed["faults"] > pages // 2, unfixed  # what the fix is for, on this glibc


def test_glibc_settings_in_the_environment_are_left_alone():
    got = _run("fix", MALLOC_TRIM_THRESHOLD_="1000000")
    assert got["fixed"] is False
