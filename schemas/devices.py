"""Where a merge or an edit computes: the device names the CLI (``--device``), the worker
setting (``WEIGHTSMITH_WORKER_DEVICE``) and the engines accept. One vocabulary, checked here
without torch; ``workers.devices.resolve_device`` turns a name into a torch device (and
checks that a CUDA GPU is there).

- ``auto``: ``cuda`` when torch sees a CUDA GPU, else ``cpu``;
- ``cpu``;
- ``cuda`` or ``cuda:N`` (the N-th visible GPU).
"""

from __future__ import annotations

import re

__all__ = ["DEVICE_NAMES", "DEVICE_PATTERN", "check_device_name"]

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"

_SUPPORTED = re.compile(DEVICE_PATTERN)
# what torch.device would parse: a known type we do not compute on (mps, xpu, meta, …)
_OTHER_TYPE = re.compile(r"^[a-z][a-z0-9_]*(:\d+)?$")


def check_device_name(name: str) -> str:
    """``name`` when it is a device weightsmith computes on, else ValueError saying what is
    valid ("unknown" for a name that is no device at all, "unsupported" for another kind of
    device)."""
    if _SUPPORTED.match(name):
        return name
    if _OTHER_TYPE.match(name) and name.split(":")[0] in _TORCH_DEVICE_TYPES:
        raise ValueError(
            f"unsupported device {name!r}; use cpu or cuda[:N], or auto (cuda when a GPU is "
            "visible, else cpu)"
        )
    raise ValueError(
        f"unknown device {name!r}; use cpu or cuda[:N], or auto (cuda when a GPU is visible, "
        "else cpu)"
    )


# torch's other device types (torch.device accepts them; nothing here computes on them)
_TORCH_DEVICE_TYPES = frozenset(
    {"mps", "xpu", "xla", "meta", "hip", "ipu", "mtia", "hpu", "vulkan", "lazy", "mkldnn",
     "opengl", "opencl", "ideep", "ve", "fpga", "maia", "privateuseone"}
)  # fmt: skip
