"""``identities`` kept up to date from the identify, alias and group records of a batch.

The collector sends Segment's identify, alias and group messages as
storefront records of event type ``$identify``, ``$alias`` and ``$group``
(``ingest.collector.segment``): ``anon_id`` the anonymous id (an alias: its
``previousId``), ``user_id`` the user's id, ``props.traits`` the traits (a
group's traits for ``$group``, with ``props.group_id``). The fast decoders
leave a record holding one to the checked path (``consumers.fast``), so only
records decoded event by event are looked through here: ordinary records pay
nothing. Their rows go to ``upsert`` instead of ``events``, in the same
transaction.

What a row holds, per shop and anonymous id: the latest user id (an alias
sets it too), traits merged with a later message's values winning, the latest
group and its traits (merged while the group stays the same), first and last
seen. "Later" is by event time, also across batches loaded out of order:
each batch is folded in time order, then merged with the stored row by
whether it is newer than the row's last seen (``upsert_identities``). A
message applied twice (a redelivery) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from consumers.copy_writer import Decoded
from consumers.fast import IDENTITY_TYPES
from consumers.rows import STOREFRONT
from consumers.values import PgTime, Row
from ingest.core.db import queries

_AT = {name: STOREFRONT.columns.index(name) for name in STOREFRONT.columns}
_TYPE = _AT["event_type"]


def split(decoded: list[Decoded]) -> tuple[list[Decoded], list[Row]]:
    """The records without their identity rows, and those rows.

    Only records decoded event by event (``indexes`` set) can hold one: the
    others are passed through as they are. Builds new ``Decoded`` objects
    and changes none: a batch written again (the careful path) splits again.
    """
    kept: list[Decoded] = []
    found: list[Row] = []
    for d in decoded:
        if d.indexes is None or not any(row[_TYPE] in IDENTITY_TYPES for row in d.rows):
            kept.append(d)
            continue
        rest = d.emptied()
        rest.rejected = d.rejected
        contexts = d.contexts or [None] * len(d.rows)
        for row, index, context in zip(d.rows, d.indexes, contexts, strict=True):
            if row[_TYPE] in IDENTITY_TYPES:
                found.append(row)
            else:
                rest.add(row, index, context)
        if not d.contexts:
            rest.contexts = []  # the table keeps no sessions: none, as the fast path has
        kept.append(rest)
    return kept, found


@dataclass
class _Identity:
    first_seen: PgTime
    last_seen: PgTime
    user_id: str | None = None
    traits: dict[str, Any] = field(default_factory=dict)
    group_id: str | None = None
    group_traits: dict[str, Any] = field(default_factory=dict)


def _props(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def aggregate(rows: list[Row]) -> list[tuple[Any, ...]]:
    """One upsert row per (shop, anonymous id) of ``rows``, folded in time order, in
    ``upsert_identities`` order."""
    out: dict[tuple[str, str], _Identity] = {}
    for row in sorted(rows, key=lambda r: r[_AT["ts"]]):
        key = (row[_AT["shop_id"]], row[_AT["anon_id"]])
        at = row[_AT["ts"]]
        identity = out.get(key)
        if identity is None:
            identity = out[key] = _Identity(at, at)
        identity.last_seen = at  # sorted: the latest so far
        if row[_AT["user_id"]] is not None:
            identity.user_id = row[_AT["user_id"]]
        props = _props(row[_AT["props"]])
        traits = _object(props.get("traits"))
        if row[_TYPE] == "$group":
            group = props.get("group_id")
            if isinstance(group, str) and group:
                if group != identity.group_id:
                    identity.group_id, identity.group_traits = group, {}
                identity.group_traits.update(traits)
        else:
            identity.traits.update(traits)
    return [
        (
            shop,
            anon,
            i.user_id,
            orjson.dumps(i.traits).decode(),
            i.group_id,
            orjson.dumps(i.group_traits).decode(),
            i.first_seen,
            i.last_seen,
        )
        for (shop, anon), i in out.items()
    ]


async def upsert(conn: asyncpg.Connection, rows: list[Row]) -> int:
    """Fold identity rows into ``identities``; returns the identities touched.

    ``conn`` takes times as rows carry them (``values.use_pg_times``)."""
    touched = aggregate(rows)
    if touched:
        await queries.execute(conn, "upsert_identities", *zip(*touched, strict=True))
    return len(touched)
