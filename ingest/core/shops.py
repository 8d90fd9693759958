"""Shops and their write keys: lookup with a short-lived cache, and the demo shop of ``up``."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast
from uuid import UUID

import asyncpg

from ingest.core.db import Database, queries
from ingest.core.headers import is_printable_ascii


@dataclass(frozen=True)
class Shop:
    """The tenant a write key belongs to."""

    id: UUID
    domain: str
    allowed_origins: tuple[str, ...] | None


# Entries of each cache: a live key or domain found (hits), and one that is not
# (misses). Separate, so that clients guessing keys only ever evict each other's
# guesses, never a shop's real key.
HIT_CACHE_SIZE = 50_000
MISS_CACHE_SIZE = 10_000


class _Lru:
    """A bounded mapping dropping its least recently used entry (hand-written: the
    project has no cachetools, and an OrderedDict does it in a few lines)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, str], tuple[float, Any]] = OrderedDict()

    def get(self, key: tuple[str, str], now: float) -> tuple[bool, Any]:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= now:
            return False, None
        self._entries.move_to_end(key)
        return True, entry[1]

    def put(self, key: tuple[str, str], expires: float, value: Any) -> None:
        self._entries[key] = (expires, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def discard(self, key: tuple[str, str]) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class ShopDirectory:
    """Resolves write keys and shop domains, caching answers (misses too) for ``ttl`` seconds.

    A revoked key is therefore refused at most ``ttl`` seconds after revocation.
    Hits and misses live in separate LRU caches (``HIT_CACHE_SIZE``,
    ``MISS_CACHE_SIZE``): a flood of unknown keys costs one query per new key
    and can evict only other unknown keys.
    """

    def __init__(
        self,
        db: Database,
        ttl: float,
        *,
        hits: int = HIT_CACHE_SIZE,
        misses: int = MISS_CACHE_SIZE,
    ) -> None:
        self.db = db
        self.ttl = ttl
        self._hits = _Lru(hits)
        self._misses = _Lru(misses)

    async def _cached(self, query: str, key: str) -> asyncpg.Record | None:
        # Keys and domains are printable ASCII: anything else is no such key, and is never
        # sent to PostgreSQL (text can't hold NUL; a lone surrogate from an undecodable
        # header byte can't be encoded at all).
        if len(key) > 255 or not is_printable_ascii(key):
            return None
        now = time.monotonic()
        for cache in (self._hits, self._misses):
            found, row = cache.get((query, key), now)
            if found:
                return cast("asyncpg.Record | None", row)
        row = await queries.fetchrow(self.db.pool, query, key)
        if row is None:
            self._hits.discard((query, key))
            self._misses.put((query, key), now + self.ttl, None)
        else:
            self._misses.discard((query, key))
            self._hits.put((query, key), now + self.ttl, row)
        return row

    async def by_write_key(self, write_key: str) -> Shop | None:
        """The live shop of ``write_key``, or None when the key is unknown or revoked."""
        row = await self._cached("shop_by_write_key", write_key)
        return _shop(row) if row is not None else None

    async def by_domain(self, domain: str) -> tuple[Shop, str] | None:
        """The live shop of ``domain`` with its webhook secret, or None."""
        row = await self._cached("shop_by_domain", domain)
        return (_shop(row), row["webhook_secret"]) if row is not None else None


def _shop(row: asyncpg.Record) -> Shop:
    origins = tuple(row["allowed_origins"]) if row["allowed_origins"] else None
    # asyncpg's UUID subclass is not orjson-serialisable; keep the stdlib type.
    return Shop(UUID(bytes=row["id"].bytes), row["domain"], origins)


@dataclass(frozen=True)
class ShopCredentials:
    """A shop with one live write key and its webhook secret."""

    shop_id: UUID
    domain: str
    write_key: str
    webhook_secret: str


async def ensure_shop(db: Database, domain: str) -> ShopCredentials:
    """Create ``domain`` (with a write key and webhook secret) unless it exists; return it."""
    async with db.pool.acquire() as conn, conn.transaction():
        row = await queries.fetchrow(conn, "upsert_shop", domain, secrets.token_hex(32))
        assert row is not None
        key = await queries.fetchval(conn, "live_write_key", row["id"])
        if key is None:
            key = "wk_" + secrets.token_urlsafe(18)
            await queries.execute(conn, "add_write_key", key, row["id"])
    return ShopCredentials(UUID(bytes=row["id"].bytes), domain, key, row["webhook_secret"])
