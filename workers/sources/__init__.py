"""Resolve model references (hub repos, local paths, ...) to local checkpoint files.

``pin_reference`` fixes a hub branch or tag to its commit (at submission, no download);
``resolve_reference`` fetches and verifies the files a merge needs and returns a
``ResolvedModel``. Errors are ``SourceError``; ``SourceUnavailable`` marks the retryable ones.
"""

from .resolve import pin_reference, register_backend, resolve_reference
from .selection import select_files
from .types import FileInfo, ResolvedModel, SourceSettings, SourceUnavailable

__all__ = [
    "FileInfo",
    "ResolvedModel",
    "SourceSettings",
    "SourceUnavailable",
    "pin_reference",
    "register_backend",
    "resolve_reference",
    "select_files",
]
