"""What every ``weightsmith`` subcommand shares: the exit codes, the one-line error, the
settings, the help formatter and the output helpers (tables, times, sizes, ``--json``).

Exit codes, the same for every command:

- 0: done;
- 2 (:data:`EXIT_INPUT`): bad input — an option, a recipe, a checkpoint, a reference, a
  target folder in use, settings, or a request the service refused as invalid (4xx other
  than 401/403);
- 1 (:data:`EXIT_FAILURE`): everything else — an unreachable service, a rejected API key
  (401/403), a job that failed or was cancelled, a corrupt artifact, a server error;
- 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

EXIT_INPUT = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, except where there is nothing to show
    (no default, a flag) or the help already says where the default comes from."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in text:
            return text
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def when(value: Any) -> str:
    """A timestamp as the tables show it (UTC, to the second), or ``-``."""
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    for row in (headers, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_json(value: Any) -> None:
    """``--json`` output: pydantic models as the API returns them, lists of them as arrays."""
    from datetime import datetime

    from pydantic import BaseModel

    def plain(v: Any) -> Any:
        if isinstance(v, BaseModel):
            return v.model_dump(mode="json")
        if isinstance(v, datetime):
            return v.isoformat()
        if isinstance(v, list | tuple):
            return [plain(item) for item in v]
        if isinstance(v, dict):
            return {k: plain(item) for k, item in v.items()}
        return v

    print(json.dumps(plain(value), indent=2))


def add_json_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON instead of text")
