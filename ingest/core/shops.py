"""Shops and their write keys: lookup with a short-lived cache, and the demo shop of ``up``."""

from __future__ import annotations

import secrets
import time
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


class ShopDirectory:
    """Resolves write keys and shop domains, caching answers (misses too) for ``ttl`` seconds.

    A revoked key is therefore refused at most ``ttl`` seconds after revocation.
    """

    def __init__(self, db: Database, ttl: float) -> None:
        self.db = db
        self.ttl = ttl
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}

    async def _cached(self, query: str, key: str) -> asyncpg.Record | None:
        # Keys and domains are printable ASCII: anything else is no such key, and is never
        # sent to PostgreSQL (text can't hold NUL; a lone surrogate from an undecodable
        # header byte can't be encoded at all).
        if len(key) > 255 or not is_printable_ascii(key):
            return None
        now = time.monotonic()
        hit = self._cache.get((query, key))
        if hit is not None and hit[0] > now:
            return cast("asyncpg.Record | None", hit[1])
        row = await queries.fetchrow(self.db.pool, query, key)
        if len(self._cache) > 10_000:  # bound memory against key-guessing clients
            self._cache.clear()
        self._cache[(query, key)] = (now + self.ttl, row)
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
