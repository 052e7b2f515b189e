"""Merge methods: what each declares (name, parameters, recipe rules) and what it computes.

``METHODS`` is the registry, by name: every module of ``merging/methods/`` is imported and
registers its methods (``merging.method.register``), so adding a method is adding a file
there (docs/merge-methods.md, "Adding a method"). The API, the CLI and the worker validate
recipes against these declarations (schemas/recipe.py); the engine (workers/merge) runs
the math. Importing the package loads no torch (merging/lazy_torch.py) and nothing of the
service or the worker: it is the bottom layer, which only the standard library (and, on
first use of the math, torch) is under.
"""

from __future__ import annotations

import importlib
import pkgutil

from merging.method import MergeMethod, registered


def _discover() -> dict[str, MergeMethod]:
    from merging import methods

    for module in pkgutil.iter_modules(methods.__path__, f"{methods.__name__}."):
        importlib.import_module(module.name)
    return registered()


METHODS: dict[str, MergeMethod] = _discover()
"""Every merge method by name, in alphabetical order."""
