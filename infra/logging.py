"""Logging of the API, worker and beat processes: one format, one context, no secrets.

:func:`configure_logging` installs one handler on the root logger, in the format of
``WEIGHTSMITH_LOG_FORMAT`` — ``text`` (a line for people) or ``json`` (one JSON object per
line: ``timestamp``, ``level``, ``logger``, ``message``, and ``job_id``, ``tenant``,
``exception`` when there are any) — at ``WEIGHTSMITH_LOG_LEVEL``. Loggers that libraries
configure with their own handlers (uvicorn's) are routed through it too.

**Context.** A job's id (and its tenant, once known) rides on a context variable: the worker
binds it for the length of each job (:func:`log_context`), the API for the requests that
name a job;
every record logged in that context carries it, in either format.

**Secrets.** The handler's filter (:class:`RedactSecrets`) rewrites every record before it is
formatted — message, arguments and exception text: bearer credentials, API keys
(``wsk_<prefix>_…``: the public prefix stays), Hugging Face tokens, presigned URL signatures,
passwords in URLs, and the literal values of the secrets in the settings.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TextIO

if TYPE_CHECKING:
    from infra.settings import Settings

LogFormat = Literal["text", "json"]
REDACTED = "***"

# Libraries that attach handlers of their own to these loggers: they go through ours instead.
_ROUTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task")


# ---- context ---------------------------------------------------------------------------------


@dataclass
class LogContext:
    """What every record logged in this context is about. Mutable: the API fills in the
    tenant once the request is authenticated, and the whole request sees it."""

    job_id: str | None = None
    tenant: str | None = None


_context: contextvars.ContextVar[LogContext | None] = contextvars.ContextVar(
    "weightsmith_log_context", default=None
)


def current_log_context() -> LogContext | None:
    return _context.get()


@contextmanager
def log_context(*, job_id: str | None = None, tenant: str | None = None) -> Iterator[LogContext]:
    """A fresh context for a block (a request, a job); the previous one comes back after."""
    token = _context.set(LogContext(job_id=job_id, tenant=tenant))
    try:
        yield _context.get() or LogContext()
    finally:
        _context.reset(token)


class AddLogContext(logging.Filter):
    """Copies the context's ``job_id`` and ``tenant`` onto each record (None when unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = ctx.job_id if ctx is not None else None
        if getattr(record, "tenant", None) is None:
            record.tenant = ctx.tenant if ctx is not None else None
        return True


# ---- secrets ---------------------------------------------------------------------------------

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization header values, in any spelling a log line may carry them.
    (re.compile(r"(?i)\b(bearer|basic|token)(\s+|%20)[A-Za-z0-9._~+/=\-]{6,}"), r"\1\2" + REDACTED),
    # API keys: wsk_<10 hex prefix>_<64 hex secret>; the prefix identifies the key, keep it.
    (re.compile(r"\b(wsk_[0-9A-Za-z]{1,32})_[0-9A-Za-z]{8,}"), r"\1_" + REDACTED),
    # Hugging Face tokens (hf_ + 30-odd letters and digits; short names like hf_endpoint stay).
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), "hf_" + REDACTED),
    # Presigned URLs (S3 SigV4 and V2): the signature and the temporary credentials.
    (
        re.compile(
            r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature"
            r"|AWSAccessKeyId|x-amz-security-token)=[^&\s\"'<>]+"
        ),
        r"\1=" + REDACTED,
    ),
    # Passwords in URLs: scheme://user:password@host.
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)[^@/\s]+@"), r"\1" + REDACTED + "@"),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret value and every secret-looking token replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def settings_secrets(settings: Settings) -> list[str]:
    """The literal secret values in ``settings``: tokens, keys, passwords in URLs."""
    from urllib.parse import unquote, urlsplit

    found: list[str] = []
    for name, value in settings:
        if hasattr(value, "get_secret_value"):
            found.append(str(value.get_secret_value()))
        elif isinstance(value, str) and "://" in value and name.endswith("_url"):
            try:
                password = urlsplit(value).password
            except ValueError:
                continue
            if password:
                found.extend({password, unquote(password)})
    # Short values would redact ordinary words; the patterns still cover typical formats.
    return sorted({s for s in found if len(s) >= 6}, key=len, reverse=True)


class RedactSecrets(logging.Filter):
    """Rewrites a record's message and exception text with secrets replaced (see redact)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what there is, still redacted
            message = f"{record.msg} {record.args!r}"
        record.msg = redact(message, self.secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


# ---- formats ---------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``job_id``, ``tenant`` and ``exception`` only when set."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("job_id", "tenant"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [job=… tenant=…]: message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(where)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        where = [
            f"{label}={value}"
            for label, value in (
                ("job", getattr(record, "job_id", None)),
                ("tenant", getattr(record, "tenant", None)),
            )
            if value is not None
        ]
        record.where = f" [{' '.join(where)}]" if where else ""
        return super().format(record)


class _WeightsmithHandler(logging.StreamHandler[TextIO]):
    """The handler configure_logging installs (found again, and replaced, by its class)."""


def configure_logging(
    settings: Settings | None = None,
    *,
    log_format: LogFormat | None = None,
    level: str | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log record of this process to ``stream`` (stderr) in the configured format.

    Idempotent: a second call replaces the handler of the first. Other handlers on the root
    logger (a test's log capture) stay. Returns the handler.
    """
    if settings is None:
        from infra.settings import get_settings

        settings = get_settings()
    fmt = log_format or settings.log_format
    lvl = (level or settings.log_level).upper()
    handler = _WeightsmithHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    # Order matters: the context is added first, then everything is redacted.
    handler.addFilter(AddLogContext())
    handler.addFilter(RedactSecrets(settings_secrets(settings)))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _WeightsmithHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(lvl)
    for name in _ROUTED_LOGGERS:
        routed = logging.getLogger(name)
        for h in list(routed.handlers):
            routed.removeHandler(h)
        routed.propagate = True
        routed.setLevel(logging.NOTSET)
    return handler
