"""The collector's clock-skew correction: when it applies, and that it is stable for retries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiohttp.test_utils import make_mocked_request

from ingest.collector.enrich import Received, client_ip
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


async def test_x_forwarded_for_counts_every_header_line() -> None:
    """A proxy that appends a second X-Forwarded-For line (instead of extending the first)
    must not let the client's own first line pick the address: the lines are one list,
    in order, and the walk from the right stops at the first untrusted hop."""
    from aiohttp import web

    from ingest.core.http import HttpServer
    from tests.conftest import raw_request

    proxied = Settings(trusted_proxies=["127.0.0.1/32", "10.0.0.0/8"], keep_full_ip=True)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=str(client_ip(request, proxied)))

    app = web.Application()
    app.router.add_get("/ip", handler)
    async with HttpServer(app, "127.0.0.1", 0) as server:
        cases = [
            # the client forged "6.6.6.6"; the proxy 10.0.0.5 saw 203.0.113.7 and added a line
            ([b"6.6.6.6", b"203.0.113.7, 10.0.0.5"], "203.0.113.7"),
            ([b"6.6.6.6", b"203.0.113.7"], "203.0.113.7"),
            ([b"203.0.113.7"], "203.0.113.7"),
            ([b"10.0.0.9", b"10.0.0.5"], "10.0.0.9"),  # only proxies: the leftmost
        ]
        for lines, expected in cases:
            headers = [("X-Forwarded-For", line) for line in lines]
            status, body = await raw_request(server.url, "GET", "/ip", headers)
            assert (status, body.decode()) == (200, expected), lines


def test_what_each_ip_policy_keeps() -> None:
    import ipaddress

    from ingest.collector.enrich import kept_ip

    v4, v6 = ipaddress.ip_address("203.0.113.77"), ipaddress.ip_address("2001:db8:1:2::9")
    assert [kept_ip(v4, p) for p in ("keep", "truncate", "remove")] == [
        "203.0.113.77",
        "203.0.113.0",
        None,
    ]
    assert [kept_ip(v6, p) for p in ("keep", "truncate", "remove")] == [
        "2001:db8:1:2::9",
        "2001:db8:1::",
        None,
    ]
    assert kept_ip(None, "keep") is None
    assert Settings(keep_full_ip=True).default_ip_policy == "keep"  # the older setting
    assert Settings(keep_full_ip=True, ip_policy="remove").default_ip_policy == "remove"


def test_which_requests_are_anonymous() -> None:
    from multidict import CIMultiDict

    from ingest.collector.enrich import anonymous

    def request(path: str = "/v1/behavior", **headers: str) -> object:
        return make_mocked_request("POST", path, headers=CIMultiDict(headers))

    assert anonymous(request(**{"SP-Anonymous": "*"}))  # type: ignore[arg-type]
    assert anonymous(request(**{"X-IP-Policy": " strict "}))  # type: ignore[arg-type]
    assert anonymous(request(**{"X-IP-Policy": "REMOVE"}))  # type: ignore[arg-type]
    assert anonymous(request("/v1/behavior?k=x&anonymous=1"))  # type: ignore[arg-type]
    for headers in ({"X-IP-Policy": "keep"}, {"X-IP-Policy": "comfort"}, {}):
        assert not anonymous(request(**headers))  # type: ignore[arg-type]
    assert not anonymous(request("/v1/behavior?anonymous=0"))  # type: ignore[arg-type]


def test_a_shops_settings_decide_its_records_context_and_bot_flag() -> None:
    """One request, three shops: the collector's defaults, one keeping IPs whole and
    flagging bots, one removing IPs. Each record gets its shop's view."""
    import uuid

    from multidict import CIMultiDict

    from ingest.collector.enrich import behavior_record, storefront_record
    from ingest.collector.models import BehaviorEvent, StorefrontEvent
    from ingest.core.shops import Privacy, Shop

    headless = "Mozilla/5.0 (X11; Linux x86_64) HeadlessChrome/120.0.0.0 Safari/537.36"
    request = make_mocked_request(
        "POST", "/v1/behavior", headers=CIMultiDict({"User-Agent": headless})
    )
    received = Received.of(request, SETTINGS, None, CLIENT_TIME)
    plain = Shop(uuid.uuid4(), "a.example", None)
    flagging = Shop(uuid.uuid4(), "b.example", None, Privacy(ip_policy="keep", bot_policy="flag"))
    removing = Shop(uuid.uuid4(), "c.example", None, Privacy(ip_policy="remove"))
    view = BehaviorEvent.model_validate(
        {"event_type": "page_view", "session_id": "s", "page_url": "https://x/"}
    )
    order = StorefrontEvent.model_validate(
        {"event_type": "order", "session_id": "s", "anon_id": "a"}
    )
    assert received.context["client_ip"] is None  # a mocked request has no peer
    for shop, bot in ((plain, False), (flagging, True), (removing, False)):
        behavior = behavior_record(view, shop, received)
        storefront = storefront_record(order, shop, received)
        assert behavior["metadata"].get("bot", False) is bot
        assert storefront["props"].get("bot", False) is bot
        assert behavior["context"]["user_agent"] == headless
    assert received.of_shop(flagging) is received.of_shop(flagging)  # worked out once
    webhook = Received.of(request, SETTINGS, None, CLIENT_TIME, screen_bots=False)
    assert "bot" not in storefront_record(order, flagging, webhook)["props"]
