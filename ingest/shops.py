"""Shops and their write keys: lookup with a short-lived cache, and the demo shop of ``up``."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from uuid import UUID

from ingest.db import Database


@dataclass(frozen=True)
class Shop:
    """The tenant a write key belongs to."""

    id: UUID
    domain: str
    allowed_origins: tuple[str, ...] | None


class ShopDirectory:
    """Resolves write keys to shops, caching answers (unknown keys too) for ``ttl`` seconds.

    A revoked key is therefore refused at most ``ttl`` seconds after revocation.
    """

    def __init__(self, db: Database, ttl: float) -> None:
        self.db = db
        self.ttl = ttl
        self._cache: dict[str, tuple[float, Shop | None]] = {}

    async def by_write_key(self, write_key: str) -> Shop | None:
        """The live shop of ``write_key``, or None when the key is unknown or revoked."""
        now = time.monotonic()
        hit = self._cache.get(write_key)
        if hit is not None and hit[0] > now:
            return hit[1]
        row = await self.db.fetchrow("shop_by_write_key", write_key)
        shop = None
        if row is not None:
            origins = tuple(row["allowed_origins"]) if row["allowed_origins"] else None
            # asyncpg's UUID subclass is not orjson-serialisable; keep the stdlib type.
            shop = Shop(UUID(bytes=row["id"].bytes), row["domain"], origins)
        if len(self._cache) > 10_000:  # bound memory against key-guessing clients
            self._cache.clear()
        self._cache[write_key] = (now + self.ttl, shop)
        return shop


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
        row = await conn.fetchrow(db.q["upsert_shop"], domain, secrets.token_hex(32))
        assert row is not None
        key = await conn.fetchval(db.q["live_write_key"], row["id"])
        if key is None:
            key = "wk_" + secrets.token_urlsafe(18)
            await conn.execute(db.q["add_write_key"], key, row["id"])
    return ShopCredentials(UUID(bytes=row["id"].bytes), domain, key, row["webhook_secret"])
