"""The partition manager's pure parts: month math, policy windows, the statements of a step."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from ingest.core.identifiers import BadIdentifier, ident
from ingest.partitions import Policy, add_months, bound_month, month_start, partition_name
from ingest.partitions.ddl import archive_step, detach_step


def test_month_math() -> None:
    assert add_months(date(2026, 11, 1), 3) == date(2027, 2, 1)
    assert add_months(date(2026, 1, 1), -1) == date(2025, 12, 1)
    # 23:30 on Oct 31 in New York is November in UTC.
    from zoneinfo import ZoneInfo

    late = datetime(2026, 10, 31, 23, 30, tzinfo=ZoneInfo("America/New_York"))
    assert month_start(late) == date(2026, 11, 1)
    assert partition_name("events", date(2027, 2, 1)) == "events_p2027_02"
    assert bound_month("FOR VALUES FROM ('2026-10-31 19:00:00-05') TO ('x')") == date(2026, 11, 1)


def test_identifiers_are_checked() -> None:
    assert ident("behavior_events") == '"behavior_events"'
    for bad in ['x"; DROP TABLE shops; --', "Events", "", "a b"]:
        with pytest.raises(BadIdentifier):
            ident(bad)


def test_window() -> None:
    policy = Policy("events", "ts", 3, timedelta(days=90), "drop", None)
    now = datetime(2026, 11, 25, tzinfo=UTC)
    assert policy.window(now) == (date(2026, 8, 1), date(2027, 2, 1))


def test_the_current_month_is_never_expired() -> None:
    """The guard alone: even a policy whose cutoff lies ahead keeps the month being written."""
    now = datetime(2026, 11, 25, tzinfo=UTC)
    ahead = Policy("events", "ts", 3, timedelta(days=-40), "drop", None)
    assert ahead.cutoff(now) is not None and ahead.cutoff(now) > now  # type: ignore[operator]
    assert not ahead.expired(date(2026, 11, 1), now)
    assert ahead.expired(date(2026, 10, 1), now)  # an earlier month does expire


def test_detach_steps_run_on_a_session_under_a_session_lock_timeout() -> None:
    kinds = [
        detach_step("events", "events_p2026_01", concurrently=c, finalize=f, lock_timeout_ms=250)
        for c, f in ((True, False), (False, False), (True, True))
    ]
    assert [k.detach.removeprefix('ALTER TABLE "events" DETACH PARTITION ') for k in kinds] == [
        '"events_p2026_01" CONCURRENTLY',
        '"events_p2026_01"',
        '"events_p2026_01" FINALIZE',
    ]
    assert kinds[0].statements == (
        "SET lock_timeout = 250",  # not LOCAL: there is no transaction to be local to
        kinds[0].detach,
        "RESET lock_timeout",
    )


def test_archive_step_copies_the_columns_it_lists_then_drops() -> None:
    step = archive_step("events_p2026_01", ["a", "b"], 250)
    assert step.copy == 'COPY (SELECT "a", "b" FROM "events_p2026_01") TO STDOUT'
    assert step.columns == ("a", "b")
    assert step.statements[0] == "SET LOCAL lock_timeout = 250"
    assert step.statements[-1] == 'DROP TABLE "events_p2026_01"'
    with pytest.raises(BadIdentifier):
        archive_step('x"; DROP TABLE shops; --', ["a"], 250)
