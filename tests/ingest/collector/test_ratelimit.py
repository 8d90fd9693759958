"""Rate limits per (write key, client address) under a per-key ceiling (issue 18, point 3)."""

from __future__ import annotations

import aiohttp
import orjson

from ingest.collector.ratelimit import RateLimiter
from ingest.collector.server import serving
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from tests.ingest.collector.test_app import beacon


def test_a_refused_client_spends_nothing_of_the_key() -> None:
    limiter = RateLimiter(key_rate=1.0, key_burst=5, client_rate=1.0, client_burst=2)
    assert [limiter.take("k", "a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("k", "a") > 0  # a's own bucket is empty
    assert limiter.take("k", "a") > 0  # ... and its refusals cost the key nothing
    assert [limiter.take("k", c) for c in ("b", "b", "c")] == [0.0, 0.0, 0.0]
    assert limiter.take("k", "d") > 0  # the key's ceiling: 5 taken
    assert limiter.take("other", "d") == 0.0


def test_buckets_are_bounded_and_eviction_only_forgives() -> None:
    limiter = RateLimiter(key_rate=1.0, key_burst=100, client_rate=1.0, client_burst=1, max_keys=3)
    assert limiter.take("k", "a") == 0.0
    for client in ("b", "c", "d"):
        limiter.take("k", client)
    assert limiter.size() <= 3 + 1
    assert limiter.take("k", "a") == 0.0  # a was evicted: a full bucket again


async def _post(http: aiohttp.ClientSession, url: str, body: bytes, client: str) -> int:
    headers = {"Content-Type": "text/plain", "X-Forwarded-For": client}
    async with http.post(url, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_one_address_spending_the_budget_does_not_starve_another(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """An attacker (one address, behind our trusted proxy) posts until refused; a visitor
    of the same shop from another address is still served. Enough addresses together
    meet the key's ceiling."""
    limited = settings.model_copy(
        update={
            "trusted_proxies": ["127.0.0.1/32"],
            "rate_limit_per_s": 0.01,
            "rate_limit_burst": 8,
            "rate_limit_client_per_s": 0.01,
            "rate_limit_client_burst": 3,
        }
    )
    body = orjson.dumps([beacon()])
    async with serving(limited, db, key_cache_s=10, spool=False) as (server, _):
        url = f"{server.url}/v1/behavior?k={shop.write_key}"
        async with aiohttp.ClientSession() as http:
            attacker = [await _post(http, url, body, "203.0.113.9") for _ in range(6)]
            visitor = [await _post(http, url, body, "198.51.100.7") for _ in range(3)]
            others = [await _post(http, url, body, f"192.0.2.{i}") for i in range(1, 5)]
    assert attacker == [200, 200, 200, 429, 429, 429]
    assert visitor == [200, 200, 200]
    assert others == [200, 200, 429, 429]  # 3 + 3 + 2: the key's 8


async def test_an_empty_batch_costs_no_token(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    tight = settings.model_copy(
        update={
            "rate_limit_per_s": 0.01,
            "rate_limit_burst": 2,
            "rate_limit_client_per_s": 0.01,
            "rate_limit_client_burst": 2,
        }
    )
    async with serving(tight, db, key_cache_s=10, spool=False) as (server, _):
        url = f"{server.url}/v1/behavior?k={shop.write_key}"
        async with aiohttp.ClientSession() as http:
            empties = []
            for body in [b"[]", b'{"events": []}', b'{"events": [], "sent_at": null}'] * 5:
                empties.append(await _post(http, url, body, "127.0.0.1"))
            real = [await _post(http, url, orjson.dumps([beacon()]), "127.0.0.1") for _ in range(3)]
            async with http.post(f"{server.url}/v1/behavior?k=wk_nope", data=b"[]") as resp:
                unknown = resp.status
    assert empties == [200] * 15
    assert real == [200, 200, 429]
    assert unknown == 401  # an empty batch is still authenticated
