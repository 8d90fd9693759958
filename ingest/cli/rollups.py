"""``eventpipe rollups ...``: refresh the analysis tables and report their freshness.

``refresh [--table T] [--full] [--dry-run] [--json]`` (exit 0; 2 for an unknown
table), ``status [--json]`` (exit 0 fresh, 1 when a rollup's watermark is older
than ``rollup_max_lag_s``: a monitoring check).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console

from ingest.core.db import Database
from ingest.core.errors import ConfigError
from ingest.core.settings import Settings
from ingest.rollups import ROLLUPS, refresh, status


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``rollups`` and its subcommands (each takes the ``common`` flags)."""
    parser = sub.add_parser("rollups", help="the analysis tables: refresh and status")
    rsub = parser.add_subparsers(dest="rollups_command", required=True)

    ref = rsub.add_parser(
        "refresh", parents=[common], help="recompute the groups that received events"
    )
    ref.add_argument("--table", action="append", help=f"only this rollup ({', '.join(ROLLUPS)})")
    ref.add_argument("--full", action="store_true", help="recompute everything")
    ref.add_argument("--dry-run", action="store_true", help="count the groups; change nothing")
    ref.add_argument("--json", action="store_true", help="print the result as JSON")
    ref.set_defaults(func=refresh_command)

    st = rsub.add_parser(
        "status", parents=[common], help="watermark, lag, rows; exit 1 when a rollup lags"
    )
    st.add_argument("--json", action="store_true", help="print the result as JSON")
    st.set_defaults(func=status_command)


def _dsn(settings: Settings) -> str:
    return settings.postgres_dsn or settings.resolve_stack().dsn


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


async def refresh_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Refresh every rollup, or ``--table``'s."""
    unknown = [t for t in args.table or [] if t not in ROLLUPS]
    if unknown:
        raise ConfigError(f"no rollup named {unknown[0]!r}", hint=f"one of: {', '.join(ROLLUPS)}")
    async with Database(_dsn(settings), max_size=2) as db:
        results = await refresh(
            db,
            tables=args.table,
            full=args.full,
            dry_run=args.dry_run,
        )
    if args.json:
        _print_json([r.as_dict() for r in results])
        return 0
    verb = "would recompute" if args.dry_run else "recomputed"
    for r in results:
        rows = "" if args.dry_run else f", {r.rows} row(s)"
        console.print(
            f"[bold]{r.rollup}[/] {verb} {r.groups} group(s){rows} "
            f"({'full' if r.full else f'loaded after {r.since:%Y-%m-%d %H:%M:%S}'}) "
            f"in {r.duration_s:.3f}s",
            highlight=False,
        )
    return 0


async def status_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Each rollup's freshness; exit 1 when one lags more than ``rollup_max_lag_s``."""
    async with Database(_dsn(settings), max_size=2) as db:
        report = await status(db, max_lag_s=settings.rollup_max_lag_s)
    late = [s.rollup for s in report if s.lag_s > settings.rollup_max_lag_s]
    if args.json:
        _print_json(
            {
                "max_lag_s": settings.rollup_max_lag_s,
                "healthy": not late,
                "rollups": [s.as_dict() for s in report],
            }
        )
    else:
        for s in report:
            lag = "never refreshed" if s.lag_s == float("inf") else f"lag {s.lag_s:.0f}s"
            mark = "[red]late[/]" if s.rollup in late else "[green]ok[/]"
            last = f"{s.last_refresh_at:%Y-%m-%d %H:%M:%S}" if s.last_refresh_at else "-"
            console.print(
                f"{mark} [bold]{s.rollup}[/] {lag}, last refresh {last}, {s.rows} row(s)",
                highlight=False,
            )
    return 1 if late else 0
