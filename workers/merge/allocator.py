"""Fixed glibc malloc thresholds for merge processes.

A merge allocates and frees the same few block- and tensor-sized buffers over and over.
glibc adjusts its mmap threshold as chunks are freed and returns the top of the heap to
the system above a trim threshold that moves with it, so depending on the order of the
first frees the same buffers are either reused or page-faulted in again every block:
measured on the bench family (bench/README.md, "Fourth round"), TIES ran with 96 K or
700 K minor page faults from one run to the next, and 1.7 s of system time instead of 0.7.
With both thresholds fixed (buffers up to 32 MiB from the heap, up to 128 MiB of free
heap top kept) every method runs at the low figure and peak RSS moves by a few MiB.

Process-wide and glibc only; glibc's own ``MALLOC_*`` environment settings win.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_lock = threading.Lock()
_done: list[bool] = []


def fix_malloc_thresholds() -> bool:
    """Sets the thresholds once per process; whether they are set (False: not glibc, or
    the environment sets glibc's own)."""
    with _lock:
        if not _done:
            _done.append(_apply())
        return _done[0]


def _apply() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
