"""``eventpipe funnels define|list|drop``: a shop's funnels, walked by the rollup refresh.

``define SHOP NAME --step SPEC [--step SPEC ...]`` creates or replaces a funnel (steps
in order, each ``[NAME:] KEY=VALUE[; KEY=VALUE]`` with keys event, url, element,
component), ``list SHOP [--json]``, ``drop SHOP NAME``. Bad input is one line, exit 2.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape

from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.rollups import funnels


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``funnels`` and its subcommands (each takes the ``common`` flags)."""
    parser = sub.add_parser("funnels", help="define, list and drop a shop's funnels")
    fsub = parser.add_subparsers(dest="funnels_command", required=True)

    define = fsub.add_parser(
        "define", parents=[common], help="create a funnel or replace its steps"
    )
    define.add_argument("shop", help="the shop's domain")
    define.add_argument("name", help="the funnel's name")
    define.add_argument(
        "--step",
        action="append",
        default=[],
        metavar="SPEC",
        help="'[NAME:] event=T; url=GLOB; element=PATH; component=ID' (repeat, in order)",
    )
    define.set_defaults(func=define_command)

    lst = fsub.add_parser("list", parents=[common], help="a shop's funnels and their steps")
    lst.add_argument("shop", help="the shop's domain")
    lst.add_argument("--json", action="store_true", help="print the result as JSON")
    lst.set_defaults(func=list_command)

    drop = fsub.add_parser("drop", parents=[common], help="delete a funnel and its rows")
    drop.add_argument("shop", help="the shop's domain")
    drop.add_argument("name", help="the funnel's name")
    drop.set_defaults(func=drop_command)


def _dsn(settings: Settings) -> str:
    return settings.postgres_dsn or settings.resolve_stack().dsn


def _step_text(step: dict[str, str]) -> str:
    keys = {v: k for k, v in funnels.STEP_KEYS.items()}
    return f"{step['name']}: " + "; ".join(f"{keys[k]}={v}" for k, v in step.items() if k in keys)


async def define_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Create or replace a funnel."""
    funnels.parse_steps(args.step)  # refuse bad steps before connecting
    async with Database(_dsn(settings), max_size=1) as db:
        created = await funnels.define(db, args.shop, args.name, args.step)
    console.print(
        f"funnel [bold]{escape(args.name)}[/] {'defined' if created else 'redefined'} with "
        f"{len(args.step)} step(s); the next `rollups refresh` fills conversion_funnels",
        highlight=False,
    )
    return 0


async def list_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """A shop's funnels."""
    async with Database(_dsn(settings), max_size=1) as db:
        found = await funnels.list_funnels(db, args.shop)
    if args.json:
        print(json.dumps([f.as_dict() for f in found], indent=2))
        return 0
    if not found:
        console.print(f"shop {escape(args.shop)} has no funnels", highlight=False)
    for f in found:
        console.print(f"[bold]{escape(f.name)}[/] ({f.sessions} session(s))", highlight=False)
        for i, step in enumerate(f.steps, 1):
            console.print(f"  {i}. {_step_text(step)}", highlight=False, markup=False)
    return 0


async def drop_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Delete a funnel and its conversion_funnels rows."""
    async with Database(_dsn(settings), max_size=2) as db:
        rows = await funnels.drop(db, args.shop, args.name)
    console.print(
        f"funnel [bold]{escape(args.name)}[/] dropped, {rows} row(s) deleted", highlight=False
    )
    return 0
