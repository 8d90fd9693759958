"""Erased visitors: how their ids are hashed, and the loaders' suppression list.

``eventpipe erase`` (``ingest.privacy``) writes ``(shop, id_hash(...))`` to
``erasure_suppressions`` before it deletes; the loaders keep that list in
memory (``Suppression``, refreshed on a timer) and drop the events it names
that were still on their way. The ids themselves are never stored: an
HMAC-SHA256 under the install's secret salt (migration 0013).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

import orjson
import structlog

from ingest.core.db import Executor, queries

log = structlog.get_logger(__name__)

KINDS = ("anon_id", "session_id", "user_id")


def id_hash(salt: bytes, shop_id: str, kind: str, value: str) -> bytes:
    """The HMAC of an id of ``kind`` in shop ``shop_id`` (the shop and kind are part of
    it: the same string as another shop's id, or as a session id, is another hash)."""
    if kind not in KINDS:
        raise ValueError(f"unknown id kind {kind!r}")
    message = b"\x00".join((str(shop_id).lower().encode(), kind.encode(), value.encode()))
    return hmac.new(salt, message, hashlib.sha256).digest()


def _event_ids(event: Any) -> Iterable[tuple[str, str]]:
    """The (kind, id) pairs an event carries: its anon and session ids, and a user id
    where a protocol kept one (Snowplow's ``props.$user_id``, ``metadata.user_id``)."""
    for kind in ("anon_id", "session_id", "user_id"):
        value = event.get(kind)
        if isinstance(value, str):
            yield kind, value
    for holder, key in (("props", "$user_id"), ("metadata", "user_id")):
        inner = event.get(holder)
        if isinstance(inner, dict) and isinstance(inner.get(key), str):
            yield "user_id", inner[key]


class Suppression:
    """The suppression list of one process: shop -> HMACs, with the shops' ids as bytes
    so that a record of no suppressed shop is let through by a substring test alone."""

    def __init__(self) -> None:
        self.salt = b""
        self.hashes: dict[str, set[bytes]] = {}
        self._shops: tuple[bytes, ...] = ()
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """Whether any visitor is suppressed (else the loaders skip every check)."""
        return bool(self._shops)

    async def load(self, on: Executor) -> None:
        """Read the list (and the salt) again."""
        rows = await queries.fetch(on, "suppression_list")
        hashes: dict[str, set[bytes]] = {}
        for r in rows:
            hashes.setdefault(r["shop_id"].lower(), set()).add(bytes(r["id_hash"]))
        if hashes and not self.salt:
            self.salt = bytes(await queries.fetchval(on, "erase_salt"))
        self.hashes = hashes
        self._shops = tuple(s.encode() for s in hashes)

    def start_refresh(self, on: Executor, every_s: float) -> None:
        """Reload every ``every_s`` seconds in the background (errors logged, list kept)."""

        async def refresh() -> None:
            while True:
                await asyncio.sleep(every_s)
                try:
                    await self.load(on)
                except Exception as exc:  # a PostgreSQL outage: keep the list we have
                    log.warning("suppression list refresh failed", error=str(exc))

        self._task = asyncio.create_task(refresh(), name="suppression-refresh")

    def stop(self) -> None:
        """Stop the refresh."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def suppressed(self, event: Any) -> bool:
        """Whether ``event`` (a decoded JSON object) is of an erased visitor."""
        if not isinstance(event, dict):
            return False
        shop = event.get("shop_id")
        if not isinstance(shop, str):
            return False
        hashes = self.hashes.get(shop.lower())
        if not hashes:
            return False
        return any(
            id_hash(self.salt, shop, kind, value) in hashes for kind, value in _event_ids(event)
        )

    def filter(self, raw: bytes) -> tuple[bytes | None, int]:
        """``raw`` (a record: one event or a list) without the events of erased visitors:
        ``(raw, 0)`` untouched (no suppressed shop in it, or not JSON: the loader's
        decoders judge it), ``(None, n)`` when all its ``n`` events go, else the
        record re-encoded and how many went."""
        if not any(shop in raw for shop in self._shops):
            return raw, 0
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw, 0
        events = data if isinstance(data, list) else [data]
        kept = [e for e in events if not self.suppressed(e)]
        dropped = len(events) - len(kept)
        if not dropped:
            return raw, 0
        if not kept:
            return None, dropped
        return orjson.dumps(kept if isinstance(data, list) else kept[0]), dropped
