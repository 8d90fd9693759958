"""The ``eventpipe`` command: a thin shell over the components."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pydantic
from rich.console import Console
from rich.text import Text

from consumers.rows import SPECS
from consumers.runner import run_loader_processes, run_loaders
from ingest.cli import analysts as analysts_cli
from ingest.cli import bench as bench_cli
from ingest.cli import deadletters as dead_letters_cli
from ingest.cli import erase as erase_cli
from ingest.cli import funnels as funnels_cli
from ingest.cli import keys as keys_cli
from ingest.cli import partitions as partitions_cli
from ingest.cli import rollups as rollups_cli
from ingest.cli import shops as shops_cli
from ingest.cli import spool as spool_cli
from ingest.collector.server import run_collector, run_collector_workers
from ingest.core import logs, runtime
from ingest.core.errors import EventpipeError
from ingest.core.migrate import migrate
from ingest.core.settings import Settings
from ingest.stack.up import run_up

Command = Callable[[Settings, argparse.Namespace, Console], Coroutine[Any, Any, int]]


def _stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def up_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Start the whole pipeline."""
    return await run_up(settings, _stop_event(), console)


async def collector_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Run the HTTP collector (several processes on one port with --workers)."""
    settings = settings.resolve_stack()
    if settings.collector_workers > 1:
        return await run_collector_workers(settings, _stop_event())
    await run_collector(settings, _stop_event())
    return 0


async def loader_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Run loaders for one stream or all."""
    settings = settings.resolve_stack()
    if args.processes > 1:
        return await run_loader_processes(settings, args.stream, args.processes, _stop_event())
    streams = list(SPECS) if args.stream == "all" else [args.stream]
    await run_loaders(settings, [SPECS[s] for s in streams], _stop_event())
    return 0


async def migrate_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Apply pending migrations."""
    applied = await migrate(settings.resolve_stack().dsn)
    for m in applied:
        console.print(f"applied {m.version:04d}_{m.name}")
    console.print("schema up to date" if not applied else f"{len(applied)} migration(s) applied")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, help="state directory (default .eventpipe)")
    common.add_argument("--postgres-dsn", help="PostgreSQL DSN (default: the stack's)")
    common.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers (default: the stack's)")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    common.add_argument("--log-format", choices=["console", "json"])

    parser = argparse.ArgumentParser(
        prog="eventpipe", description="Event ingestion pipeline: HTTP -> Kafka -> PostgreSQL."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="run the whole pipeline on embedded defaults")
    up.add_argument("--port", type=int, dest="collector_port", help="collector port (default 8780)")
    up.add_argument("--host", dest="collector_host", help="collector address (default 127.0.0.1)")
    up.set_defaults(func=up_command)

    collector = sub.add_parser("collector", parents=[common], help="run the HTTP collector")
    collector.add_argument("--port", type=int, dest="collector_port")
    collector.add_argument("--host", dest="collector_host")
    collector.add_argument(
        "--workers", type=int, dest="collector_workers", help="processes sharing the port"
    )
    collector.set_defaults(func=collector_command)

    loader = sub.add_parser("loader", parents=[common], help="run loaders (Kafka -> PostgreSQL)")
    loader.add_argument("--stream", choices=[*SPECS, "all"], default="all")
    loader.add_argument(
        "--processes", type=int, default=1, help="loader processes in the group (default 1)"
    )
    loader.set_defaults(func=loader_command)

    mig = sub.add_parser("migrate", parents=[common], help="apply pending schema migrations")
    mig.set_defaults(func=migrate_command)

    partitions_cli.add_parser(sub, common)
    rollups_cli.add_parser(sub, common)
    funnels_cli.add_parser(sub, common)
    dead_letters_cli.add_parser(sub, common)
    erase_cli.add_parser(sub, common)
    keys_cli.add_parser(sub, common)
    analysts_cli.add_parser(sub, common)
    shops_cli.add_parser(sub, common)
    spool_cli.add_parser(sub, common)
    bench_cli.add_parser(sub, common)
    return parser


_FLAG_FIELDS = (
    "state_dir",
    "postgres_dsn",
    "kafka_bootstrap",
    "log_level",
    "log_format",
    "collector_port",
    "collector_host",
    "collector_workers",
)


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags given."""
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in _FLAG_FIELDS if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eventpipe`` console script."""
    args = build_parser().parse_args(argv)
    console = Console()
    err = Console(stderr=True)
    try:
        settings = settings_from(args)
        logs.configure(settings.log_level, settings.log_format)
        func: Command = args.func
        loop = settings.event_loop if args.func is collector_command else "asyncio"
        return runtime.run(func(settings, args, console), loop)
    except EventpipeError as exc:
        _print_error(err, exc.message, exc.hint)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except pydantic.ValidationError as exc:  # a bad EVENTPIPE_* value or flag
        _print_error(
            err, f"invalid setting: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}", ""
        )
        return 2


def _print_error(console: Console, message: str, hint: str) -> None:
    """One line: what went wrong and what to do."""
    text = Text.assemble(("eventpipe: error: ", "bold red"), message)
    if hint:
        text.append(f" ({hint})", style="dim")
    console.print(text, soft_wrap=True, highlight=False)
