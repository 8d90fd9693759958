"""Shops and their write keys: lookup with a short-lived cache, and the demo shop of ``up``."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import structlog

from ingest.core.db import Database, queries
from ingest.core.errors import ConfigError
from ingest.core.headers import is_printable_ascii

log = structlog.get_logger(__name__)


IpPolicy = Literal["keep", "truncate", "remove"]
BotPolicy = Literal["drop", "flag", "keep"]
IP_POLICIES: tuple[IpPolicy, ...] = ("keep", "truncate", "remove")
BOT_POLICIES: tuple[BotPolicy, ...] = ("drop", "flag", "keep")
# Entries of a shop's bot_deny_list kept (each at most this long): the collector tests
# every one against each new User-Agent it sees.
MAX_DENY_ENTRIES = 100
MAX_DENY_LENGTH = 200


@dataclass(frozen=True)
class Privacy:
    """A shop's privacy settings (``shops.settings``); None: the collector's default
    (``Settings.ip_policy``, ``consent_required``, ``bot_policy``)."""

    ip_policy: IpPolicy | None = None
    consent_required: bool | None = None
    bot_policy: BotPolicy | None = None
    # Case-insensitive substrings of User-Agents the shop counts as bots, besides the
    # crawler list (its own monitor, a partner's scraper).
    bot_deny_list: tuple[str, ...] = ()


def privacy(settings: object) -> Privacy:
    """The privacy settings in a shop's ``settings`` object (its JSON text or the
    decoded value). A key of the wrong type or value is ignored (the default applies)
    and logged, never a refusal of the shop's events: ``shops set`` validates what it
    writes, and a hand-edited row must not stop collection."""
    if isinstance(settings, str | bytes):
        try:
            settings = json.loads(settings)
        except ValueError:
            settings = None
    if not isinstance(settings, dict):
        return Privacy()
    ip, consent, bots = (
        settings.get("ip_policy"),
        settings.get("consent_required"),
        settings.get("bot_policy"),
    )
    deny = settings.get("bot_deny_list")
    bad = [
        name
        for name, ok in (
            ("ip_policy", ip is None or ip in IP_POLICIES),
            ("consent_required", consent is None or isinstance(consent, bool)),
            ("bot_policy", bots is None or bots in BOT_POLICIES),
            ("bot_deny_list", deny is None or isinstance(deny, list)),
        )
        if not ok
    ]
    if bad:
        log.warning("shop settings ignored: not a valid value", keys=bad)
    entries = tuple(
        e.lower()[:MAX_DENY_LENGTH]
        for e in (deny if isinstance(deny, list) else [])
        if isinstance(e, str) and e.strip()
    )[:MAX_DENY_ENTRIES]
    return Privacy(
        ip_policy=cast("IpPolicy", ip) if ip in IP_POLICIES else None,
        consent_required=consent if isinstance(consent, bool) else None,
        bot_policy=cast("BotPolicy", bots) if bots in BOT_POLICIES else None,
        bot_deny_list=entries,
    )


@dataclass(frozen=True)
class Shop:
    """The tenant a write key belongs to."""

    id: UUID
    domain: str
    allowed_origins: tuple[str, ...] | None
    privacy: Privacy = Privacy()


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

    async def _cached(self, query: str, key: str) -> tuple[Shop, asyncpg.Record] | None:
        # Keys and domains are printable ASCII: anything else is no such key, and is never
        # sent to PostgreSQL (text can't hold NUL; a lone surrogate from an undecodable
        # header byte can't be encoded at all).
        if len(key) > 255 or not is_printable_ascii(key):
            return None
        now = time.monotonic()
        for cache in (self._hits, self._misses):
            found, entry = cache.get((query, key), now)
            if found:
                return cast("tuple[Shop, asyncpg.Record] | None", entry)
        row = await queries.fetchrow(self.db.pool, query, key)
        if row is None:
            self._hits.discard((query, key))
            self._misses.put((query, key), now + self.ttl, None)
            return None
        # Cached as the caller uses it: a Shop is built once per key and interval,
        # not per request (its settings JSON parsed, its UUID converted).
        entry = (_shop(row), row)
        self._misses.discard((query, key))
        self._hits.put((query, key), now + self.ttl, entry)
        return entry

    async def by_write_key(self, write_key: str) -> Shop | None:
        """The live shop of ``write_key``, or None when the key is unknown or revoked."""
        entry = await self._cached("shop_by_write_key", write_key)
        return entry[0] if entry is not None else None

    async def by_domain(self, domain: str) -> tuple[Shop, str] | None:
        """The live shop of ``domain`` with its webhook secret, or None."""
        entry = await self._cached("shop_by_domain", domain)
        return (entry[0], entry[1]["webhook_secret"]) if entry is not None else None


def _shop(row: asyncpg.Record) -> Shop:
    origins = tuple(row["allowed_origins"]) if row["allowed_origins"] else None
    # asyncpg's UUID subclass is not orjson-serialisable; keep the stdlib type.
    return Shop(UUID(bytes=row["id"].bytes), row["domain"], origins, privacy(row["settings"]))


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


# --- onboarding: ``eventpipe shops add|list|show|set`` -------------------------------

# A host name as Shopify (and DNS) spell it: dot-separated labels of letters, digits and
# inner hyphens; compared lower-cased, the way X-Shopify-Shop-Domain sends it.
_DOMAIN = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+\Z"
)


def valid_domain(domain: str) -> str:
    """``domain`` lower-cased, or ConfigError when it is no host name."""
    normal = domain.strip().lower()
    if not _DOMAIN.match(normal):
        raise ConfigError(
            f"not a shop domain: {domain!r}", hint="a host name such as example.myshopify.com"
        )
    return normal


def valid_origin(origin: str) -> str:
    """``origin`` as a browser sends it in ``Origin`` (``scheme://host[:port]``, lower-case
    scheme and host), or ConfigError. The collector compares the header with these strings
    exactly, so anything with a path, query, credentials or another scheme would never
    match and is refused here instead."""
    hint = "an origin is scheme://host[:port] with http or https, e.g. https://shop.example"
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        raise ConfigError(f"not an origin: {origin!r}", hint=hint) from None
    if (
        parts.scheme.lower() not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or "#" in origin
        or "?" in origin
        or not is_printable_ascii(origin)
        or " " in origin
    ):
        raise ConfigError(f"not an origin: {origin!r}", hint=hint)
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port is not None else "")


def valid_retention_days(days: int) -> int:
    """``days`` when it is at least 1, else ConfigError."""
    if days < 1:
        raise ConfigError(
            f"--retention-days must be at least 1, not {days}",
            hint="leave it out to keep the partition policy's retention",
        )
    return days


@dataclass(frozen=True)
class ShopInfo:
    """What ``shops list|show`` prints about a shop (never its secret)."""

    id: UUID
    domain: str
    allowed_origins: list[str] | None
    retention_days: int | None
    live_keys: int
    installed_at: str
    uninstalled_at: str | None
    # The privacy settings the shop sets (of SETTING_KEYS; absent: the collector's default).
    privacy: dict[str, Any] = field(default_factory=dict)


# The per-shop settings ``shops set`` changes besides origins and retention (README,
# "A shop's privacy settings"), and the values each may take.
UNINSTALLED_DATA = ("delete", "anonymize")
SETTING_KEYS = ("ip_policy", "consent_required", "bot_policy", "bot_deny_list", "uninstalled_data")


def valid_setting(key: str, value: Any) -> Any:
    """``value`` for the shop setting ``key`` as stored (a deny list's entries stripped);
    ConfigError naming what it may be otherwise."""
    choices: tuple[object, ...] | None = {
        "ip_policy": IP_POLICIES,
        "consent_required": (True, False),
        "bot_policy": BOT_POLICIES,
        "uninstalled_data": UNINSTALLED_DATA,
    }.get(key)
    if choices is not None:
        if value not in choices or type(value) is not type(choices[0]):
            shown = ", ".join(str(c).lower() for c in choices)
            raise ConfigError(f"{key} {value!r} is not one of {shown}")
        return value
    if key != "bot_deny_list":
        raise ConfigError(f"{key} is not a shop setting", hint=", ".join(SETTING_KEYS))
    entries = [str(e).strip() for e in value]
    if len(entries) > MAX_DENY_ENTRIES:
        raise ConfigError(f"bot_deny_list has {len(entries)} entries, at most {MAX_DENY_ENTRIES}")
    for entry in entries:
        if not entry or len(entry) > MAX_DENY_LENGTH or not entry.isprintable():
            raise ConfigError(
                f"bot_deny_list entry {entry!r} is not 1 to {MAX_DENY_LENGTH} printable characters"
            )
    return entries


async def create_shop(
    db: Database,
    domain: str,
    *,
    webhook_secret: str | None = None,
    allowed_origins: Sequence[str] | None = None,
    retention_days: int | None = None,
) -> ShopCredentials:
    """Create a new shop with a write key; ConfigError when the domain exists or an input
    is malformed. ``allowed_origins`` None: any origin may post beacons."""
    domain = valid_domain(domain)
    origins = [valid_origin(o) for o in allowed_origins] if allowed_origins else None
    settings: dict[str, Any] = {}
    if retention_days is not None:
        settings["data_retention_days"] = valid_retention_days(retention_days)
    if webhook_secret is not None and (
        not webhook_secret
        or not is_printable_ascii(webhook_secret)
        or webhook_secret.strip() != webhook_secret
    ):
        raise ConfigError(
            "--webhook-secret must be printable ASCII without surrounding spaces",
            hint="leave it out to have one generated",
        )
    secret = webhook_secret or secrets.token_hex(32)
    key = "wk_" + secrets.token_urlsafe(18)
    async with db.pool.acquire() as conn, conn.transaction():
        shop_id = await queries.fetchval(
            conn, "shop_create", domain, secret, origins, json.dumps(settings)
        )
        if shop_id is None:
            raise ConfigError(
                f"shop {domain} exists",
                hint="see it with `eventpipe shops show`, change it with `eventpipe shops set`",
            )
        await queries.execute(conn, "add_write_key", key, shop_id)
    return ShopCredentials(UUID(bytes=shop_id.bytes), domain, key, secret)


async def list_shops(db: Database, domain: str | None = None) -> list[ShopInfo]:
    """Every shop (or the one of ``domain``), by domain."""
    rows = await queries.fetch(db.pool, "shop_list", domain)
    return [_info(r) for r in rows]


async def show_shop(db: Database, domain: str) -> ShopInfo:
    """The shop of ``domain``; ConfigError when there is none."""
    found = await list_shops(db, valid_domain(domain))
    if not found:
        raise _no_such_shop(domain)
    return found[0]


async def shop_secret(db: Database, domain: str) -> str:
    """The webhook secret of ``domain``; ConfigError when there is no such shop."""
    secret = await queries.fetchval(db.pool, "shop_secret", valid_domain(domain))
    if secret is None:
        raise _no_such_shop(domain)
    return cast("str", secret)


async def update_shop(
    db: Database,
    domain: str,
    *,
    allowed_origins: Sequence[str] | None = None,
    clear_origins: bool = False,
    retention_days: int | None = None,
    settings: Mapping[str, Any] | None = None,
) -> ShopInfo:
    """Replace the allowed origins (or allow any, ``clear_origins``), set the retention
    and/or the ``settings`` given (``SETTING_KEYS``; None removes one: its default
    applies); the shop as it is now. ConfigError on bad input or an unknown shop."""
    changes = {k: None if v is None else valid_setting(k, v) for k, v in (settings or {}).items()}
    kept = {k: v for k, v in changes.items() if v is not None}
    removed = [k for k, v in changes.items() if v is None]
    if clear_origins and allowed_origins:
        raise ConfigError(
            "--clear-origins and --allowed-origin contradict each other",
            hint="give one of them",
        )
    origins = [valid_origin(o) for o in allowed_origins] if allowed_origins else None
    if retention_days is not None:
        valid_retention_days(retention_days)
    if origins is None and not clear_origins and retention_days is None and not changes:
        raise ConfigError(
            "nothing to change",
            hint="give --allowed-origin, --clear-origins, --retention-days or a privacy setting",
        )
    domain = valid_domain(domain)
    changed = await queries.fetchval(
        db.pool,
        "shop_set",
        domain,
        clear_origins,
        origins,
        retention_days,
        json.dumps(kept) if kept else None,
        removed or None,
    )
    if changed is None:
        raise _no_such_shop(domain)
    return await show_shop(db, domain)


def _no_such_shop(domain: str) -> ConfigError:
    return ConfigError(f"no shop {domain}", hint="see the shops with `eventpipe shops list`")


def _info(row: asyncpg.Record) -> ShopInfo:
    days = row["retention_days"]
    settings = json.loads(row["settings"]) if row["settings"] else {}
    if not isinstance(settings, dict):
        settings = {}
    return ShopInfo(
        id=UUID(bytes=row["id"].bytes),
        domain=row["domain"],
        allowed_origins=list(row["allowed_origins"])
        if row["allowed_origins"] is not None
        else None,
        retention_days=days,
        live_keys=row["live_keys"],
        installed_at=row["installed_at"].isoformat(timespec="seconds"),
        uninstalled_at=(
            row["uninstalled_at"].isoformat(timespec="seconds") if row["uninstalled_at"] else None
        ),
        privacy={k: settings[k] for k in SETTING_KEYS if k in settings},
    )
