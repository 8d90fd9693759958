"""``eventpipe keys rotate|revoke|list --shop DOMAIN``: a shop's public write keys.

Rotation is two steps so no client is cut off: ``rotate`` adds a new key (the
old ones stay valid), clients move to it, then ``revoke`` the old key. The
collector refuses a revoked key within ``EVENTPIPE_WRITE_KEY_CACHE_SECONDS``.
"""

from __future__ import annotations

import argparse
import secrets
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from ingest.core.db import Database, queries
from ingest.core.errors import ConfigError
from ingest.core.settings import Settings


def new_write_key() -> str:
    """A fresh random write key, in the form ``ensure_shop`` makes."""
    return "wk_" + secrets.token_urlsafe(18)


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``keys`` and its subcommands (each takes the ``common`` flags)."""
    parser = sub.add_parser("keys", help="list, rotate and revoke a shop's write keys")
    ksub = parser.add_subparsers(dest="keys_command", required=True)
    for name, func, text in (
        ("list", list_command, "a shop's write keys, live and revoked"),
        ("rotate", rotate_command, "add a new live key (old keys stay valid until revoked)"),
        ("revoke", revoke_command, "revoke one key (--key), or every live key but the newest"),
    ):
        cmd = ksub.add_parser(name, parents=[common], help=text)
        cmd.add_argument("--shop", required=True, help="the shop's domain")
        if name == "revoke":
            cmd.add_argument("--key", help="the key to revoke (default: all but the newest)")
        cmd.set_defaults(func=func)


async def _shop(db: Database, domain: str) -> Any:
    row = await queries.fetchrow(db.pool, "shop_id_by_domain", domain)
    if row is None:
        raise ConfigError(f"no shop {domain}", hint="check the domain (shops.domain)")
    return row["id"]


async def list_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Print the shop's keys."""
    async with Database(settings.resolve_stack().dsn, max_size=1) as db:
        rows = await queries.fetch(db.pool, "list_write_keys", await _shop(db, args.shop))
    table = Table("write key", "created", "revoked")
    for r in rows:
        table.add_row(r["write_key"], f"{r['created_at']:%Y-%m-%d %H:%M}", _when(r))
    console.print(table)
    return 0


async def rotate_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Add a new live key and print it."""
    key = new_write_key()
    async with Database(settings.resolve_stack().dsn, max_size=1) as db:
        await queries.execute(db.pool, "add_write_key", key, await _shop(db, args.shop))
    console.print(key, highlight=False)
    return 0


async def revoke_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Revoke ``--key``, or every live key but the newest; exit 1 when nothing was revoked."""
    async with Database(settings.resolve_stack().dsn, max_size=1) as db:
        shop_id = await _shop(db, args.shop)
        keep = None
        if args.key is None:
            keep = await queries.fetchval(db.pool, "live_write_key", shop_id)
        revoked = await queries.fetch(db.pool, "revoke_write_keys", shop_id, args.key, keep)
    for r in revoked:
        console.print(f"revoked {r['write_key']}", highlight=False)
    if not revoked:
        console.print("no live key revoked", highlight=False)
    return 0 if revoked else 1


def _when(row: asyncpg.Record) -> str:
    return f"{row['revoked_at']:%Y-%m-%d %H:%M}" if row["revoked_at"] else "live"
