"""structlog set-up shared by every process, and the redaction of secrets in DSNs."""

from __future__ import annotations

import logging
import re
import sys

import structlog

_DSN_PASSWORD = re.compile(r"(//[^:/@\s]+:)([^@\s]+)(@)")


def redact(text: str) -> str:
    """Hide the password of every DSN in ``text``."""
    return _DSN_PASSWORD.sub(r"\1***\3", text)


def configure(level: str = "info", fmt: str = "console") -> None:
    """Configure structlog (and stdlib logging underneath) for one process."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(message)s"
    )
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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
