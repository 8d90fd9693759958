"""Consent and anonymous collection, IP policies and the country (issue 23): what a
record keeps of a request, by the shop's settings and the request's own headers."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from consumers.loader import Loader
from consumers.rows import BEHAVIOR
from ingest.collector.server import serving
from ingest.core.db import Database
from ingest.core.errors import ConfigError
from ingest.core.settings import Settings
from ingest.core.shops import Privacy, ShopCredentials, privacy
from ingest.partitions import PartitionManager
from tests.conftest import wait_for
from tests.helpers import topic_events


def test_privacy_settings_are_read_from_shops_settings() -> None:
    text = json.dumps(
        {
            "data_retention_days": 30,
            "ip_policy": "remove",
            "consent_required": True,
            "bot_policy": "flag",
            "bot_deny_list": ["Acme-Monitor", "", 3],
        }
    )
    assert privacy(text) == Privacy("remove", True, "flag", ("acme-monitor",))
    assert privacy("{}") == privacy(None) == privacy("not json") == Privacy()
    # Wrong values are ignored one by one (the default applies), never a refusal.
    wrong = {"ip_policy": "hash", "consent_required": "yes", "bot_policy": 1, "bot_deny_list": "x"}
    assert privacy(wrong) == Privacy()
    assert privacy({"ip_policy": "keep", "bot_policy": "nope"}) == Privacy(ip_policy="keep")


async def _set(db: Database, shop: ShopCredentials, **values: Any) -> None:
    await db.pool.execute(
        "UPDATE shops SET settings = settings || $2::jsonb WHERE id = $1",
        shop.shop_id,
        json.dumps(values),
    )


def _view(session: str, **metadata: Any) -> dict[str, Any]:
    return {
        "event_type": "page_view",
        "session_id": session,
        "page_url": "https://shop.test/",
        "metadata": metadata,
    }


FACTS = {"referrer": "https://search.test/", "language": "de-DE", "screen_resolution": "1x1"}


async def _behavior(
    http: aiohttp.ClientSession, base: str, key: str, session: str, headers: dict[str, str]
) -> None:
    async with http.post(
        f"{base}/v1/behavior?k={key}",
        json=[_view(session, title="T", **FACTS)],
        headers=headers,
    ) as answer:
        assert answer.status == 200 and (await answer.json())["accepted"] == 1


def _of(events: list[dict[str, Any]], session: str) -> dict[str, Any]:
    [event] = [e for e in events if e["session_id"] == session]
    return event


async def test_ip_policy_per_shop_and_the_collectors_default(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Collector default truncate (/24), the shop's keep, remove; then the collector's
    default remove for a shop naming none. The rate limit still counts whole addresses."""
    sessions = {policy: f"ip-{policy}-{uuid.uuid4().hex[:8]}" for policy in ("t", "k", "r", "d")}
    async with aiohttp.ClientSession() as http:
        async with serving(settings, db, key_cache_s=0) as (server, _):
            await _behavior(http, server.url, shop.write_key, sessions["t"], {})
            await _set(db, shop, ip_policy="keep")
            await _behavior(http, server.url, shop.write_key, sessions["k"], {})
            await _set(db, shop, ip_policy="remove")
            await _behavior(http, server.url, shop.write_key, sessions["r"], {})
        await db.pool.execute(
            "UPDATE shops SET settings = settings - 'ip_policy' WHERE id = $1", shop.shop_id
        )
        removing = settings.model_copy(update={"ip_policy": "remove"})
        async with serving(removing, db, key_cache_s=0) as (server, _):
            await _behavior(http, server.url, shop.write_key, sessions["d"], {})
    events = await topic_events(settings, settings.topic_behavior, lambda e: len(e) >= 4)
    ips = {p: _of(events, s)["context"]["client_ip"] for p, s in sessions.items()}
    assert ips == {"t": "127.0.0.0", "k": "127.0.0.1", "r": None, "d": None}


