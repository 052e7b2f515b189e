"""Moving a merge's tensors between the host and a GPU, overlapped with the math.

On a GPU a merge is bound by reading the inputs and writing the output, not by the math, so
nothing waits that need not (docs/architecture.md, "On a GPU"):

- inputs are read from the files straight into *pinned* (page-locked) host buffers, which
  the GPU copies from by DMA while the host goes on, and are copied to the device on a
  stream of their own (``non_blocking``); each copy records an event and the computation
  waits on the events of the tensors it uses, nothing else. The read-ahead threads issue the
  next tensor's (or block's) copy before the current one is computed;
- a pinned buffer is refilled only once the copy out of it has finished (the host waits on
  that copy's event): buffer reuse cannot overwrite data in flight;
- a merged tensor (or block) is cast to the output dtype on the device, copied back into a
  pinned buffer of a small output ring on a third stream, and handed to the writer's thread,
  which waits for that copy, writes the bytes and gives the buffer back while the next tensor
  computes.

Host memory of the staging: ``in_slots`` + ``out_slots`` pinned buffers of ``slot_bytes``
each (a whole tensor larger than a buffer goes through it in parts), allocated once per
merge, plus the streamed blocks' buffers (``read_ahead_blocks + 1`` blocks per input, taken
from torch's caching pinned allocator, so reused from one tensor to the next). With
:data:`CUDA_STAGING` that is 4 + 4 buffers of 16 MiB, plus 2 × 8 MiB per fp16 input.

On the CPU nothing is staged: a tensor is computed where it was read, as before. Tests run
the staged pipeline on the CPU too (:data:`CPU_STAGING`), with copies that are made as late
as the ordering allows (when someone waits for them), so a buffer reused too early or a
missing wait gives a wrong result instead of passing by luck.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from workers.tensors.writer import PendingHost

__all__ = [
    "CPU_STAGING",
    "CUDA_STAGING",
    "DeviceTransfer",
    "Staging",
    "Uploaded",
]

MIB = 1 << 20


@dataclass(frozen=True)
class Staging:
    """The sizes of a staged pipeline."""

    in_slots: int  # pinned buffers whole input tensors go to the device through
    out_slots: int  # pinned buffers merged tensors come back through to the writer
    slot_bytes: int  # size of each (a multiple of 8, so any dtype views it whole)
    block_elements: int | None  # elements per streamed block (None: blocks.BLOCK_ELEMENTS)
    read_ahead_blocks: int  # streamed blocks read (and sent) ahead on a thread

    def __post_init__(self) -> None:
        if self.in_slots < 1 or self.out_slots < 1:
            raise ValueError("a staged pipeline needs at least one buffer each way")
        if self.slot_bytes <= 0 or self.slot_bytes % 8:
            raise ValueError(f"slot_bytes must be a positive multiple of 8, not {self.slot_bytes}")


# On a GPU: blocks of 4 Mi elements (a few kernel launches per 8 MiB of fp16 per input, where
# the CPU's cache-sized blocks would be launch-bound), one block read ahead.
CUDA_STAGING = Staging(
    in_slots=4, out_slots=4, slot_bytes=16 * MIB, block_elements=1 << 22, read_ahead_blocks=1
)

# Set (by tests) to run the staged pipeline on the CPU: no pinning, deferred copies.
CPU_STAGING: Staging | None = None


@dataclass
class Uploaded:
    """A tensor on its way to the device: ``tensor`` is valid for work ordered after
    ``fence`` (:meth:`DeviceTransfer.take` orders the computation after it)."""

    tensor: torch.Tensor
    fence: _Fence | None


class _Fence(ABC):
    @abstractmethod
    def wait(self) -> None:
        """Block the calling thread until the copy is done."""


class _CopyStream(ABC):
    """A queue of asynchronous copies, run in order."""

    @abstractmethod
    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> _Fence:
        """Issue ``dst.copy_(src)``; the fence tells when it is done."""

    @abstractmethod
    def after_compute(self) -> None:
        """Copies issued from now on start after the computation issued so far."""

    @abstractmethod
    def compute_waits(self, fence: _Fence) -> None:
        """Computation issued from now on starts after the copy of ``fence``."""

    @abstractmethod
    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A device tensor this stream's copies write, later used by the computation."""

    def used_by_compute(self, t: torch.Tensor) -> None:  # noqa: B027 (nothing on the CPU)
        """``t``, made by this stream, is now used by the computation: its memory must not
        be reused before the computation is done with it."""

    def used_by_copies(self, t: torch.Tensor) -> None:  # noqa: B027 (nothing on the CPU)
        """``t``, made by the computation, is read by this stream's copies."""


