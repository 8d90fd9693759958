"""Funnels per shop (migration 0014): ordered steps the ``conversion_funnels`` refresh walks.

A step is written ``[NAME:] KEY=VALUE[; KEY=VALUE ...]`` with keys ``event`` (event
type), ``url`` (page URL glob, ``*`` any text), ``element`` (element path) and
``component`` (component id); an event enters the step when every one given matches.
``define`` replaces a funnel's steps (the next refresh walks the shop's sessions
again); ``drop`` deletes the funnel and its ``conversion_funnels`` rows at once (and
for ``lead_capture``, recomputes the shop's ``component_performance``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from ingest.core.db import Database, queries
from ingest.core.errors import ConfigError
from ingest.rollups.incremental import recompute

# CLI key -> the step's JSON key (what rollup_funnel_insert reads).
STEP_KEYS = {
    "event": "event_type",
    "url": "page_url",
    "element": "element_path",
    "component": "component_id",
}
# 002's component_performance counts the sessions in this funnel as conversions.
LEAD_CAPTURE = "lead_capture"
MAX_STEPS = 50  # the funnels table's CHECK
MAX_NAME = 200
MAX_VALUE = 2000


def _text(value: str, what: str, limit: int) -> str:
    value = value.strip()
    if not value:
        raise ConfigError(f"{what} is empty")
    if "\x00" in value:
        raise ConfigError(f"{what} holds NUL")
    if len(value) > limit:
        raise ConfigError(f"{what} is longer than {limit} characters")
    return value


def parse_step(spec: str, position: int) -> dict[str, str]:
    """One ``--step`` as the JSON object stored in ``funnels.steps``.

    Raises ConfigError (one line) for an unknown or repeated key, an empty value or a
    step that matches on nothing.
    """
    name = f"step {position}"
    body = spec
    head, colon, rest = spec.partition(":")
    if colon and "=" not in head:  # a name before the criteria (a URL's ':' follows '=')
        name = _text(head, f"step {position}'s name", MAX_NAME)
        body = rest
    step: dict[str, str] = {"name": name}
    for part in body.split(";"):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(
                f"step {position}: {part.strip()!r} is not KEY=VALUE",
                hint=f"keys: {', '.join(STEP_KEYS)}; e.g. --step 'cart: event=add_to_cart'",
            )
        if key not in STEP_KEYS:
            raise ConfigError(
                f"step {position}: unknown key {key!r}", hint=f"one of: {', '.join(STEP_KEYS)}"
            )
        column = STEP_KEYS[key]
        if column in step:
            raise ConfigError(f"step {position}: {key!r} given twice")
        step[column] = _text(value, f"step {position}'s {key}", MAX_VALUE)
    if len(step) == 1:
        raise ConfigError(
            f"step {position} matches nothing",
            hint=f"give at least one of {', '.join(f'{k}=...' for k in STEP_KEYS)}",
        )
    return step


def parse_steps(specs: list[str]) -> list[dict[str, str]]:
    """Every ``--step`` in order; one step at least, names unique."""
    if not specs:
        raise ConfigError(
            "a funnel needs steps", hint="--step 'NAME: event=TYPE' (repeat, in order)"
        )
    if len(specs) > MAX_STEPS:
        raise ConfigError(f"a funnel has at most {MAX_STEPS} steps")
    steps = [parse_step(s, i) for i, s in enumerate(specs, 1)]
    names = [s["name"] for s in steps]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two steps are named {name!r}")
    return steps


@dataclass(frozen=True)
class Funnel:
    """A stored funnel and how many sessions entered it."""

    name: str
    steps: list[dict[str, str]]
    created_at: datetime
    updated_at: datetime
    sessions: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "name": self.name,
            "steps": self.steps,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "sessions": self.sessions,
        }


async def shop_id(db: Database, domain: str) -> uuid.UUID:
    """The id of shop ``domain``, or a one-line ConfigError."""
    found: uuid.UUID | None = await queries.fetchval(db.pool, "shop_id_by_domain", domain)
    if found is None:
        raise ConfigError(f"no shop {domain!r}", hint="see `eventpipe shops list`")
    return found


def funnel_name(name: str) -> str:
    """A funnel's name, checked."""
    return _text(name, "the funnel name", MAX_NAME)


async def define(db: Database, domain: str, name: str, specs: list[str]) -> bool:
    """Create funnel ``name`` of shop ``domain`` or replace its steps; True when new."""
    name = funnel_name(name)
    steps = parse_steps(specs)
    shop = await shop_id(db, domain)
    created: bool = await queries.fetchval(
        db.pool, "funnel_define", shop, name, orjson.dumps(steps).decode()
    )
    return created


async def list_funnels(db: Database, domain: str) -> list[Funnel]:
    """Shop ``domain``'s funnels, by name."""
    shop = await shop_id(db, domain)
    return [
        Funnel(
            r["name"],
            orjson.loads(r["steps"]),
            r["created_at"],
            r["updated_at"],
            int(r["sessions"]),
        )
        for r in await queries.fetch(db.pool, "funnel_list", shop)
    ]


async def drop(db: Database, domain: str, name: str) -> int:
    """Delete funnel ``name`` and its conversion_funnels rows; the rows deleted.

    Raises ConfigError when the shop has no such funnel.
    """
    shop = await shop_id(db, domain)
    row = await queries.fetchrow(db.pool, "funnel_drop", shop, funnel_name(name))
    assert row is not None
    if not row["funnels"]:
        raise ConfigError(
            f"shop {domain!r} has no funnel {name!r}", hint="see `eventpipe funnels list`"
        )
    rows: int = row["rows"]
    if name == LEAD_CAPTURE:  # component_performance counts its sessions
        await recompute(db, shop, tables=["component_performance"])
    return rows
