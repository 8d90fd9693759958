"""``user_sessions`` kept up to date from the behavior rows each batch inserted."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import asyncpg

from consumers.values import Row, Session, SessionPart
from ingest.core import streams
from ingest.core.db import queries

# The positions in a row (the contract's, not consumers.rows': the fast decoders
# build session parts with context() below, and rows imports them).
_AT = {name: streams.BEHAVIOR.column_names.index(name) for name in streams.BEHAVIOR.column_names}
_DEVICES = {"mobile", "desktop", "tablet"}
_CONTEXT_TEXT = ("user_agent", "referrer", "screen_resolution", "language")


def context(raw: Any) -> dict[str, str | None]:
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


def fill(facts: dict[str, str | None], later: dict[str, str | None]) -> None:
    """``facts`` completed by a later row's: a fact keeps the first value it was given."""
    for name, value in later.items():
        if facts.get(name) is None:
            facts[name] = value


def aggregate(
    rows: list[Row], contexts: list[object], parts: Iterable[SessionPart] = ()
) -> list[tuple[Any, ...]]:
    """One upsert row per (shop, session) touched by ``rows`` (behavior rows, each with the
    collector's session context) and by ``parts`` (what rows decoded straight to COPY
    data told of their sessions, ``fast.behavior_copy``), in ``upsert_sessions`` order.

    A batch gives either: parts fold in row order as their rows would have.
    """
    sessions: dict[tuple[str, str], Session] = {}
    for row, raw in zip(rows, contexts, strict=True):
        key = (row[_AT["shop_id"]], row[_AT["session_id"]])
        at, url = row[_AT["timestamp"]], row[_AT["page_url"]]
        views = 1 if row[_AT["event_type"]] == "page_view" else 0
        s = sessions.get(key)
        if s is None:
            sessions[key] = Session(at, url, at, url, views, context(raw))
            continue
        if at < s.first_seen:
            s.first_seen, s.landing_page = at, url
        if at >= s.last_seen:
            s.last_seen, s.exit_page = at, url
        s.page_views += views
        for name, value in context(raw).items():  # fill(), inline: once per row
            if s.context.get(name) is None:
                s.context[name] = value
    for key, part in parts:
        s = sessions.get(key)
        if s is None:  # a copy: a part stays as decoded, for a batch written again
            sessions[key] = Session(
                part.first_seen,
                part.landing_page,
                part.last_seen,
                part.exit_page,
                part.page_views,
                dict(part.context),
            )
            continue
        if part.first_seen < s.first_seen:
            s.first_seen, s.landing_page = part.first_seen, part.landing_page
        if part.last_seen >= s.last_seen:
            s.last_seen, s.exit_page = part.last_seen, part.exit_page
        s.page_views += part.page_views
        fill(s.context, part.context)
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


async def upsert(
    conn: asyncpg.Connection,
    rows: list[Row],
    contexts: list[object],
    parts: Iterable[SessionPart] = (),
) -> int:
    """Fold newly inserted behavior rows (or their ``parts``, see ``aggregate``) into
    ``user_sessions``; returns sessions touched.

    ``conn`` takes times as rows carry them (``rows.use_pg_times``)."""
    touched = aggregate(rows, contexts, parts)
    if touched:
        columns = list(zip(*touched, strict=True))
        await queries.execute(conn, "upsert_sessions", *columns)
    return len(touched)
