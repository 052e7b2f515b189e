"""Errors the engine raises for bad input: each says what was wrong and where.

``where`` is built from the recipe field, the model reference and the tensor name, so a
user reads e.g. ``model './ft-a', tensor 'model.layers.0.mlp.up_proj.weight': shape
(64, 32) differs from the base's (64, 48)``.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from typing import ClassVar


class WeightsmithError(Exception):
    """Base class: a failure with a user-facing message and its location.

    ``retryable``: the same job may succeed on another attempt (a source or service was
    unavailable); False for everything about the input, which retrying cannot fix.
    """

    retryable: ClassVar[bool] = False

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


# ---- what a failed attempt means for the job -------------------------------------------------
#
# The rule: retry only what is known to be transient, i.e. what depends on the machine or the
# network rather than on the job's input or this code. A transient failure is retried while
# attempts remain (WEIGHTSMITH_MAX_ATTEMPTS); everything else fails the job on its first
# attempt, because running the same code on the same input fails the same way again: bad input
# (InputError), numeric overflow, a module missing from the worker, a programming error
# (TypeError, KeyError, AssertionError, NotImplementedError, torch's RuntimeError, ...).

# OSError numbers that say "the machine, not the job": out of space or memory, an I/O error,
# too many open files, a busy or stale resource, a network failure.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EBUSY",
        "ECONNABORTED",
        "ECONNREFUSED",
        "ECONNRESET",
        "EDQUOT",
        "EHOSTDOWN",
        "EHOSTUNREACH",
        "EIO",
        "EMFILE",
        "ENETDOWN",
        "ENETRESET",
        "ENETUNREACH",
        "ENFILE",
        "ENOBUFS",
        "ENOMEM",
        "ENOSPC",
        "EPIPE",
        "ESTALE",
        "ETIMEDOUT",
    )
    if hasattr(errno, name)
)

# (module, class names) of network and database errors that are transient; looked up lazily,
# so that this module imports none of these libraries itself.
_TRANSIENT_CLASSES = (
    ("httpx", ("TransportError",)),
    ("httpx2", ("TransportError",)),
    ("requests.exceptions", ("ConnectionError", "Timeout")),
    ("urllib3.exceptions", ("ProtocolError", "NewConnectionError", "TimeoutError")),
    ("botocore.exceptions", ("ConnectionError", "HTTPClientError")),
    # The database was unreachable, restarted or locked (SQLite's "database is locked").
    (
        "sqlalchemy.exc",
        ("OperationalError", "InterfaceError", "DisconnectionError", "TimeoutError"),
    ),
    ("infra.storage.base", ("StorageError",)),  # but not InvalidKey: see is_transient
    ("infra.queue", ("QueueUnavailable",)),
    ("torch.cuda", ("OutOfMemoryError",)),
)

_LOCATION = "weightsmith_location"  # the attribute locate() sets on an exception


def _transient_classes() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    for module_name, names in _TRANSIENT_CLASSES:
        # Only modules already imported: an exception of a module nobody imported cannot occur,
        # and importing torch (say) here would cost seconds.
        module = sys.modules.get(module_name)
        for name in names:
            cls = getattr(module, name, None) if module is not None else None
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


def is_transient(e: BaseException) -> bool:
    """Whether a failed attempt may succeed when retried (network, storage, database, memory,
    a source or the Hub unavailable); False for bad input and programming errors."""
    if isinstance(e, WeightsmithError):
        # Final unless its class says otherwise (SourceUnavailable, the Hub push's HubUnavailable).
        return e.retryable
    if isinstance(e, (ConnectionError, TimeoutError, MemoryError)):
        return True
    if type(e).__name__ == "InvalidKey":  # a key this code built wrongly: retrying won't help
        return False
    if isinstance(e, _transient_classes()):
        return True
    return isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS


def locate(
    e: BaseException,
    *,
    field: str | None = None,
    model: str | None = None,
    tensor: str | None = None,
) -> BaseException:
    """Record where an unexpected exception happened (the innermost call site wins), so the
    job's error can name the tensor or model even for an error that is not a WeightsmithError."""
    where = dict(getattr(e, _LOCATION, None) or {})
    for key, value in (("field", field), ("model", model), ("tensor", tensor)):
        if value is not None:
            where.setdefault(key, value)
    with contextlib.suppress(AttributeError, TypeError):  # a few built-ins refuse attributes
        setattr(e, _LOCATION, where)
    return e


def failure_details(
    e: BaseException, *, retried: int | None = None, retrying: bool = False
) -> dict[str, str | None]:
    """The job error (the fields of ``JobError``) for a failed attempt.

    A WeightsmithError's text is user-facing and already scrubbed; any other exception may
    carry anything (paths, URLs, tokens), so only its class is named, with the missing
    module's name for an ImportError and where it happened when known (see :func:`locate`).
    ``retried``: the attempts a transient failure was tried; ``retrying``: the job is to be
    tried again (else it failed on each of them).
    """
    if isinstance(e, WeightsmithError):
        return e.to_dict()
    kind = type(e).__name__
    transient = "a transient failure: network, storage, database or memory"
    if retried is not None and retrying:
        message = f"attempt {retried} failed with {kind} ({transient}); the job is retried"
    elif retried is not None:
        message = (
            f"the worker failed with {kind} on each of {retried} attempt"
            f"{'s' if retried != 1 else ''} ({transient}); see the worker's log"
        )
    elif isinstance(e, ImportError):
        module = e.name or "?"
        message = (
            f"the worker could not import the Python module {module!r} ({kind}): it is missing "
            "from the worker's installation, so the operator must install it; not retried, as "
            "every attempt would fail the same way"
        )
    elif isinstance(e, ArithmeticError):
        message = (
            f"the computation failed with {kind} (a numeric overflow or division by zero): "
            "check the recipe's numbers (weights, lambda, densities); not retried, as every "
            "attempt would fail the same way"
        )
    else:
        message = (
            f"the worker failed with {kind}, an internal error; not retried, as every attempt "
            "would fail the same way; see the worker's log and report it"
        )
    where = getattr(e, _LOCATION, None) or {}
    located = WeightsmithError(
        message, field=where.get("field"), model=where.get("model"), tensor=where.get("tensor")
    )
    return located.to_dict()
