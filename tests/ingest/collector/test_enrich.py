"""The collector's clock-skew correction: when it applies, and that it is stable for retries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiohttp.test_utils import make_mocked_request

from ingest.collector.enrich import Received
from ingest.core.settings import Settings

SETTINGS = Settings(skew_min_s=300, max_future_skew_s=300)
CLIENT_TIME = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def _stored(sent_at: datetime, received_at: datetime) -> datetime:
    request = make_mocked_request("POST", "/v1/behavior")
    received = Received.of(request, SETTINGS, sent_at, received_at)
    return received.event_time(CLIENT_TIME)[0]


def test_a_clock_off_by_less_than_the_threshold_is_not_corrected() -> None:
    sent_at = CLIENT_TIME + timedelta(seconds=1)
    assert _stored(sent_at, sent_at + timedelta(minutes=2)) == CLIENT_TIME
    assert _stored(sent_at, sent_at - timedelta(minutes=2)) == CLIENT_TIME


def test_a_clock_off_by_more_is_corrected_by_whole_minutes() -> None:
    sent_at = CLIENT_TIME + timedelta(seconds=1)
    stored = _stored(sent_at, sent_at + timedelta(hours=2, seconds=3.4))
    assert stored == CLIENT_TIME + timedelta(hours=2)
    assert _stored(sent_at, sent_at - timedelta(minutes=10)) == CLIENT_TIME - timedelta(minutes=10)


def test_the_same_body_arriving_seconds_apart_gets_the_same_time() -> None:
    """A 2-hour skew, the same body received 1.2 s and 7.9 s after it was sent (+2 h)."""
    sent_at = CLIENT_TIME + timedelta(seconds=1)
    first = _stored(sent_at, sent_at + timedelta(hours=2, seconds=1.2))
    second = _stored(sent_at, sent_at + timedelta(hours=2, seconds=7.9))
    assert first == second == CLIENT_TIME + timedelta(hours=2)
