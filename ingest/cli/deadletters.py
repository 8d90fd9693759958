"""``eventpipe deadletters list|replay``: inspect records that could not be loaded; retry them."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from consumers import dead_letters
from ingest.core.db import Database
from ingest.core.errors import ConfigError
from ingest.core.producer import EventProducer
from ingest.core.settings import Settings


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``deadletters`` and its subcommands."""
    parser = sub.add_parser("deadletters", help="list and replay records that could not be loaded")
    dsub = parser.add_subparsers(dest="deadletters_command", required=True)
    ls = dsub.add_parser("list", parents=[common], help="list dead letters, oldest first")
    ls.add_argument("--reason", help="only this reason (e.g. rejected_by_postgres)")
    ls.add_argument("--all", action="store_true", help="include records already replayed")
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true", help="print JSON lines")
    ls.set_defaults(func=list_command)
    rp = dsub.add_parser("replay", parents=[common], help="produce dead letters to Kafka again")
    rp.add_argument("ids", nargs="*", type=int, help="dead letter ids")
    rp.add_argument("--reason", help="every unreplayed dead letter with this reason")
    rp.add_argument("--all", action="store_true", help="every unreplayed dead letter")
    rp.set_defaults(func=replay_command)


async def list_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Print dead letters."""
    async with Database(settings.resolve_stack().dsn, max_size=1) as db:
        rows = await dead_letters.listing(
            db, reason=args.reason, include_replayed=args.all, limit=args.limit
        )
    if args.json:
        for r in rows:
            print(json.dumps({k: str(v) if v is not None else None for k, v in dict(r).items()}))
        return 0
    table = Table(
        "id", "topic", "partition", "offset/event", "reason", "error", "created", "replayed"
    )
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["topic"],
            str(r["kafka_partition"]),
            f"{r['kafka_offset']}/{r['record_index']}",
            r["reason"],
            r["error"][:80],
            f"{r['created_at']:%Y-%m-%d %H:%M:%S}",
            f"{r['replayed_at']:%Y-%m-%d %H:%M:%S}" if r["replayed_at"] else "",
        )
    console.print(table)
    console.print(f"{len(rows)} dead letter(s)")
    return 0


async def replay_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Replay the chosen dead letters."""
    if not (args.ids or args.reason or args.all):
        raise ConfigError("nothing chosen to replay", hint="give ids, --reason R, or --all")
    settings = settings.resolve_stack()
    async with Database(settings.dsn, max_size=1) as db, EventProducer(settings) as producer:
        count = await dead_letters.replay(
            db, producer, ids=args.ids, reason=args.reason, everything=args.all
        )
    console.print(f"{count} dead letter(s) replayed")
    return 0
