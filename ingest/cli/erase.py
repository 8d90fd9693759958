"""``eventpipe erase``: delete a visitor everywhere; ``eventpipe erase status``: the record."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from ingest.core.db import Database
from ingest.core.errors import ConfigError
from ingest.core.settings import Settings
from ingest.privacy import Erasure, erase, status


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``erase`` (and ``erase status``)."""
    parser = sub.add_parser(
        "erase",
        parents=[common],
        help="delete every row of a visitor (deletion request); `erase status` lists requests",
    )
    parser.add_argument("action", nargs="?", choices=["status"], help="list erasure requests")
    parser.add_argument("--shop", help="the shop's domain")
    parser.add_argument("--anon-id", action="append", default=[], help="anonymous id (repeatable)")
    parser.add_argument("--user-id", action="append", default=[], help="user id (repeatable)")
    parser.add_argument("--session-id", action="append", default=[], help="session id (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="count what would be deleted")
    parser.add_argument("--limit", type=int, default=100, help="requests listed by `status`")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=erase_command)


async def erase_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Erase a visitor, or list the requests."""
    async with Database(settings.resolve_stack().dsn, max_size=1) as db:
        if args.action == "status":
            return await _status(db, args, console)
        if not args.shop:
            raise ConfigError(
                "--shop is required", hint="eventpipe erase --shop DOMAIN --anon-id ID"
            )
        report = await erase(
            db,
            settings,
            Erasure(args.shop, args.anon_id, args.user_id, args.session_id),
            dry_run=args.dry_run,
        )
    if args.json:
        print(json.dumps(report.as_dict()))
        return 0
    table = Table("table", "rows" if not report.dry_run else "rows to delete")
    for name, rows in report.rows.items():
        table.add_row(name, str(rows))
    console.print(table)
    total = sum(report.rows.values())
    if report.dry_run:
        console.print(f"dry run: {total} row(s) would be deleted")
    else:
        console.print(f"request {report.request_id}: {total} row(s) deleted")
    if report.repeat_of:
        console.print(f"the same id(s) were erased before by request(s) {report.repeat_of}")
    return 0


async def _status(db: Database, args: argparse.Namespace, console: Console) -> int:
    rows = await status(db, args.limit)
    if args.json:
        for r in rows:
            print(
                json.dumps(
                    {
                        k: v if isinstance(v, (int, dict, list)) or v is None else str(v)
                        for k, v in r.items()
                    }
                )
            )
        return 0
    table = Table("id", "by", "requested", "shop", "ids", "rows removed", "finished")
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["requested_by"],
            f"{r['requested_at']:%Y-%m-%d %H:%M:%S}",
            r["shop_domain"],
            ",".join(r["id_kinds"]),
            str(sum(r["rows_removed"].values())),
            f"{r['finished_at']:%Y-%m-%d %H:%M:%S}" if r["finished_at"] else "unfinished",
        )
    console.print(table)
    console.print(f"{len(rows)} request(s)")
    return 0