class _CudaFence(_Fence):
    def __init__(self, event: torch.cuda.Event) -> None:
        self.event = event

    def wait(self) -> None:
        self.event.synchronize()


class _CudaStream(_CopyStream):
    """A CUDA stream of its own beside the computation's (the thread's current stream)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> _Fence:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return _CudaFence(event)

    def after_compute(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def compute_waits(self, fence: _Fence) -> None:
        assert isinstance(fence, _CudaFence)
        torch.cuda.current_stream(self.device).wait_event(fence.event)

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        # allocated for this stream: the caching allocator then orders its reuse after the
        # copies into it (and, by used_by_compute, after the computation that reads it)
        with torch.cuda.stream(self.stream):
            return torch.empty(numel, dtype=dtype, device=self.device)

    def used_by_compute(self, t: torch.Tensor) -> None:
        t.record_stream(torch.cuda.current_stream(self.device))

    def used_by_copies(self, t: torch.Tensor) -> None:
        t.record_stream(self.stream)


class _DeferredFence(_Fence):
    def __init__(self, stream: _DeferredStream) -> None:
        self.stream = stream
        self.done = False

    def wait(self) -> None:
        self.stream.run_until(self)


class _DeferredStream(_CopyStream):
    """The CPU's stand-in for a CUDA stream: copies queue in order and each is made only
    when a fence at or after it is waited for, the latest a device could make it. A source
    buffer refilled before its copy was waited for, or a result used before, is then wrong
    every time, not only when a real copy engine happens to lag."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[tuple[_DeferredFence, torch.Tensor, torch.Tensor]] = deque()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> _Fence:
        fence = _DeferredFence(self)
        with self._lock:
            self._queue.append((fence, dst, src))
        return fence

    def run_until(self, fence: _DeferredFence) -> None:
        with self._lock:
            while not fence.done:
                done, dst, src = self._queue.popleft()
                dst.copy_(src)
                done.done = True

    def after_compute(self) -> None:
        pass  # the CPU's computation is done when the call that made a tensor returns

    def compute_waits(self, fence: _Fence) -> None:
        fence.wait()  # the computation runs in the calling thread

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype)


