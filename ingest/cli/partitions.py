"""``eventpipe partitions ...``: the operator's commands over the partition manager.

``maintain`` (exit 0 done, 1 a policy names no table, 6 another run holds the
lock), ``status`` (exit 0 healthy, 1 warnings: a monitoring check),
``restore FILE`` and ``policy``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ingest.core.db import Database
from ingest.core.errors import ConfigError, PartitionError
from ingest.core.settings import Settings
from ingest.partitions import (
    MODES,
    MaintenanceReport,
    PartitionManager,
    Policy,
    StatusReport,
    add_months,
)


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``partitions`` and its subcommands (each takes the ``common`` flags)."""
    parser = sub.add_parser("partitions", help="create partitions ahead and enforce retention")
    psub = parser.add_subparsers(dest="partitions_command", required=True)

    maintain = psub.add_parser(
        "maintain",
        parents=[common],
        help="create missing partitions, enforce retention (idempotent)",
    )
    maintain.add_argument("--table", help="only this table's policy")
    maintain.add_argument(
        "--dry-run", action="store_true", help="print the statements it would run; change nothing"
    )
    maintain.add_argument("--json", action="store_true", help="print the result as JSON")
    maintain.set_defaults(func=maintain_command)

    status = psub.add_parser(
        "status", parents=[common], help="partitions and warnings; exit 1 when unhealthy"
    )
    status.add_argument("--table", help="only this table's policy")
    status.add_argument("--json", action="store_true", help="print the result as JSON")
    status.set_defaults(func=status_command)

    restore = psub.add_parser(
        "restore", parents=[common], help="put an archived month back as a partition"
    )
    restore.add_argument("file", type=Path, help="NAME.manifest.json or NAME.copy.gz")
    restore.add_argument("--json", action="store_true", help="print the result as JSON")
    restore.set_defaults(func=restore_command)

    policy = psub.add_parser(
        "policy", parents=[common], help="show policies, or set one when options are given"
    )
    policy.add_argument("table", nargs="?", help="table of the policy to show or set")
    policy.add_argument("--column", help="partition column (required for a new policy)")
    policy.add_argument("--months-ahead", type=int, help="months of partitions made ahead")
    policy.add_argument("--retention", help="an interval such as '90 days', or 'none'")
    policy.add_argument("--mode", choices=MODES, help="what retention does to old partitions")
    policy.add_argument("--archive-location", help="directory for archive mode ('none': default)")
    policy.add_argument("--json", action="store_true", help="print the result as JSON")
    policy.set_defaults(func=policy_command)


def _dsn(settings: Settings) -> str:
    return settings.postgres_dsn or settings.resolve_stack().dsn


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


