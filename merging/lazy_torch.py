"""``torch``, imported when the math first uses it.

The API validates recipes against the declarations in this package and has no torch (its
image does not install it), while the methods' math here needs it. So every module of the
package takes ``torch`` from this one: a stand-in module that imports torch when one of its
attributes is first read, and keeps each attribute it handed out, so that later reads cost
what a module attribute costs. Nothing is put in ``sys.modules``: ``lazy_loader`` and
``importlib.util.LazyLoader`` register a lazy module there, after which "was torch
imported?" (the service's own check, tests/test_api.py) could no longer be answered.
"""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any


class _ImportedOnFirstUse(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # copy, pickle and inspect probe these: not a first use
            raise AttributeError(attr)
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value


if TYPE_CHECKING:
    import numpy as numpy
    import torch as torch
else:
    torch = _ImportedOnFirstUse("torch")
    # numpy comes with torch in the workers; the math uses a few of its vectorised routines
    # (partition, count_nonzero) on torch tensors' memory, loaded the same way
    numpy = _ImportedOnFirstUse("numpy")
