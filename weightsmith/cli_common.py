"""What every ``weightsmith`` subcommand shares: exit codes, the one-line error, settings."""

from __future__ import annotations

import sys
from typing import Any

EXIT_INPUT = 2  # bad recipe, bad checkpoint, bad reference
EXIT_FAILURE = 1  # anything else


def fail(message: str, code: int) -> int:
    """Print ``weightsmith: error: …`` (one line) on stderr; returns ``code``."""
    first = " ".join(str(message).split())
    print(f"weightsmith: error: {first}", file=sys.stderr)
    return code


def settings_or_fail() -> Any:
    """The process's settings, or exit 2 naming what is invalid (values never echoed)."""
    from pydantic import ValidationError

    from infra.settings import get_settings

    try:
        return get_settings()
    except ValidationError as e:
        problems = "; ".join(str(err.get("msg", "")) for err in e.errors())
        raise SystemExit(fail(f"invalid settings: {problems}", EXIT_INPUT)) from None
