"""The error hierarchy: every error an operator can meet, each carrying what to do about it."""

from __future__ import annotations

from ingest.core.logs import redact


class EventpipeError(Exception):
    """Base of every error eventpipe raises on purpose.

    ``hint`` tells the operator what to do; the CLI prints ``message`` and ``hint``
    on one line instead of a traceback.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        # Messages quote DSNs and driver errors: no password may reach a terminal or log.
        message, hint = redact(message), redact(hint)
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(EventpipeError):
    """Settings or flags that cannot work (a bad DSN, no stack to join, ...)."""

    exit_code = 2


class StartupError(EventpipeError):
    """A component could not start: a port in use, a state dir not writable, a binary failing."""

    exit_code = 3


class MigrationError(EventpipeError):
    """The schema cannot be brought up to date (a changed migration, a failing statement)."""

    exit_code = 4


class PartitionError(EventpipeError):
    """The partition manager cannot do what was asked (lock held elsewhere, bad policy)."""

    exit_code = 5


class OutsideRetentionWindow(PartitionError):
    """An event's time falls outside the months a table keeps; it goes to dead letters.

    ``reason`` is ``too_old`` (older than retention) or ``too_new`` (beyond the
    months made ahead).
    """

    def __init__(self, message: str, *, hint: str = "", reason: str = "outside_window") -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


class MaintenanceLocked(PartitionError):
    """Another ``partitions maintain`` holds the maintenance lock past the wait allowed."""

    exit_code = 6
