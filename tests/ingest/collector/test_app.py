"""The collector's behavior endpoint against the real broker and PostgreSQL."""

from __future__ import annotations

import asyncio
import gzip
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from consumers.loader import Loader
from consumers.rows import BEHAVIOR
from ingest.collector.server import serving
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials, ShopDirectory
from ingest.partitions import PartitionManager
from tests.conftest import raw_request, wait_for


def beacon(**overrides: object) -> dict[str, object]:
    event: dict[str, object] = {
        "event_type": "click",
        "session_id": "s-1",
        "page_url": "https://shop.example/p/1",
        "element_path": "body > button#buy",
        "coordinates": {"x": 10, "y": 20},
    }
    event.update(overrides)
    return event


async def read_topic(
    settings: Settings, count: int, topic: str | None = None
) -> list[dict[str, Any]]:
    """The first ``count`` events in the topic."""
    return [e for _, value in await read_records(settings, count, topic) for e in value]


async def read_records(
    settings: Settings, count: int, topic: str | None = None
) -> list[tuple[bytes, Any]]:
    """(key, decoded value) of the records holding the first ``count`` events."""
    consumer = AIOKafkaConsumer(
        topic or settings.topic_behavior,
        bootstrap_servers=settings.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[tuple[bytes, Any]] = []
    try:
        for _ in range(50):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out += [(r.key, orjson.loads(r.value)) for r in records]
            if sum(len(value) for _, value in out) >= count:
                break
    finally:
        await consumer.stop()
    return out


async def test_a_request_becomes_one_record_per_session_in_order(
    collector: str, settings: Settings, shop: ShopCredentials
) -> None:
    events = [beacon(session_id=s, event_id=str(uuid.uuid4())) for s in ["a", "b", "a", "a"]]
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{collector}/v1/behavior?k={shop.write_key}", json=events) as resp,
    ):
        assert await resp.json() == {"accepted": 4, "rejected": []}
    records = sorted(await read_records(settings, 4))
    assert [key for key, _ in records] == [
        f"{shop.shop_id}:a".encode(),
        f"{shop.shop_id}:b".encode(),
    ]
    ids = [[e["event_id"] for e in value] for _, value in records]
    assert ids == [
        [events[0]["event_id"], events[2]["event_id"], events[3]["event_id"]],
        [events[1]["event_id"]],
    ]


async def test_beacon_as_text_plain_with_query_key(
    collector: str, settings: Settings, shop: ShopCredentials
) -> None:
    event_id = str(uuid.uuid4())
    body = orjson.dumps({"events": [beacon(event_id=event_id), beacon(event_type="scroll")]})
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{collector}/v1/behavior?k={shop.write_key}",
            data=body,
            headers={"Content-Type": "text/plain;charset=UTF-8"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"accepted": 2, "rejected": []}
    records = await read_topic(settings, 2)
    assert len(records) == 2
    first = next(r for r in records if r["event_id"] == event_id)
    assert first["shop_id"] == str(shop.shop_id)
    assert first["received_at"] and first["timestamp"]


async def test_write_key_in_header_or_body(collector: str, shop: ShopCredentials) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{collector}/v1/behavior", json=[beacon()], headers={"X-Write-Key": shop.write_key}
        ) as resp:
            assert resp.status == 200
        async with http.post(
            f"{collector}/v1/behavior", json={"events": [beacon()], "write_key": shop.write_key}
        ) as resp:
            assert resp.status == 200


async def test_missing_or_unknown_key_is_401(collector: str) -> None:
    async with aiohttp.ClientSession() as http:
        for url in (f"{collector}/v1/behavior", f"{collector}/v1/behavior?k=wk_nope"):
            async with http.post(url, json=[beacon()]) as resp:
                assert resp.status == 401
                assert "write key" in (await resp.json())["error"]


async def test_partial_acceptance_and_bad_bodies(collector: str, shop: ShopCredentials) -> None:
    url = f"{collector}/v1/behavior?k={shop.write_key}"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url, json=[beacon(), beacon(event_type="dance"), beacon(page_url="a\x00b")]
        ) as resp:
            assert resp.status == 200
            result = await resp.json()
        assert result["accepted"] == 1
        assert [r["index"] for r in result["rejected"]] == [1, 2]
        assert "event_type" in result["rejected"][0]["reason"]
        assert "NUL" in result["rejected"][1]["reason"]
        for body in (b"{not json", b'"a string"', b'{"events": 3}'):
            async with http.post(url, data=body) as resp:
                assert resp.status == 400, body
                assert (await resp.json())["error"]
        async with http.post(url, json=[beacon(event_type="nope")]) as resp:
            assert resp.status == 400


