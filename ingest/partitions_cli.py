"""``eventpipe partitions ...``: the operator's commands over the partition manager."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from ingest.db import Database
from ingest.partitions import PartitionManager
from ingest.settings import Settings


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``partitions`` and its subcommands (each takes the ``common`` flags)."""
    parser = sub.add_parser("partitions", help="create partitions ahead and enforce retention")
    psub = parser.add_subparsers(dest="partitions_command", required=True)
    maintain = psub.add_parser(
        "maintain", parents=[common], help="create missing partitions (idempotent)"
    )
    maintain.add_argument("--json", action="store_true", help="print the result as JSON")
    maintain.set_defaults(func=maintain_command)


async def maintain_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Create every missing partition of every policy."""
    async with Database(settings.resolve_stack().dsn, max_size=2) as db:
        created = await PartitionManager(db).maintain()
    if args.json:
        print(json.dumps({"created": [{"table": t, "month": f"{m:%Y-%m}"} for t, m in created]}))
    else:
        for table, month in created:
            console.print(f"created {table} {month:%Y-%m}")
        console.print(f"{len(created)} partition(s) created")
    return 0
