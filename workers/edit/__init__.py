"""ROME / MEMIT knowledge edits (docs/editing.md).

``run_edit`` turns an ``EditRecipe`` into an edited checkpoint; ``revert_edit`` gives the
original back bit for bit. The phases of a run are in ``engine``, the methods in ``rome``
and ``memit`` (looked up by name in ``methods``), the update algebra in ``algebra`` as pure
functions of tensors, the architecture table in ``architectures``, the edited checkpoint
on disk in ``checkpoint``.
"""

from workers.edit.checkpoint import revert_edit
from workers.edit.covariance import CovarianceCache, LocalCovarianceCache
from workers.edit.engine import EditGateError, EditResult, run_edit

__all__ = [
    "CovarianceCache",
    "EditGateError",
    "EditResult",
    "LocalCovarianceCache",
    "revert_edit",
    "run_edit",
]