@pytest.mark.parametrize(
    "headers",
    [
        {"SP-Anonymous": "*"},
        {"X-IP-Policy": "strict"},
        {"X-IP-Policy": "Remove"},
        {},  # with ?anonymous=1 (the beacon's)
    ],
    ids=["sp-anonymous", "x-ip-policy-strict", "x-ip-policy-remove", "query"],
)
async def test_anonymous_requests_keep_no_ip_country_or_session_facts(
    settings: Settings, db: Database, shop: ShopCredentials, headers: dict[str, str]
) -> None:
    """Against a request without the header (the control): no client_ip, no country, no
    referrer/language/screen in the context or the metadata; user agent and title stay.
    The shop keeps IPs whole, so nothing but the header removes it."""
    await _set(db, shop, ip_policy="keep")
    countries = settings.model_copy(update={"country_header": "CF-IPCountry"})
    anonymous, control = f"anon-{uuid.uuid4().hex[:8]}", f"ctl-{uuid.uuid4().hex[:8]}"
    query = "&anonymous=1" if not headers else ""
    agent = {"User-Agent": "Mozilla/5.0 (iPhone) Mobile", "CF-IPCountry": "ch"}
    async with (
        serving(countries, db, key_cache_s=0) as (server, _),
        aiohttp.ClientSession() as http,
    ):
        await _behavior(http, server.url, shop.write_key + query, anonymous, {**agent, **headers})
        await _behavior(http, server.url, shop.write_key, control, {**agent, "X-IP-Policy": "keep"})
    events = await topic_events(settings, settings.topic_behavior, lambda e: len(e) >= 2)
    seen, full = _of(events, anonymous), _of(events, control)
    assert full["context"]["client_ip"] == "127.0.0.1"
    assert full["context"]["country_code"] == "CH"
    assert {k: full["context"][k] for k in FACTS} == FACTS
    assert full["metadata"] == {"title": "T", **FACTS}
    assert seen["context"] == {
        "user_agent": "Mozilla/5.0 (iPhone) Mobile",
        "device_type": "mobile",
        "client_ip": None,
        "country_code": None,
        **dict.fromkeys(FACTS),
    }
    assert seen["metadata"] == {"title": "T"}


