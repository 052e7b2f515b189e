"""Streaming, sharded safetensors output.

The output plan (every tensor's name, dtype and shape) is known before the merge computes
anything, so each shard's header can be written as soon as the shard is started and each
tensor's bytes appended the moment it is computed. Nothing is buffered or copied after the
fact, which keeps the writer's memory at zero beyond the tensor being written.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from workers.tensors.safetensors_format import METADATA_KEY, dtype_code, encode_header

INDEX_NAME = "model.safetensors.index.json"
_QUEUE_BYTES = 32 << 20  # written-but-not-yet-on-file bytes held by the writer
_MAX_LISTED = 10


@dataclass(frozen=True)
class TensorSpec:
    """One planned output tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        # Accept torch.Size or lists; compare and serialise as a plain tuple of ints.
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class PendingHost:
    """Host memory that is still being filled (a copy back from a GPU in flight), to be
    written once ``wait()`` returns; ``release()`` is called when the writer is done with
    it (written, or dropped after an error), so that its buffer can take the next part."""

    tensor: torch.Tensor
    wait: Callable[[], None]
    release: Callable[[], None]


# a tensor or part handed to the writer: ready now, or once its copy has landed
Part = torch.Tensor | PendingHost


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into shards of at most max_shard_bytes each.

    Greedy: a new shard starts when the next tensor would overflow the current, non-empty
    one. A tensor larger than the limit gets a shard of its own (tensors are never split).
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def split_shards(shards: Sequence[Sequence[TensorSpec]], parts: int) -> list[tuple[int, int]]:
    """At most ``parts`` contiguous ranges [first, end) of shard indices, of about equal
    bytes, each with at least one shard: the parts of a merge split across workers (each
    writes whole shard files, the same as a single run's)."""
    sizes = [sum(s.nbytes for s in shard) for shard in shards]
    n = max(1, min(parts, len(sizes)))
    total = sum(sizes)
    bounds = [0]
    done = 0
    for i, size in enumerate(sizes):
        k = len(bounds)  # the next cut to make
        if k >= n:
            break
        done += size
        left = len(sizes) - (i + 1)  # shards after this one
        # cut once this part has its share, or when the remaining parts need every shard left
        if (done * n >= total * k or left == n - k) and left >= n - k:
            bounds.append(i + 1)
    bounds.append(len(sizes))
    return list(itertools.pairwise(bounds))


def index_document(specs: Sequence[TensorSpec], max_shard_bytes: int) -> bytes:
    """The bytes of ``model.safetensors.index.json`` for the output plan ``specs``: the
    same whichever process (a single run, or the last step of a split one) writes it."""
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards))
    weight_map = {spec.name: names[i] for i, shard in enumerate(shards) for spec in shard}
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in specs)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    return (json.dumps(index, indent=2) + "\n").encode("utf-8")


def write_index(
    out_dir: Path, specs: Sequence[TensorSpec], max_shard_bytes: int
) -> tuple[Path, tuple[int, str]]:
    """Write (and fsync) the index of the plan in ``out_dir``; its path and (size, sha256)."""
    text = index_document(specs, max_shard_bytes)
    index_path = Path(out_dir) / INDEX_NAME
    with index_path.open("wb") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return index_path, (len(text), hashlib.sha256(text).hexdigest())


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