class DeviceTransfer:
    """The staging of one merge's tensors to and from its compute device.

    ``staged`` False (the CPU): inputs are used where they are read, outputs written as
    they are; the methods below are not used. Thread-safe: the read-ahead threads upload
    while the merge takes and downloads, and the writer's thread gives buffers back.
    """

    def __init__(self, device: torch.device, staging: Staging | None) -> None:
        self.device = device
        self.staging = staging
        self.staged = staging is not None
        self.pinned = device.type == "cuda"
        self._h2d: _CopyStream | None = None
        self._d2h: _CopyStream | None = None
        if staging is not None:
            if self.pinned:
                self._h2d, self._d2h = _CudaStream(device), _CudaStream(device)
            else:
                self._h2d, self._d2h = _DeferredStream(), _DeferredStream()
        self._lock = threading.Lock()  # the ring and the copies pending per host buffer
        # one tensor at a time through the ring (a read-ahead thread and a direct read may
        # both upload): held across a tensor's fills, released between tensors
        self._turn = threading.Lock()
        self._ring: list[torch.Tensor] = []
        self._next_slot = 0
        self._pending: dict[int, _Fence] = {}  # host buffer's address -> last copy out of it
        self._out_free: queue.Queue[torch.Tensor] = queue.Queue()
        self._out_made = 0
        self.host_bytes = 0  # bytes of the ring buffers allocated (in and out)

    @classmethod
    def for_device(cls, device: torch.device) -> DeviceTransfer:
        if device.type == "cuda":
            return cls(device, CUDA_STAGING)
        return cls(device, CPU_STAGING)

    # -- host buffers ------------------------------------------------------------------------

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A host buffer inputs are read into before they are sent: pinned for a GPU."""
        return torch.empty(numel, dtype=dtype, pin_memory=self.pinned)

    def before_fill(self, host: torch.Tensor) -> None:
        """Wait until no copy reads host buffer ``host`` any more (call before writing it)."""
        with self._lock:
            fence = self._pending.pop(_address(host), None)
        if fence is not None:
            fence.wait()

    # -- to the device -----------------------------------------------------------------------

    def upload(self, host: torch.Tensor) -> Uploaded:
        """Send host buffer ``host`` (filled by the caller, after :meth:`before_fill`) to
        the device, asynchronously; the buffer may be refilled after :meth:`before_fill`."""
        assert self._h2d is not None, "not a staged transfer"
        dst = self._h2d.empty(host.numel(), host.dtype).view(host.shape)
        fence = self._h2d.copy(dst, host)
        with self._lock:
            self._pending[_address(host)] = fence
        return Uploaded(dst, fence)

    def upload_from(
        self,
        numel: int,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        fill: Callable[[int, torch.Tensor], object],
    ) -> Uploaded:
        """A tensor of ``numel`` elements sent to the device through the ring of pinned
        buffers, a buffer at a time: ``fill(start, out)`` writes elements
        [start, start + out.numel()) of the flattened tensor into ``out``."""
        assert self._h2d is not None and self.staging is not None, "not a staged transfer"
        per_slot = self.staging.slot_bytes // dtype.itemsize
        with self._lock:
            if not self._ring:
                self._ring = [
                    torch.empty(self.staging.slot_bytes, dtype=torch.uint8, pin_memory=self.pinned)
                    for _ in range(self.staging.in_slots)
                ]
                self.host_bytes += self.staging.in_slots * self.staging.slot_bytes
        dst = self._h2d.empty(numel, dtype)
        fence: _Fence | None = None
        with self._turn:
            for start in range(0, numel, per_slot):
                stop = min(start + per_slot, numel)
                with self._lock:
                    slot = self._ring[self._next_slot]
                    self._next_slot = (self._next_slot + 1) % len(self._ring)
                self.before_fill(slot)
                view = slot.view(dtype)[: stop - start]
                fill(start, view)
                fence = self._h2d.copy(dst[start:stop], view)
                with self._lock:
                    self._pending[_address(slot)] = fence
        return Uploaded(dst.view(shape), fence)

    def take(self, uploaded: Uploaded) -> torch.Tensor:
        """The uploaded tensor, for the calling thread's computation: what is computed from
        now on waits for its copy (and its memory stays the computation's until freed)."""
        assert self._h2d is not None, "not a staged transfer"
        if uploaded.fence is not None:
            self._h2d.compute_waits(uploaded.fence)
        self._h2d.used_by_compute(uploaded.tensor)
        return uploaded.tensor

    # -- back to the host --------------------------------------------------------------------

    def download(self, t: torch.Tensor, dtype: torch.dtype) -> Iterator[PendingHost]:
        """``t`` (on the device) cast to ``dtype``, flattened, in parts for the writer: each
        a pinned buffer of the output ring being filled, which the writer waits for, writes
        and gives back. Blocks while every buffer of the ring is still with the writer."""
        assert self._d2h is not None and self.staging is not None, "not a staged transfer"
        # a copy of its own: a method may reuse ``t``'s memory for its next block while the
        # copy back is still queued
        src = t.detach().reshape(-1).to(dtype, copy=True)
        self._d2h.after_compute()
        self._d2h.used_by_copies(src)
        per_slot = self.staging.slot_bytes // dtype.itemsize
        for start in range(0, src.numel(), per_slot):
            stop = min(start + per_slot, src.numel())
            slot = self._out_slot()
            view = slot.view(dtype)[: stop - start]
            fence = self._d2h.copy(view, src[start:stop])
            yield PendingHost(view, fence.wait, _Release(self._out_free, slot))

    def _out_slot(self) -> torch.Tensor:
        assert self.staging is not None
        with self._lock:
            make = self._out_free.empty() and self._out_made < self.staging.out_slots
            if make:
                self._out_made += 1
                self.host_bytes += self.staging.slot_bytes
        if make:
            return torch.empty(self.staging.slot_bytes, dtype=torch.uint8, pin_memory=self.pinned)
        return self._out_free.get()

    def close(self) -> None:
        """Wait for the copies still queued (none should be) and drop the buffers."""
        if self.pinned and self.staged:
            torch.cuda.synchronize(self.device)
        with self._lock:
            self._pending.clear()
            self._ring = []


@dataclass
class _Release:
    """Gives an output buffer back to the ring (called by the writer once it is written)."""

    free: queue.Queue[torch.Tensor]
    slot: torch.Tensor

    def __call__(self) -> None:
        self.free.put(self.slot)


def _address(host: torch.Tensor) -> int:
    """The address of the memory a host tensor views (its buffer, whatever the offset)."""
    return int(host.untyped_storage().data_ptr())