async def test_body_limits_are_413(
    collector: str, settings: Settings, shop: ShopCredentials
) -> None:
    url = f"{collector}/v1/behavior?k={shop.write_key}"
    async with aiohttp.ClientSession() as http:
        too_many = [beacon() for _ in range(settings.max_events_per_batch + 1)]
        async with http.post(url, json=too_many) as resp:
            assert resp.status == 413
            assert "max_events_per_batch" in (await resp.json())["error"]
        huge = b"[" + b" " * settings.max_body_bytes + b"]"
        async with http.post(url, data=huge) as resp:
            assert resp.status == 413


async def test_storefront_batch(collector: str, settings: Settings, shop: ShopCredentials) -> None:
    event = {
        "event_type": "add_to_cart",
        "anon_id": "a1",
        "session_id": "s1",
        "props": {"value": 12.5, "currency": "EUR"},
        "product_id": "p-9",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{collector}/v1/storefront",
            json={"events": [event, {"anon_id": "x"}]},
            headers={"X-Write-Key": shop.write_key},
        ) as resp,
    ):
        assert resp.status == 200
        result = await resp.json()
    assert result["accepted"] == 1
    assert "event_type" in result["rejected"][0]["reason"]
    [record] = await read_topic(settings, 1, settings.topic_storefront)
    assert (record["product_id"], record["props"]["currency"]) == ("p-9", "EUR")


async def test_gzip_bodies_and_bombs(
    collector: str, settings: Settings, shop: ShopCredentials
) -> None:
    url = f"{collector}/v1/behavior?k={shop.write_key}"
    gz = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    async with aiohttp.ClientSession() as http:
        body = gzip.compress(orjson.dumps([beacon(), beacon()]))
        async with http.post(url, data=body, headers=gz) as resp:
            assert resp.status == 200 and (await resp.json())["accepted"] == 2
        # 1 KiB on the wire, 100 MB inflated: refused without inflating it.
        bomb = gzip.compress(b"[" + b" " * 100_000_000 + b"]", compresslevel=9)
        assert len(bomb) < settings.max_body_bytes
        async with http.post(url, data=bomb, headers=gz) as resp:
            assert resp.status == 413
            assert "max_decompressed_bytes" in (await resp.json())["error"]
        async with http.post(url, data=b"not gzip at all", headers=gz) as resp:
            assert resp.status == 400
        async with http.post(url, data=body[:-20], headers=gz) as resp:
            assert resp.status == 400
        async with http.post(url, data=body, headers={"Content-Encoding": "br"}) as resp:
            assert resp.status == 415
        async with http.post(url, data=b"[]", headers={"Content-Type": "image/png"}) as resp:
            assert resp.status == 415


async def test_cors_preflight_and_origins(collector: str, shop: ShopCredentials, db: Any) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.options(
            f"{collector}/v1/behavior",
            headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"},
        ) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert "Access-Control-Allow-Credentials" not in resp.headers
        url = f"{collector}/v1/behavior?k={shop.write_key}"
        async with http.post(url, json=[beacon()], headers={"Origin": "https://a.example"}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "https://a.example"
        await db.pool.execute(
            "UPDATE shops SET allowed_origins = $1 WHERE id = $2",
            ["https://a.example"],
            shop.shop_id,
        )
        await asyncio.sleep(0.6)  # the fixture's key cache lives 0.5 s
        async with http.post(url, json=[beacon()], headers={"Origin": "https://b.example"}) as resp:
            assert resp.status == 403
        async with http.post(url, json=[beacon()], headers={"Origin": "https://a.example"}) as resp:
            assert resp.status == 200


async def test_rate_limit_is_429_with_retry_after(
    settings: Settings, shop: ShopCredentials, db: Any
) -> None:
    tight = settings.model_copy(update={"rate_limit_per_s": 1.0, "rate_limit_burst": 3})
    async with (
        serving(tight, db, key_cache_s=10, spool=False) as (server, _),
        aiohttp.ClientSession() as http,
    ):
        statuses = []
        for _ in range(5):
            async with http.post(
                f"{server.url}/v1/behavior?k={shop.write_key}", json=[beacon()]
            ) as resp:
                statuses.append(resp.status)
                retry_after = resp.headers.get("Retry-After")
    assert statuses == [200, 200, 200, 429, 429]
    assert retry_after is not None and int(retry_after) >= 1


async def test_enrichment_skew_clamp_device_and_ip(
    collector: str, settings: Settings, shop: ShopCredentials
) -> None:
    now = datetime.now(UTC)
    slow_clock = now - timedelta(hours=2)  # the device's clock is two hours behind
    events = [
        beacon(
            event_id=str(uuid.uuid4()), timestamp=(slow_clock - timedelta(seconds=30)).isoformat()
        ),
        beacon(event_id=str(uuid.uuid4()), timestamp=(slow_clock + timedelta(days=30)).isoformat()),
        # no time zone: read as UTC, then corrected like the others
        beacon(event_id=str(uuid.uuid4()), timestamp=slow_clock.replace(tzinfo=None).isoformat()),
    ]
    headers = {"User-Agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{collector}/v1/behavior?k={shop.write_key}",
            json={"events": events, "sent_at": slow_clock.isoformat()},
            headers=headers,
        ) as resp,
    ):
        assert resp.status == 200
    records = {r["event_id"]: r for r in await read_topic(settings, 3)}
    corrected = records[events[0]["event_id"]]
    stored = datetime.fromisoformat(corrected["timestamp"])
    assert abs((stored - (now - timedelta(seconds=30))).total_seconds()) < 5
    assert corrected["metadata"]["client_timestamp"].startswith(events[0]["timestamp"][:19])
    clamped = records[events[1]["event_id"]]
    assert datetime.fromisoformat(clamped["timestamp"]) == datetime.fromisoformat(
        clamped["received_at"]
    )
    naive = datetime.fromisoformat(records[events[2]["event_id"]]["timestamp"])
    assert naive.tzinfo is not None and abs((naive - now).total_seconds()) < 5
    assert corrected["context"]["device_type"] == "mobile"
    assert corrected["context"]["client_ip"] == "127.0.0.0"  # truncated by default


async def test_event_size_limit_is_per_event(
    collector: str, settings: Settings, shop: ShopCredentials
) -> None:
    big = beacon(event_data={"blob": "x" * settings.max_event_bytes})
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{collector}/v1/behavior?k={shop.write_key}", json=[beacon(), big]) as resp,
    ):
        result = await resp.json()
    assert result["accepted"] == 1
    assert "max_event_bytes" in result["rejected"][0]["reason"]


async def test_whole_batch_and_per_event_paths_make_the_same_records(
    collector: str, settings: Settings, shop: ShopCredentials
) -> None:
    """A small clean batch is validated in one pass; a body larger than max_event_bytes
    goes event by event. Both must write the same records."""
    at = datetime.now(UTC).replace(microsecond=0).isoformat()
    events = [
        beacon(
            event_id=str(uuid.uuid4()), timestamp=at, metadata={"referrer": "https://r.example"}
        ),
        beacon(event_id=str(uuid.uuid4()), event_type="scroll", event_data={"depth_pct": 40}),
    ]
    body = orjson.dumps({"events": events})
    padded = body + b" " * settings.max_event_bytes  # trailing whitespace: the same JSON
    url = f"{collector}/v1/behavior?k={shop.write_key}"
    async with aiohttp.ClientSession() as http:
        for data in (body, padded):
            async with http.post(url, data=data) as resp:
                assert await resp.json() == {"accepted": 2, "rejected": []}
    written: dict[str, list[dict[str, Any]]] = {}
    for event in await read_topic(settings, 4):
        event.pop("received_at")  # the second event's time is still the same: a retry's
        written.setdefault(event["event_id"], []).append(event)
    assert len(written) == 2
    for copies in written.values():
        assert len(copies) == 2 and copies[0] == copies[1]
    assert written[events[0]["event_id"]][0]["context"]["referrer"] == "https://r.example"


async def _one_refused(collector: str, shop: ShopCredentials, body: bytes) -> dict[str, Any]:
    """Post a two-event batch of which one is refused; the refusal."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{collector}/v1/behavior?k={shop.write_key}", data=body) as resp,
    ):
        assert resp.status == 200
        result = await resp.json()
    assert result["accepted"] == 1
    assert len(result["rejected"]) == 1
    refused: dict[str, Any] = result["rejected"][0]
    return refused


async def test_an_event_that_cannot_be_encoded_is_rejected_alone(
    collector: str, shop: ShopCredentials
) -> None:
    big = orjson.dumps(beacon(event_data={"n": 1})).replace(b'"n":1', b'"n":' + b"9" * 30)
    refused = await _one_refused(collector, shop, b"[" + orjson.dumps(beacon()) + b"," + big + b"]")
    assert refused["index"] == 1
    assert "encoded" in refused["reason"]


async def test_a_time_the_skew_correction_moves_out_of_range_is_rejected_alone(
    collector: str, shop: ShopCredentials
) -> None:
    # Found by the OpenAPI fuzz test: a client clock 70 years ahead moves year 1 below year 1.
    events = [beacon(timestamp="0001-01-01T00:00:00Z"), beacon()]
    body = orjson.dumps({"events": events, "sent_at": "2099-01-01T00:00:00Z"})
    refused = await _one_refused(collector, shop, body)
    assert refused["index"] == 0
    assert "cannot be stored" in refused["reason"]


async def test_health_ready_metrics_openapi(collector: str, shop: ShopCredentials) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{collector}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{collector}/readyz") as resp:
            assert resp.status == 200, await resp.text()
        async with http.post(f"{collector}/v1/behavior?k={shop.write_key}", json=[beacon()]):
            pass
        async with http.get(f"{collector}/metrics") as resp:
            text = await resp.text()
        for name in (
            "eventpipe_http_requests_total",
            "eventpipe_events_accepted_total",
            "eventpipe_produce_latency_seconds_bucket",
            "eventpipe_spool_bytes",
        ):
            assert name in text
        assert 'endpoint="/v1/behavior",status="200"' in text
        async with http.get(f"{collector}/v1/openapi.json") as resp:
            doc = await resp.json()
    assert doc["openapi"].startswith("3.")


def test_openapi_lists_exactly_the_routes() -> None:
    from ingest.collector.app import create_app
    from ingest.collector.openapi import document

    app = create_app(Settings(), None, None)  # type: ignore[arg-type]
    routes = {
        (r.method.lower(), r.resource.canonical)
        for r in app.router.routes()
        if r.method not in ("HEAD", "OPTIONS") and r.resource is not None
    }
    documented = {(m, p) for p, ops in document()["paths"].items() for m in ops}
    assert routes == documented


# Header values as raw bytes: aiohttp decodes them as UTF-8 with surrogateescape,
# so an undecodable byte arrives as a lone surrogate, which asyncpg, orjson and
# hmac.compare_digest all refuse. Each must be a 4xx, never a 500.
HEADER_BYTES = [
    ("X-Write-Key", b"\xff\xfe", 401),  # not UTF-8
    ("X-Write-Key", b"wk_\xc3\xa9", 401),  # UTF-8, not ASCII: cannot be a key
    ("X-Write-Key", b"\xed\xa0\x80", 401),  # an encoded surrogate (CESU-8)
    ("Origin", b"https://\xff.example", 400),
    ("Origin", b"https://\xc3\xa9.example", 400),
    ("Content-Type", b"\xff/json", 415),
    ("Content-Type", b"application/json; charset=\xff", 200),
    ("Content-Encoding", b"\xff", 415),
    ("Content-Encoding", b"gz\xc3\xadp", 415),
    ("X-Forwarded-For", b"\xff, 10.0.0.1", 200),  # the peer is no trusted proxy: ignored
]


@pytest.mark.parametrize(("name", "value", "expected"), HEADER_BYTES)
async def test_header_bytes_get_a_4xx_not_a_500(
    collector: str, shop: ShopCredentials, name: str, value: bytes, expected: int
) -> None:
    body = orjson.dumps([beacon()])
    # The key goes in the query unless the header under test is the key.
    target = "/v1/behavior" if name == "X-Write-Key" else f"/v1/behavior?k={shop.write_key}"
    headers = [(name, value)]
    if name != "Content-Type":
        headers.append(("Content-Type", b"text/plain"))
    status, answer = await raw_request(collector, "POST", target, headers, body)
    assert status == expected, answer
    assert orjson.loads(answer)  # a JSON answer, whatever the header held


async def test_a_key_that_is_not_printable_ascii_is_never_looked_up(db: Database) -> None:
    """Lone surrogates never reach asyncpg: no such key or domain, and no error."""
    shops = ShopDirectory(db, ttl=0)
    for key in ["\udcff\udcfe", "wk_\u00e9", "\ud800", "wk_\x7f", "wk_\ufffd"]:
        assert await shops.by_write_key(key) is None
        assert await shops.by_domain(key) is None


async def test_header_facts_are_stored_as_valid_utf8(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """User-Agent, X-Forwarded-For and the country header, in bytes that are not UTF-8,
    become valid text (or nothing), and the event is a row."""
    proxied = settings.model_copy(
        update={
            "trusted_proxies": ["127.0.0.1/32"],
            "keep_full_ip": True,
            "country_header": "CF-IPCountry",
        }
    )
    session = f"hdr-{uuid.uuid4().hex[:8]}"
    event = beacon(session_id=session, event_id=str(uuid.uuid4()), event_type="page_view")
    headers = [
        ("Content-Type", b"text/plain"),
        ("User-Agent", b"Mozilla/5.0 (iPhone) \xff\xfe caf\xc3\xa9"),
        ("X-Forwarded-For", b"fe80::1%\xff"),  # an IPv6 zone id is no part of an address
        ("CF-IPCountry", b"\xc3\xa9\xc3\xa9"),  # letters, but not a country code
    ]
    async with serving(proxied, db, key_cache_s=0.5) as (server, _):
        status, answer = await raw_request(
            server.url, "POST", f"/v1/behavior?k={shop.write_key}", headers, orjson.dumps([event])
        )
    assert status == 200, answer
    assert orjson.loads(answer) == {"accepted": 1, "rejected": []}
    [record] = await read_topic(settings, 1)
    assert record["context"]["user_agent"] == "Mozilla/5.0 (iPhone) \ufffd\ufffd café"
    assert record["context"]["device_type"] == "mobile"
    assert record["context"]["client_ip"] == "fe80::1"
    assert record["context"]["country_code"] is None

    async def loaded() -> bool:
        return bool(
            await db.pool.fetchval(
                "SELECT count(*) FROM user_sessions WHERE session_id = $1", session
            )
        )

    async with Loader(settings, BEHAVIOR, db, PartitionManager(db)):
        await wait_for(loaded)
    row = await db.pool.fetchrow(
        "SELECT user_agent, country_code FROM user_sessions WHERE session_id = $1", session
    )
    assert row is not None
    assert tuple(row) == ("Mozilla/5.0 (iPhone) \ufffd\ufffd café", None)


async def test_a_gzip_bomb_is_never_inflated_beyond_the_limit(settings: Settings) -> None:
    """read_body on a 100 MB bomb: 413, and memory peaks at a few times the limit, not 100 MB."""
    import tracemalloc

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from ingest.collector.app import SETTINGS, Refused, read_body

    bomb = gzip.compress(b"[" + b" " * 100_000_000 + b"]", compresslevel=9)
    app = web.Application()
    app[SETTINGS] = settings
    request = make_mocked_request(
        "POST",
        "/v1/behavior",
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        app=app,
    )

    async def read() -> bytes:
        return bomb

    request.read = read  # type: ignore[method-assign]
    tracemalloc.start()
    try:
        with pytest.raises(Refused) as refused:
            await read_body(request)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status == 413
    assert peak < 3 * settings.max_decompressed_bytes


def _empty_objects_bomb(settings: Settings) -> bytes:
    """A ~4.5 KB gzip body of ``[{},{},...]`` that inflates to just under the limit."""
    count = (settings.max_decompressed_bytes - 2) // 3
    body = b"[" + b"{}," * (count - 1) + b"{}]"
    return gzip.compress(body, compresslevel=9)


async def test_a_bomb_of_empty_objects_is_refused_before_any_python_object_is_built(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """[{},{},...] (~1.4 million objects): with a bad key in the query, a 401 before the
    body is even read; in the body, or with a good key, a 4xx before orjson or pydantic
    builds anything. Traced memory stays a small multiple of the limit (the server and
    the client share this process, so everything either allocates is counted)."""
    import tracemalloc

    bomb = _empty_objects_bomb(settings)
    assert len(bomb) < 6_000
    gz = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    body_key = gzip.compress(
        b'{"write_key": "wk_nope", "events": ['
        + b"{}," * (settings.max_decompressed_bytes // 3 - 20)
        + b"{}]}",
        compresslevel=9,
    )
    async with (
        serving(settings, db, key_cache_s=10) as (server, _),
        aiohttp.ClientSession() as http,
    ):
        peaks: list[tuple[str, int, int]] = []
        for label, url, data in [
            ("bad key in query", f"{server.url}/v1/behavior?k=wk_nope", bomb),
            ("bad key in body", f"{server.url}/v1/behavior", body_key),
            ("good key", f"{server.url}/v1/behavior?k={shop.write_key}", bomb),
        ]:
            tracemalloc.start()
            try:
                async with http.post(url, data=data, headers=gz) as resp:
                    status = resp.status
                    await resp.read()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            peaks.append((label, status, peak))
    assert [status for _, status, _ in peaks] == [401, 413, 413], peaks
    assert peaks[0][2] < 1_000_000, peaks  # nothing inflated
    for _, _, peak in peaks[1:]:
        assert peak < 3 * settings.max_decompressed_bytes, peaks


class _CountingPool:
    """The real pool, with the shop lookups it runs counted (a spy, not a mock)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.fetchrows = 0

    async def fetchrow(self, *args: Any) -> Any:
        self.fetchrows += 1
        return await self.pool.fetchrow(*args)


async def test_random_keys_never_evict_a_good_key(db: Database, shop: ShopCredentials) -> None:
    """12,000 unknown keys (more than the old cache held before it was cleared): each
    costs one lookup, once (a negative cache of its own), and the good key stays cached
    throughout: zero lookups for it after the flood."""
    counting = _CountingPool(db.pool)
    view = Database(db.dsn)
    view._pool = counting  # type: ignore[assignment]  # the real pool, counted
    shops = ShopDirectory(view, ttl=300)
    assert await shops.by_write_key(shop.write_key) is not None
    assert counting.fetchrows == 1
    keys = [f"wk_{uuid.uuid4().hex}" for _ in range(12_000)]
    for key in keys:
        assert await shops.by_write_key(key) is None
    assert counting.fetchrows == 12_001
    before = counting.fetchrows
    assert await shops.by_write_key(shop.write_key) is not None
    assert counting.fetchrows == before, "the good key was evicted by unknown ones"
    for key in keys[-100:]:
        assert await shops.by_write_key(key) is None
    assert counting.fetchrows == before, "recent unknown keys are cached as misses"


async def test_collector_rss_under_a_burst_of_bomb_requests(
    tmp_path: Any, settings: Settings, shop: ShopCredentials
) -> None:
    """200 concurrent ~4.5 KB gzip bodies of [{},{},...] with a valid key against a
    collector process: every one refused with 413, and the process's RSS (psutil, sampled
    every 5 ms) stays under the README's bound."""
    import threading

    import psutil

    from ingest.core.processes import free_port
    from tests.ingest.collector.test_collector_faults import collector_process, wait_ready

    own = settings.model_copy(update={"state_dir": tmp_path, "rate_limit_per_s": 0.0})
    port = free_port()
    proc = collector_process(own, port)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base)
        process = psutil.Process(proc.pid)
        idle = process.memory_info().rss
        peak = idle
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, process.memory_info().rss)
                done.wait(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        bomb = _empty_objects_bomb(own)
        gz = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        url = f"{base}/v1/behavior?k={shop.write_key}"
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one() -> int:
                async with http.post(url, data=bomb, headers=gz) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one() for _ in range(200)))
        done.set()
        sampler.join()
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 15)
    mib = 1 << 20
    print(f"collector RSS idle {idle / mib:.0f} MiB, peak {peak / mib:.0f} MiB")
    assert set(statuses) == {413}, sorted(set(statuses))
    assert peak - idle < 64 * mib, (idle / mib, peak / mib)
    assert peak < 256 * mib, (idle / mib, peak / mib)


async def test_a_batch_waits_for_a_decode_slot_then_is_answered_503() -> None:
    """With every decode slot taken, a batch waits ``decode_wait_s`` for one, then is
    refused with 503 and Retry-After; a free slot is taken at once, and given back."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from ingest.collector import app as collector

    application = web.Application()
    application[collector.SETTINGS] = Settings(decode_concurrency=1, decode_wait_s=0.05)
    slots = application[collector.DECODE_SLOTS] = asyncio.Semaphore(1)
    request = make_mocked_request("POST", "/v1/behavior", app=application)
    async with collector._decode_slot(request):
        assert slots.locked()
        started = asyncio.get_running_loop().time()
        with pytest.raises(collector.Refused) as refused:
            async with collector._decode_slot(request):
                pass
        assert asyncio.get_running_loop().time() - started >= 0.04
        assert refused.value.status == 503
        assert refused.value.headers == {"Retry-After": "1"}
    assert not slots.locked()
    async with collector._decode_slot(request):  # free again: taken at once
        assert slots.locked()