class ShardedWriter:
    """Streams tensors into shards model-0000i-of-0000N.safetensors. Because the full output
    plan (names, dtypes, shapes) is known before any tensor is computed, each shard's header
    is written up front and tensor bytes are appended as they arrive: no tensor is ever held
    twice and no data is copied after the fact.

    Files are written in place under ``out_dir`` (existing files of the same names are
    overwritten); ``close`` adds ``model.safetensors.index.json``, ``abort`` deletes them all.

    ``shards``: write only the shards [first, end) of the layout (one part of a merge split
    across workers): the tensors of those shards, in plan order, and no index (the split
    merge's last step writes it: :func:`write_index`).
    """

    def __init__(
        self,
        out_dir: Path,
        specs: Sequence[TensorSpec],
        *,
        max_shard_bytes: int = 5 * 10**9,
        metadata: dict[str, str] | None = None,
        shards: tuple[int, int] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self._specs = list(specs)
        if not self._specs:
            raise ValueError("nothing to write: the output plan has no tensors")
        self._position: dict[str, int] = {}
        for i, spec in enumerate(self._specs):
            if spec.name in self._position:
                raise ValueError(f"tensor {spec.name!r} appears twice in the output plan")
            if spec.name == METADATA_KEY:
                raise ValueError(f"{METADATA_KEY!r} is reserved and cannot be a tensor name")
            dtype_code(spec.dtype)  # ValueError naming the supported dtypes
            self._position[spec.name] = i
        meta = dict(metadata or {})
        bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"metadata values must be strings; not so for {_names(bad)}")
        meta["format"] = "pt"

        layout = plan_shards(self._specs, max_shard_bytes)
        n = len(layout)
        self._max_shard_bytes = max_shard_bytes
        self._paths = [self.out_dir / name for name in shard_names(n)]
        self._headers: list[bytes] = []
        self._shard_sizes: list[int] = []
        self._shard_of: list[int] = []
        for i, shard in enumerate(layout):
            header = encode_header([(s.name, s.dtype, s.shape) for s in shard], meta)
            self._headers.append(header)
            self._shard_sizes.append(len(header) + sum(s.nbytes for s in shard))
            self._shard_of.extend([i] * len(shard))
        first, end = shards if shards is not None else (0, n)
        if not 0 <= first < end <= n:
            raise ValueError(f"shards [{first}, {end}) are not a range of the {n} shards")
        self._whole = shards is None
        self._first_shard, self._end_shard = first, end
        self._start = sum(len(s) for s in layout[:first])  # the range's first tensor
        self._stop = self._start + sum(len(s) for s in layout[first:end])

        self._next = self._start
        self._bytes_written = 0
        self._current = -1
        self._fh: BinaryIO | None = None
        self._sha = hashlib.sha256()
        self._digests: dict[str, tuple[int, str]] = {}
        self._created: list[Path] = []
        self._state = "open"
        self._result: list[Path] = []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # File writes and hashing run on a background thread (both release the GIL), so they
        # overlap with computing the next tensor. The queue holds at most _QUEUE_BYTES (or one
        # tensor or part, whatever its size) besides the one being written.
        self._queue: queue.Queue[tuple[int, PendingHost] | None] = queue.Queue()
        self._room = threading.Condition()
        self._queued_bytes = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._partial: tuple[TensorSpec, int] | None = None  # tensor being streamed, elements
        self._syncing: list[threading.Thread] = []
        self._sync_error: BaseException | None = None

    @property
    def bytes_written(self) -> int:
        """Tensor data bytes written so far (headers not counted), for progress."""
        return self._bytes_written

    @property
    def total_bytes(self) -> int:
        """Tensor data bytes of the whole plan (of the shards written): bytes_written
        reaches it when done."""
        return sum(s.nbytes for s in self._specs[self._start : self._stop])

    @property
    def names(self) -> list[str]:
        """The tensors this writer writes, in order (all, or those of its shards)."""
        return [s.name for s in self._specs[self._start : self._stop]]

    @property
    def digests(self) -> dict[str, tuple[int, str]]:
        """File name -> (size, sha256 hex) of every finished file, hashed as it was written,
        so that a manifest needs no second pass over the output."""
        return dict(self._digests)

    def write(self, name: str, part: Part) -> None:
        """Append the next planned tensor; it must match its spec's name, dtype and shape."""
        tensor = part.tensor if isinstance(part, PendingHost) else part
        spec = self._spec_for(name, tensor.dtype)
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name!r}: shape {tuple(tensor.shape)} differs from the planned "
                f"{spec.shape}"
            )
        self._enqueue(part)
        self._next += 1
        self._bytes_written += spec.nbytes

    def begin(self, name: str) -> None:
        """Start streaming the next planned tensor in parts: ``append`` its flattened
        elements in order, then ``end``. Only the queued parts are held, never the tensor."""
        self._partial = (self._spec_for(name, None), 0)

    def append(self, part: Part) -> None:
        """The next elements (any shape, flattened) of the tensor started with ``begin``."""
        if self._partial is None:
            raise ValueError("append() without begin()")
        spec, done = self._partial
        tensor = part.tensor if isinstance(part, PendingHost) else part
        if tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor {spec.name!r}: dtype {tensor.dtype} differs from the planned {spec.dtype}"
            )
        done += tensor.numel()
        if done > math.prod(spec.shape):
            raise ValueError(f"tensor {spec.name!r}: more elements than its shape {spec.shape}")
        self._partial = (spec, done)
        self._enqueue(part)

    def end(self) -> None:
        """Finish the tensor started with ``begin``; all its elements must have come."""
        if self._partial is None:
            raise ValueError("end() without begin()")
        spec, done = self._partial
        if done != math.prod(spec.shape):
            raise ValueError(
                f"tensor {spec.name!r}: {done} elements written, its shape {spec.shape} has "
                f"{math.prod(spec.shape)}"
            )
        self._partial = None
        self._next += 1
        self._bytes_written += spec.nbytes

    def _spec_for(self, name: str, dtype: torch.dtype | None) -> TensorSpec:
        """The next planned spec, checked against the name and dtype being written."""
        self._check_open()
        if self._partial is not None:
            raise ValueError(f"tensor {self._partial[0].name!r} was begun but not ended")
        if self._next >= self._stop:
            raise ValueError(
                f"unexpected tensor {name!r}: all {self._stop - self._start} planned tensors "
                "were already written"
            )
        spec = self._specs[self._next]
        if name != spec.name:
            pos = self._position.get(name)
            why = (
                "it is not in the output plan"
                if pos is None
                else "it was already written"
                if pos < self._next
                else f"it is number {pos + 1} in the plan"
            )
            raise ValueError(
                f"tensors must be written in plan order: expected {spec.name!r} "
                f"(number {self._next + 1}) next, got {name!r} ({why})"
            )
        if dtype is not None and dtype != spec.dtype:
            raise ValueError(
                f"tensor {name!r}: dtype {dtype} differs from the planned {spec.dtype}"
            )
        return spec

    def _enqueue(self, part: Part) -> None:
        if isinstance(part, PendingHost):
            item: PendingHost = part  # host memory already, contiguous, still being filled
        else:
            data = part.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
            item = PendingHost(data, _ready, _ready)
        data = item.tensor
        try:
            self._raise_background_error()
        except BaseException:
            item.release()
            raise
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
            self._thread.start()
        nbytes = data.numel() * data.element_size()
        with self._room:
            while self._queued_bytes and self._queued_bytes + nbytes > _QUEUE_BYTES:
                self._room.wait()
            self._queued_bytes += nbytes
        self._queue.put((self._shard_of[self._next], item))

    def _drain(self) -> None:
        """Background thread: append queued tensors to their shards, hashing as it goes."""
        while (item := self._queue.get()) is not None:
            shard, part = item
            data = part.tensor
            if self._error is not None:
                part.release()
                with self._room:
                    self._queued_bytes -= data.numel() * data.element_size()
                    self._room.notify_all()
                self._queue.task_done()
                continue  # keep draining so that put() never blocks forever
            try:
                part.wait()
                if shard != self._current:
                    self._finish_shard()
                    self._start_shard(shard)
                assert self._fh is not None
                if data.numel():
                    raw = data.reshape(-1).view(torch.uint8).numpy().data
                    self._fh.write(raw)
                    self._sha.update(raw)
            except BaseException as e:
                self._error = e
            finally:
                part.release()
            with self._room:
                self._queued_bytes -= data.numel() * data.element_size()
                self._room.notify_all()
            self._queue.task_done()
        self._queue.task_done()

    def flush(self) -> None:
        """Wait until every tensor handed to write() is in its file (not yet fsynced)."""
        self._queue.join()
        self._raise_background_error()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _raise_background_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> list[Path]:
        """Finish: check all tensors were written, fsync, write the index; return all files.

        The index is written even for a single shard so that every output has one layout.
        """
        if self._state == "closed":
            return list(self._result)
        self._check_open()
        if self._next < self._stop:
            missing = [s.name for s in self._specs[self._next : self._stop]]
            raise ValueError(f"{len(missing)} planned tensors were not written: {_names(missing)}")
        self._stop_thread()
        self._raise_background_error()
        self._finish_shard()
        self._join_syncs()
        if self._sync_error is not None:
            raise self._sync_error
        written = self._paths[self._first_shard : self._end_shard]
        if self._whole:
            self._created.append(self.out_dir / INDEX_NAME)
            index_path, digest = write_index(self.out_dir, self._specs, self._max_shard_bytes)
            self._digests[index_path.name] = digest
            written = [*written, index_path]
        _fsync_dir(self.out_dir)
        self._state = "closed"
        self._result = written
        return list(self._result)

    def abort(self) -> None:
        """Close and delete every file this writer created (the output is unusable)."""
        self._stop_thread()
        self._join_syncs()
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
        for path in self._created:
            path.unlink(missing_ok=True)
        self._created = []
        self._result = []
        self._digests = {}
        self._state = "aborted"

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close on success; abort (delete partial output) if the block raised."""
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _check_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"the writer for {self.out_dir} is {self._state}")

    def _start_shard(self, shard: int) -> None:
        path = self._paths[shard]
        self._created.append(path)
        self._fh = path.open("wb")
        self._fh.write(self._headers[shard])
        self._sha = hashlib.sha256(self._headers[shard])
        self._current = shard

    def _finish_shard(self) -> None:
        """Check the shard's size and record its digest; its fsync runs on a thread of its
        own so that writing the next shard does not wait for the disk (joined by close)."""
        fh, self._fh = self._fh, None
        if fh is None:
            return
        try:
            fh.flush()
            size = fh.tell()
        except BaseException:
            fh.close()
            raise
        syncing = threading.Thread(target=self._sync_and_close, args=(fh,), name="shard-fsync")
        syncing.start()
        self._syncing.append(syncing)
        expected = self._shard_sizes[self._current]
        if size != expected:
            raise RuntimeError(
                f"{self._paths[self._current]}: wrote {size} bytes but the header promises "
                f"{expected}"
            )
        self._digests[self._paths[self._current].name] = (size, self._sha.hexdigest())

    def _sync_and_close(self, fh: BinaryIO) -> None:
        try:
            os.fsync(fh.fileno())
        except BaseException as e:
            self._sync_error = e
        finally:
            fh.close()

    def _join_syncs(self) -> None:
        for t in self._syncing:
            t.join()
        self._syncing = []


def _ready() -> None:
    """The wait and release of a part that is plain host memory: nothing to do."""


def _fsync_dir(path: Path) -> None:
    # Makes the new directory entries durable; not possible on every platform.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