async def test_anonymous_headers_on_the_tracker_routes(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Snowplow's SP-Anonymous on tp2, Jitsu's X-IP-Policy on the Segment API, and both
    on PostHog's capture: the storefront records keep no IP (the shop keeps IPs whole)."""
    await _set(db, shop, ip_policy="keep")
    key = shop.write_key
    marker = uuid.uuid4().hex
    basic = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    requests = [
        (
            "/com.snowplowanalytics.snowplow/tp2",
            {"SP-Anonymous": "*"},
            {"schema": "x", "data": [{"e": "se", "se_ca": "c", "se_ac": marker, "aid": key}]},
        ),
        (
            "/v1/batch",
            {"X-IP-Policy": "strict", "Authorization": basic},
            {"batch": [{"type": "track", "event": marker, "anonymousId": "a"}]},
        ),
        (
            "/batch/",
            {"SP-Anonymous": "*"},
            {"api_key": key, "batch": [{"event": marker, "distinct_id": "d"}]},
        ),
        (  # the control: no header
            "/batch/",
            {},
            {"api_key": key, "batch": [{"event": f"ctl-{marker}", "distinct_id": "d"}]},
        ),
    ]
    async with aiohttp.ClientSession() as http:
        for path, headers, body in requests:
            async with http.post(
                collector + path,
                data=orjson.dumps(body),
                headers={**headers, "Content-Type": "application/json"},
            ) as answer:
                assert answer.status == 200, (path, await answer.text())
    events = await topic_events(
        settings,
        settings.topic_storefront,
        lambda e: sum(marker in orjson.dumps(x).decode() for x in e) >= 4,
    )
    ips = sorted(
        (f"ctl-{marker}" in orjson.dumps(e).decode(), e["context"]["client_ip"])
        for e in events
        if marker in orjson.dumps(e).decode()
    )
    assert ips == [(False, None), (False, None), (False, None), (True, "127.0.0.1")]


def _geoip(path: Path) -> Path:
    """127.0.0.0/8 in DE but 127.0.0.1 itself in FR: a lookup of the truncated address
    (127.0.0.0) would say DE."""
    writer = MMDBWriter(ip_version=6, database_type="GeoIP2-Country", ipv4_compatible=True)
    writer.insert_network(IPSet(["127.0.0.0/8"]), {"country": {"iso_code": "DE"}})
    writer.insert_network(IPSet(["127.0.0.1/32"]), {"country": {"iso_code": "FR"}})
    writer.insert_network(IPSet(["2001:db8::/32"]), {"registered_country": {"iso_code": "NL"}})
    writer.to_db_file(str(path))
    return path


async def test_country_from_the_geoip_database_before_truncation(
    settings: Settings, db: Database, shop: ShopCredentials, tmp_path: Path
) -> None:
    """user_sessions.country_code FR from 127.0.0.1's own entry (the stored IP is the /24);
    an address the database lacks falls back to the country header; anonymous: none."""
    geo = settings.model_copy(
        update={
            "geoip_db": _geoip(tmp_path / "country.mmdb"),
            "country_header": "CF-IPCountry",
            "trusted_proxies": ["127.0.0.1/32"],
        }
    )
    direct, v6, unknown, hidden = (f"geo-{n}-{uuid.uuid4().hex[:8]}" for n in "dvuh")
    async with (
        serving(geo, db, key_cache_s=0) as (server, _),
        aiohttp.ClientSession() as http,
    ):
        key = shop.write_key
        await _behavior(http, server.url, key, direct, {"CF-IPCountry": "CH"})
        await _behavior(http, server.url, key, v6, {"X-Forwarded-For": "2001:db8::7"})
        await _behavior(
            http, server.url, key, unknown, {"X-Forwarded-For": "10.1.2.3", "CF-IPCountry": "CH"}
        )
        await _behavior(http, server.url, key, hidden, {"SP-Anonymous": "*"})
    events = await topic_events(settings, settings.topic_behavior, lambda e: len(e) >= 4)
    assert _of(events, direct)["context"]["client_ip"] == "127.0.0.0"
    sessions = [direct, v6, unknown, hidden]

    async def loaded() -> bool:
        count = await db.pool.fetchval(
            "SELECT count(*) FROM user_sessions WHERE session_id = ANY($1)", sessions
        )
        return bool(count == 4)

    async with Loader(settings, BEHAVIOR, db, PartitionManager(db)):
        await wait_for(loaded)
    rows = await db.pool.fetch(
        "SELECT session_id, country_code FROM user_sessions WHERE session_id = ANY($1)", sessions
    )
    countries = {r["session_id"]: r["country_code"] for r in rows}
    assert [countries[s] for s in sessions] == ["FR", "NL", "CH", None]


async def test_a_geoip_database_that_cannot_be_read_stops_the_collector(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(b"not a database")
    for path in (bad, tmp_path / "missing.mmdb"):
        with pytest.raises(ConfigError, match="geoip_db"):
            async with serving(settings.model_copy(update={"geoip_db": path}), db):
                pass


async def test_beacon_config_says_whether_consent_is_required(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    async with aiohttp.ClientSession() as http:
        async with serving(settings, db, key_cache_s=0) as (server, _):
            url = f"{server.url}/v1/beacon/config?k={shop.write_key}"
            async with http.get(url) as answer:
                assert await answer.json() == {"consent_required": False}
                assert "max-age=300" in answer.headers["Cache-Control"]
                assert answer.headers["Access-Control-Allow-Origin"] == "*"
            await _set(db, shop, consent_required=True)
            async with http.get(url) as answer:
                assert await answer.json() == {"consent_required": True}
            async with http.get(f"{server.url}/v1/beacon/config?k=wk_nope") as answer:
                assert answer.status == 401
        await _set(db, shop, consent_required=None)  # JSON null: the collector's default
        requiring = settings.model_copy(update={"consent_required": True})
        async with serving(requiring, db, key_cache_s=0) as (server, _):
            url = f"{server.url}/v1/beacon/config?k={shop.write_key}"
            async with http.get(url) as answer:
                assert await answer.json() == {"consent_required": True}


async def test_segment_events_get_context_geo_from_the_geoip_database(
    settings: Settings, db: Database, shop: ShopCredentials, tmp_path: Path
) -> None:
    """segment-analytics-python from 127.0.0.1 with the test database: events.props
    .$context.geo.country.code FR (as Jitsu adds it), the SDK's own context kept."""
    import asyncio

    from segment.analytics import Client

    from consumers.rows import STOREFRONT

    geo = settings.model_copy(update={"geoip_db": _geoip(tmp_path / "country.mmdb")})
    errors: list[Exception] = []
    async with serving(geo, db, key_cache_s=0) as (server, _):
        client = Client(
            shop.write_key,
            host=server.url,
            max_retries=1,
            on_error=lambda error, _: errors.append(error),
        )
        client.track(anonymous_id="anon-geo", event="Product Viewed", properties={"n": 1})
        await asyncio.to_thread(client.flush)
        client.join()
    assert errors == []

    async def loaded() -> bool:
        count = await db.pool.fetchval(
            "SELECT count(*) FROM events WHERE shop_id = $1", shop.shop_id
        )
        return bool(count)

    async with Loader(settings, STOREFRONT, db, PartitionManager(db)):
        await wait_for(loaded)
    props = json.loads(
        await db.pool.fetchval("SELECT props::text FROM events WHERE shop_id = $1", shop.shop_id)
    )
    assert props["$context"]["geo"] == {"country": {"code": "FR"}}
    assert props["$context"]["library"]["name"] == "analytics-python"
