"""Month math of the partition manager: UTC months, partition names, range bounds.

Boundaries are computed in UTC, so the session time zone never shifts them.
Partitions are named ``<table>_pYYYY_MM``.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, date, datetime

_BOUND = re.compile(r"FROM \('([^']+)'\)")
_CHILD = re.compile(r"_p(\d{4})_(\d{2})$")


def month_start(moment: datetime | date) -> date:
    """First day of the UTC month holding ``moment``."""
    if isinstance(moment, datetime):
        moment = moment.astimezone(UTC).date()
    return moment.replace(day=1)


def add_months(month: date, n: int) -> date:
    """``month`` moved by ``n`` months (both first days of a month)."""
    index = month.year * 12 + month.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def shift_months(moment: datetime, n: int) -> datetime:
    """``moment`` (made UTC) moved by ``n`` calendar months, the day clamped like PostgreSQL."""
    moment = moment.astimezone(UTC)
    target = add_months(moment.date().replace(day=1), n)
    day = min(moment.day, calendar.monthrange(target.year, target.month)[1])
    return moment.replace(year=target.year, month=target.month, day=day)


def month_bound(month: date) -> datetime:
    """Midnight UTC of the first day of ``month``."""
    return datetime(month.year, month.month, 1, tzinfo=UTC)


def partition_name(table: str, month: date) -> str:
    """``<table>_pYYYY_MM``."""
    return f"{table}_p{month.year:04d}_{month.month:02d}"


def name_month(name: str) -> date | None:
    """The month a ``<table>_pYYYY_MM`` name stands for."""
    match = _CHILD.search(name)
    if match is None or not 1 <= int(match[2]) <= 12:
        return None
    return date(int(match[1]), int(match[2]), 1)


def bound_month(bound: str | None) -> date | None:
    """The month a partition bound expression starts at, in UTC (None: not a range bound)."""
    match = _BOUND.search(bound or "")
    if match is None:
        return None
    try:
        return month_start(datetime.fromisoformat(match[1]))
    except ValueError:
        return None