async def maintain_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Create, retire and purge per every policy (or ``--table``'s)."""
    async with Database(_dsn(settings), max_size=3) as db:
        report = await PartitionManager.from_settings(db, settings).maintain(
            table=args.table, dry_run=args.dry_run
        )
    if args.json:
        _print_json(report.as_dict())
    else:
        _print_maintain(console, report)
    return 1 if report.skipped else 0


def _print_maintain(console: Console, report: MaintenanceReport) -> None:
    for action in report.actions:
        month = f"{action.month:%Y-%m}" if action.month else ""
        rows = f" ({action.rows} rows)" if action.rows else ""
        console.print(f"[bold]{action.kind}[/] {action.table} {month}{rows} {action.note}")
        if report.dry_run:
            for statement in action.statements:
                console.print(f"  {statement};", highlight=False, markup=False, soft_wrap=True)
    for skipped in report.skipped:
        console.print(f"[red]skipped[/] {skipped}")
    verb = "would be done" if report.dry_run else "done"
    console.print(f"{len(report.actions)} action(s) {verb}")


async def status_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Show partitions and warnings; non-zero exit when anything needs attention."""
    async with Database(_dsn(settings), max_size=2) as db:
        report = await PartitionManager.from_settings(db, settings).status(table=args.table)
    if args.json:
        _print_json(report.as_dict())
    else:
        _print_status(console, report)
    return 0 if report.healthy else 1


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _print_status(console: Console, report: StatusReport) -> None:
    for st in report.tables:
        p = st.policy
        title = (
            f"{p.table} ({p.column}, {p.months_ahead} ahead, retention "
            f"{p.retention_text or 'forever'}, {p.mode})"
        )
        table = Table(title=title, title_justify="left")
        table.add_column("partition", no_wrap=True)
        table.add_column("range (UTC)", no_wrap=True)
        table.add_column("est. rows", justify="right")
        table.add_column("size", justify="right")
        table.add_column("state")
        for part in st.partitions:
            span = (
                f"{part.month:%Y-%m-%d} .. {add_months(part.month, 1):%Y-%m-%d}"
                if part.month
                else ""
            )
            table.add_row(part.name, span, str(part.est_rows), _size(part.size_bytes), part.state)
        console.print(table)
        for warning in st.warnings:
            console.print(f"[yellow]warning[/] {p.table}: {warning}", soft_wrap=True)
    if report.uninstalled and report.now is not None:
        shops = Table(title="uninstalled shops", title_justify="left")
        for column in ("shop id", "uninstalled", "rows go at", "how", "state", "rows"):
            shops.add_column(column, no_wrap=column == "shop id")
        for u in report.uninstalled:
            shops.add_row(
                u.shop_id,
                f"{u.uninstalled_at:%Y-%m-%d %H:%M}",
                f"{u.due_at:%Y-%m-%d %H:%M}",
                u.mode,
                u.state(report.now),
                str(sum(u.rows.values())) if u.rows else "",
            )
        console.print(shops)
        for warning in report.warnings:
            if warning.startswith("uninstalled shop "):
                console.print(f"[yellow]warning[/] {warning}", soft_wrap=True)
    console.print("[green]healthy[/]" if report.healthy else "[red]unhealthy[/]")


async def restore_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Verify an archive and attach its month again."""
    async with Database(_dsn(settings), max_size=2) as db:
        done = await PartitionManager.from_settings(db, settings).restore(args.file)
    if args.json:
        _print_json(
            {
                "table": done.table,
                "partition": done.partition,
                "rows": done.rows,
                "privacy": done.privacy,
            }
        )
    else:
        console.print(f"restored {done.partition}: {done.rows} rows")
        if any(done.privacy.values()):
            console.print(
                f"  erased visitors' rows removed again: {done.privacy.get('erased', 0)}; "
                f"uninstalled shops' rows deleted or anonymised: "
                f"{done.privacy.get('uninstalled', 0)}"
            )
    return 0


async def policy_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Show policies; with options, insert or change ``table``'s."""
    setting = any(
        v is not None
        for v in (args.column, args.months_ahead, args.retention, args.mode, args.archive_location)
    )
    if setting and not args.table:
        raise ConfigError("name the table whose policy to set")
    async with Database(_dsn(settings), max_size=2) as db:
        manager = PartitionManager.from_settings(db, settings)
        if setting:
            await _set_policy(manager, args)
        policies = await manager.policies(args.table)
    if args.json:
        _print_json([p.as_dict() for p in policies])
        return 0
    table = Table("table", "column", "ahead", "retention", "mode", "archive location")
    for p in policies:
        table.add_row(
            p.table,
            p.column,
            str(p.months_ahead),
            p.retention_text or "forever",
            p.mode,
            p.archive_location or "(default)",
        )
    console.print(table)
    return 0


async def _set_policy(manager: PartitionManager, args: argparse.Namespace) -> None:
    found = await manager.policies(args.table)
    current = found[0] if found else None
    if current is None and not args.column:
        raise PartitionError(f"no policy for {args.table} yet", hint="pass --column")
    retention = current.retention_text if current else None
    if args.retention is not None:
        retention = None if args.retention.lower() in ("none", "forever") else args.retention
    location = current.archive_location if current else None
    if args.archive_location is not None:
        location = None if args.archive_location.lower() == "none" else args.archive_location
    policy = Policy(
        table=args.table,
        column=args.column or (current.column if current else ""),
        months_ahead=args.months_ahead
        if args.months_ahead is not None
        else (current.months_ahead if current else 3),
        retention=None,
        mode=args.mode or (current.mode if current else "drop"),
        archive_location=location,
    )
    await manager.set_policy(policy, retention)
