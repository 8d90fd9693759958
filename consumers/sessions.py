"""``user_sessions`` kept up to date from the behavior rows each batch inserted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from consumers.rows import BEHAVIOR
from consumers.values import PgTime, Row
from ingest.core.db import queries

_AT = {name: BEHAVIOR.columns.index(name) for name in BEHAVIOR.columns}
_DEVICES = {"mobile", "desktop", "tablet"}
_CONTEXT_TEXT = ("user_agent", "referrer", "screen_resolution", "language")


@dataclass
class _Session:
    first_seen: PgTime  # as the rows carry times (consumers.rows)
    landing_page: str
    last_seen: PgTime
    exit_page: str
    page_views: int
    context: dict[str, str | None]


def _context(raw: Any) -> dict[str, str | None]:
    """Session facts the collector attached; anything malformed is dropped, never fatal."""
    ctx = raw if isinstance(raw, dict) else {}
    out: dict[str, str | None] = {
        k: v[:1024] if isinstance(v := ctx.get(k), str) else None for k in _CONTEXT_TEXT
    }
    device = ctx.get("device_type")
    out["device_type"] = device if device in _DEVICES else None
    country = ctx.get("country_code")
    out["country_code"] = (
        country.upper() if isinstance(country, str) and len(country) == 2 else None
    )
    return out


def aggregate(rows: list[Row], contexts: list[object]) -> list[tuple[Any, ...]]:
    """One upsert row per (shop, session) touched by ``rows`` (behavior rows, each with the
    collector's session context), in ``upsert_sessions`` order."""
    sessions: dict[tuple[str, str], _Session] = {}
    for row, context in zip(rows, contexts, strict=True):
        key = (row[_AT["shop_id"]], row[_AT["session_id"]])
        at, url = row[_AT["timestamp"]], row[_AT["page_url"]]
        views = 1 if row[_AT["event_type"]] == "page_view" else 0
        s = sessions.get(key)
        if s is None:
            sessions[key] = _Session(at, url, at, url, views, _context(context))
            continue
        if at < s.first_seen:
            s.first_seen, s.landing_page = at, url
        if at >= s.last_seen:
            s.last_seen, s.exit_page = at, url
        s.page_views += views
        for name, value in _context(context).items():
            if s.context.get(name) is None:
                s.context[name] = value
    return [
        (
            shop,
            session,
            s.context["user_agent"],
            s.context["referrer"],
            s.landing_page,
            s.exit_page,
            s.context["device_type"],
            s.context["screen_resolution"],
            s.context["language"],
            s.context["country_code"],
            s.first_seen,
            s.last_seen,
            s.page_views,
        )
        for (shop, session), s in sessions.items()
    ]


async def upsert(conn: asyncpg.Connection, rows: list[Row], contexts: list[object]) -> int:
    """Fold newly inserted behavior rows into ``user_sessions``; returns sessions touched.

    ``conn`` takes times as rows carry them (``rows.use_pg_times``)."""
    touched = aggregate(rows, contexts)
    if touched:
        columns = list(zip(*touched, strict=True))
        await queries.execute(conn, "upsert_sessions", *columns)
    return len(touched)
