"""ROME / MEMIT knowledge edits (docs/editing.md, specs/editing.md).

``run_edit`` turns an ``EditRecipe`` into an edited checkpoint; ``revert_edit`` gives the
original back bit for bit. The update algebra lives in ``algebra`` as pure functions of
tensors; the architecture table in ``architectures``.
"""

from workers.edit.architectures import ARCHITECTURES, EditArchitecture, architecture_for
from workers.edit.covariance import CovarianceCache, CovarianceKey, LocalCovarianceCache
from workers.edit.engine import EditResult, revert_edit, run_edit

__all__ = [
    "ARCHITECTURES",
    "CovarianceCache",
    "CovarianceKey",
    "EditArchitecture",
    "EditResult",
    "LocalCovarianceCache",
    "architecture_for",
    "revert_edit",
    "run_edit",
]
