"""The compute device of a merge or an edit (names: ``schemas.devices``), and seeded sampling
that leaves the global random state of the CPU and of that device as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from schemas.devices import check_device_name
from workers.errors import InputError

__all__ = ["resolve_device", "seeded"]


def resolve_device(name: str, *, field: str = "device") -> torch.device:
    """The torch device for ``name`` (``auto``: cuda when torch sees a CUDA GPU, else cpu).

    InputError naming ``field`` (the option or setting the name came from) for a name that is
    not a device weightsmith computes on, and for ``cuda``/``cuda:N`` where torch sees no
    such GPU: refused before any work, not a crash in the middle of it."""
    try:
        check_device_name(name)
    except ValueError as e:
        raise InputError(str(e), field=field) from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {name!r} was asked for but no CUDA GPU is available; use cpu or auto",
                field=field,
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(
                f"device {name!r} was asked for but torch sees {count} CUDA GPU(s) "
                f"(cuda:0–cuda:{count - 1})",
                field=field,
            )
    return device


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Inside, torch's random state is seeded with ``seed`` (sampling on ``device`` draws from
    that device's generator); on exit the CPU's and ``device``'s states are restored."""
    gpus = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield
