"""Property-based: whatever a client sends to any endpoint, never a 5xx, never a crash."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
from urllib.parse import urlsplit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.collector.webhooks import signature
from ingest.core.shops import ShopCredentials

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = [
    "event_type",
    "session_id",
    "page_url",
    "timestamp",
    "event_id",
    "anon_id",
    "ts",
    "props",
    "coordinates",
    "event_data",
    "metadata",
    "sent_at",
    "events",
    "write_key",
]
EVENTISH = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8)
BODIES = st.one_of(
    st.binary(max_size=2000),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.lists(EVENTISH, max_size=5).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"events": st.lists(EVENTISH, max_size=5)}).map(
        lambda v: json.dumps(v).encode()
    ),
    st.fixed_dictionaries({"batch": st.lists(EVENTISH, max_size=5)}).map(  # a Segment batch
        lambda v: json.dumps(v).encode()
    ),
    st.just(b'{"batch": [{"type": "track", "event": "e", "anonymousId": "a"}], "context": 1}'),
    st.just(b"[" * 5000 + b"]" * 5000),  # deep nesting
    st.just(b'{"events": [{"event_type": "click", "event_type": "scroll"}]}'),  # duplicate keys
    st.just(b'{"events": [{"page_url": "\\u0000"}], "sent_at": 1e400}'),
    st.just(b'["\\ud800"]'),  # a lone surrogate
)
PATHS = [
    "/v1/behavior",
    "/v1/storefront",
    "/v1/webhooks/shopify",
    "/v1/openapi.json",
    "/healthz",
    "/readyz",
    "/v1/beacon.js",
    "/nope",
    # The Segment API (ingest.collector.segment): a batch, one message, the dialects'
    # routes and the SDKs' configuration calls.
    "/v1/batch",
    "/v1/t",
    "/v1/import",
    "/beacon/v1/batch",
    "/api/s/track",
    "/v1/projects/wk_x/settings",
    "/sourceConfig",
]
CONTENT_TYPES = ["application/json", "text/plain;charset=UTF-8", "image/png", "", "text/plain; x"]
ENCODINGS = ["", "gzip", "deflate", "gzip, br", "GZIP"]
HEADERS = [
    "X-Write-Key",
    "X-Shopify-Hmac-Sha256",
    "X-Shopify-Shop-Domain",
    "X-Shopify-Topic",
    "X-Shopify-Webhook-Id",
    "X-Shopify-Triggered-At",
    "Origin",
    "X-Forwarded-For",
    "User-Agent",
    "Content-Type",
    "Content-Encoding",
    "CF-IPCountry",
    "Authorization",  # the Segment API's HTTP Basic write key
    "Access-Control-Request-Headers",
]
# Header values as the bytes on the wire: printable ASCII, any Unicode as UTF-8, and
# arbitrary bytes (undecodable ones reach the handlers as lone surrogates). CR and LF
# would end the header line, so http.client refuses them.
HEADER_VALUES = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
        str.encode
    ),
    st.text(max_size=20).map(str.encode),
    st.binary(max_size=20),
    st.sampled_from([b"\xff\xfe", b"\xed\xa0\x80", b"wk_\xc3\xa9", b"x", b"\x80" * 3]),
).filter(lambda v: b"\r" not in v and b"\n" not in v)


def _exchange(
    base: str, method: str, path: str, body: bytes, headers: dict[str, str | bytes]
) -> int:
    """The status of one request; header values given as bytes go on the wire as they are."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


async def test_no_request_gets_a_5xx(collector: str, shop: ShopCredentials) -> None:
    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "OPTIONS"]),
        path=st.sampled_from(PATHS),
        key=st.sampled_from(
            ["", "?k=" + shop.write_key, "?k=wk_bad", "?k=%00", "?writeKey=" + shop.write_key]
        ),
        body=BODIES,
        content_type=st.sampled_from(CONTENT_TYPES),
        encoding=st.sampled_from(ENCODINGS),
        compress=st.booleans(),
        extra=st.dictionaries(st.sampled_from(HEADERS), HEADER_VALUES, max_size=4),
    )
    def check(
        method: str,
        path: str,
        key: str,
        body: bytes,
        content_type: str,
        encoding: str,
        compress: bool,
        extra: dict[str, bytes],
    ) -> None:
        if extra.get("X-Shopify-Shop-Domain") == b"x":
            extra["X-Shopify-Shop-Domain"] = shop.domain.encode()
        payload = gzip.compress(body) if compress else body
        headers: dict[str, str | bytes] = {**extra}
        if content_type:
            headers["Content-Type"] = content_type
        if encoding:
            headers["Content-Encoding"] = encoding
        status = _exchange(collector, method, path + key, payload, headers)
        assert status < 500, (method, path, body[:200], headers, status)

    await asyncio.to_thread(check)


async def test_no_header_value_gets_a_5xx(collector: str, shop: ShopCredentials) -> None:
    """Good requests (a batch with the shop's key, a signed webhook) with some of their
    headers replaced by arbitrary bytes: a 4xx or a 2xx, never a 5xx."""
    beacon = {"event_type": "click", "session_id": "hdr", "page_url": "https://x/"}
    batch = json.dumps({"events": [beacon], "write_key": shop.write_key}).encode()
    message = {"type": "track", "event": "e", "anonymousId": "a"}
    segment_batch = json.dumps({"batch": [message], "writeKey": shop.write_key}).encode()
    order = json.dumps({"id": 1, "created_at": "2026-11-20T10:00:00Z"}).encode()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        path=st.sampled_from(
            ["/v1/behavior", "/v1/storefront", "/v1/webhooks/shopify", "/v1/batch", "/v1/t"]
        ),
        key_in_query=st.booleans(),
        replaced=st.dictionaries(st.sampled_from(HEADERS), HEADER_VALUES, min_size=1, max_size=3),
    )
    def check(path: str, key_in_query: bool, replaced: dict[str, bytes]) -> None:
        headers: dict[str, str | bytes] = {"Content-Type": "text/plain"}
        body = batch
        if path in ("/v1/batch", "/v1/t"):  # the Segment API: key in the body too
            body = (
                segment_batch
                if path == "/v1/batch"
                else json.dumps({**message, "writeKey": shop.write_key}).encode()
            )
        if path.startswith("/v1/webhooks/"):
            body = order
            headers.update(
                {
                    "Content-Type": "application/json",
                    "X-Shopify-Hmac-Sha256": signature(shop.webhook_secret, body),
                    "X-Shopify-Shop-Domain": shop.domain,
                    "X-Shopify-Topic": "orders/create",
                    "X-Shopify-Webhook-Id": "w-1",
                }
            )
        headers.update(replaced)
        # Without k in the query, the X-Write-Key header (if any) is the key used.
        target = path + (f"?k={shop.write_key}" if key_in_query else "")
        status = _exchange(collector, "POST", target, body, headers)
        assert status < 500, (path, headers, status)

    await asyncio.to_thread(check)


async def test_a_slow_client_does_not_hold_up_others(collector: str, shop: ShopCredentials) -> None:
    """A client trickling its body (slowloris-style) is served in the end; others meanwhile."""
    parts = urlsplit(collector)
    body = json.dumps(
        [{"event_type": "click", "session_id": "slow", "page_url": "https://x/"}]
    ).encode()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(
        f"POST /v1/behavior?k={shop.write_key} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    await writer.drain()
    fast: list[int] = []
    for i, byte in enumerate(body):
        writer.write(bytes([byte]))
        await writer.drain()
        if i % 10 == 0:  # meanwhile, ordinary requests are answered at once
            status = await asyncio.to_thread(
                _exchange,
                collector,
                "POST",
                f"/v1/behavior?k={shop.write_key}",
                body,
                {"Content-Type": "text/plain"},
            )
            fast.append(status)
        await asyncio.sleep(0.02)
    status_line = await asyncio.wait_for(reader.readline(), timeout=10)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 200")
    assert fast and set(fast) == {200}


async def test_a_flood_of_unauthenticated_requests_gets_no_5xx(
    collector: str, shop: ShopCredentials
) -> None:
    """Many concurrent requests with random keys (query, header or body) and arbitrary
    bodies, gzip bombs of empty objects among them: every answer a 4xx (or a 2xx for
    an empty batch of a good key), never a 5xx, and a good client is served meanwhile."""
    bomb = gzip.compress(b"[" + b"{}," * 1_300_000 + b"{}]", compresslevel=9)
    requests: list[tuple[str, bytes, dict[str, str | bytes]]] = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        path=st.sampled_from(["/v1/behavior", "/v1/storefront"]),
        where=st.sampled_from(["query", "header", "body", "none"]),
        key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=40),
        body=BODIES,
        gzipped=st.sampled_from(["no", "yes", "bomb"]),
    )
    def collect(path: str, where: str, key: str, body: bytes, gzipped: str) -> None:
        headers: dict[str, str | bytes] = {"Content-Type": "text/plain"}
        target = path + (f"?k=wk_{key}" if where == "query" else "")
        if where == "header":
            headers["X-Write-Key"] = f"wk_{key}"
        if where == "body":
            body = json.dumps({"write_key": f"wk_{key}", "events": [{}]}).encode()
        if gzipped != "no":
            headers["Content-Encoding"] = "gzip"
            body = bomb if gzipped == "bomb" else gzip.compress(body)
        requests.append((target, body, headers))

    collect()
    semaphore = asyncio.Semaphore(32)

    async def send(target: str, body: bytes, headers: dict[str, str | bytes]) -> int:
        async with semaphore:
            return await asyncio.to_thread(_exchange, collector, "POST", target, body, headers)

    good = json.dumps([{"event_type": "click", "session_id": "g", "page_url": "https://x/"}])
    flood = asyncio.gather(*(send(*r) for r in requests))
    served = await send(f"/v1/behavior?k={shop.write_key}", good.encode(), {})
    statuses = await flood
    assert all(status < 500 for status in statuses), sorted(set(statuses))
    assert served == 200
