"""Errors the engine raises for bad input: each says what was wrong and where.

``where`` is built from the recipe field, the model reference and the tensor name, so a
user reads e.g. ``model './ft-a', tensor 'model.layers.0.mlp.up_proj.weight': shape
(64, 32) differs from the base's (64, 48)``.
"""

from __future__ import annotations


class WeightsmithError(Exception):
    """Base class: a failure with a user-facing message and its location."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        model: str | None = None,
        tensor: str | None = None,
        file: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.model = model
        self.tensor = tensor
        self.file = file

    @property
    def where(self) -> str:
        parts = []
        if self.field:
            parts.append(f"field {self.field!r}")
        if self.model:
            parts.append(f"model {self.model!r}")
        if self.file:
            parts.append(f"file {self.file!r}")
        if self.tensor:
            parts.append(f"tensor {self.tensor!r}")
        return ", ".join(parts)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message

    def to_dict(self) -> dict[str, str | None]:
        return {
            "message": self.message,
            "field": self.field,
            "model": self.model,
            "tensor": self.tensor,
            "file": self.file,
            "detail": str(self),
        }


class InputError(WeightsmithError):
    """The inputs (recipe, checkpoints) are wrong; retrying will not help."""


class CheckpointError(InputError):
    """A checkpoint file is corrupt, truncated, inconsistent or in a refused format."""


class SourceError(InputError):
    """A model reference could not be resolved or fetched (not found, no access, ...)."""


class CancelledError(WeightsmithError):
    """The job was cancelled between two tensors."""
