"""structlog set-up shared by every process, and the redaction of secrets in DSNs."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import structlog

# URL DSNs: ``scheme://[user]:password@host``. The user may be empty (``//:pw@h``), and a
# password as typed may hold an unencoded ``@`` or a space: it runs to the *last* ``@``
# before the path's ``/`` (or the end of the line). That can hide a little more than the
# password when a URL without a path is followed by an ``@`` on the same line; hiding
# too much is the safe side of this trade.
_DSN_PASSWORD = re.compile(r"(//[^:/@\s]*:)([^/\n]*)(@)")
# key=value DSNs (libpq) and query strings: password=..., sslpassword=...; a quoted libpq
# value may hold \' and \\ escapes.
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&'\"]+)", re.IGNORECASE)


def private_log_file(path: Path) -> Path:
    """Make ``path`` a log file only its owner may read (0600): created so when missing,
    tightened when an earlier version left it 0644. Logs hold client addresses, DSNs and
    payload excerpts; whoever then opens it for appending keeps the mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return path


def redact(text: str) -> str:
    """Hide the password of every DSN in ``text`` (URL or key=value form)."""
    return _KV_PASSWORD.sub(r"\1***", _DSN_PASSWORD.sub(r"\1***\3", text))


def _redact_event(
    logger: object, method: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """structlog processor: ``redact`` every string value (and exception text) of a log line."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
        elif isinstance(value, BaseException):
            event[key] = redact(f"{type(value).__name__}: {value}")
    return event


class _RedactingFilter(logging.Filter):
    """The same for stdlib logging (asyncpg, aiohttp, aiokafka log through it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def configure(level: str = "info", fmt: str = "console") -> None:
    """Configure structlog (and stdlib logging underneath) for one process."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(message)s"
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RedactingFilter) for f in handler.filters):
            handler.addFilter(_RedactingFilter())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
