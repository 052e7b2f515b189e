"""Progress on the terminal: tqdm bars on a terminal, plain lines (or nothing) otherwise.

tqdm comes with the engine extra; a client-only installation shows no bars.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from weightsmith.cli.common import human_bytes


def _tqdm(desc: str, total: int | None) -> Any:
    """A bytes bar on stderr, or None where tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:  # the client-only install has no tqdm: no bar
        return None
    return tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, dynamic_ncols=True
    )


class ProgressBar:
    """A tensors/bytes bar per phase on a terminal (tqdm), silent otherwise. Takes the
    engine's progress values (``phase``, ``tensors_done/total``, ``bytes_done/total``)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.phase = ""

    def __call__(self, p: Any) -> None:
        if not self.enabled or p.tensors_total == 0:
            return
        if self.bar is None or p.phase != self.phase:
            self.close()
            self.phase = p.phase
            self.bar = _tqdm(p.phase, p.bytes_total)
            if self.bar is None:
                self.enabled = False
                return
        self.bar.n = p.bytes_done
        self.bar.set_postfix_str(f"{p.tensors_done}/{p.tensors_total} tensors", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_text(job: Any) -> str:
    """A job's progress in one short phrase: ``merge 12/40 tensors 3.1 MB/9.0 MB``."""
    p = job.progress
    parts = [p.phase or "-"]
    if p.tensors_total:
        parts.append(f"{p.tensors_done}/{p.tensors_total} tensors")
    if p.bytes_total:
        parts.append(f"{human_bytes(p.bytes_done)}/{human_bytes(p.bytes_total)}")
    elif p.bytes_done:  # inputs being fetched: their sizes are known one at a time
        parts.append(human_bytes(p.bytes_done))
    return " ".join(parts)


class JobWatch:
    """``submit --wait`` progress: a tqdm bar per phase on a terminal, plain lines otherwise
    (on a change of state or phase, and at most every few seconds in between)."""

    PLAIN_EVERY_S = 5.0

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.bar = ProgressBar(enabled=tty)
        self.last_key: tuple[Any, ...] | None = None
        self.last_line = 0.0

    def __call__(self, job: Any) -> None:
        if self.tty:
            if job.state == "running" and job.progress.phase is not None:
                self.bar(job.progress)
            return
        key = (job.state, job.progress.phase, job.cancel_requested)
        now = time.monotonic()
        if key != self.last_key or now - self.last_line >= self.PLAIN_EVERY_S:
            stopping = " (cancel requested)" if job.cancel_requested else ""
            print(f"job {job.id} {job.state}: {progress_text(job)}{stopping}", flush=True)
            self.last_key, self.last_line = key, now

    def close(self) -> None:
        self.bar.close()


class DownloadWatch:
    """``pull`` progress: one bytes bar on a terminal, nothing otherwise."""

    def __init__(self, tty: bool) -> None:
        self.bar = _tqdm("pull", None) if tty else None

    def __call__(self, p: Any) -> None:
        if self.bar is not None:
            self.bar.total = p.bytes_total
            self.bar.n = p.bytes_done
            self.bar.set_postfix_str(f"{p.files_done}/{p.files_total} files", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class PushWatch:
    """``push`` progress: a tqdm bar per phase on a terminal, plain lines otherwise."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.bar: Any = None
        self.phase = ""
        self.upload_id: str | None = None
        self.file: str | None = None

    def __call__(self, p: Any) -> None:
        if p.upload_id and p.upload_id != self.upload_id:
            self.upload_id = p.upload_id
            self._line(f"upload {p.upload_id}: {p.files_total} files, {human_bytes(p.bytes_total)}")
        if p.phase != self.phase:
            self.phase = p.phase
            self.close()
            if not self.tty:
                if p.phase != "published":  # the caller prints the reference
                    size = human_bytes(p.bytes_total)
                    print(f"{p.phase}: {p.files_total} files, {size}", flush=True)
            elif p.phase in ("hashing", "uploading"):
                self.bar = _tqdm(p.phase, p.bytes_total)
            elif p.phase == "completing":  # no bar: the service is hashing every byte
                print(
                    "completing: the service checks every sha256, then publishes", file=sys.stderr
                )
        if self.bar is not None:
            self.bar.n = p.bytes_done
            self.bar.set_postfix_str(f"{p.files_done}/{p.files_total} files", refresh=False)
            self.bar.refresh()
        elif not self.tty and p.phase == "uploading" and p.file != self.file and p.file:
            self.file = p.file
            print(f"sending {p.file}", flush=True)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
