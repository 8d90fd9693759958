"""``eventpipe spool list|replay``: the collectors' spools and the frames they quarantined.

A spooled batch the broker refuses for good (too large for its
``max.message.bytes``, an unauthorised or unknown topic, bytes that no longer
decode) is moved by the drainer to ``<state>/spool/quarantine/``, so the
batches behind it still go. ``list`` shows those frames and every spool
directory still holding data; ``replay`` sends quarantined frames to Kafka
again once the cause is fixed, and removes each one the broker acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from ingest.collector.spool import Quarantine, Quarantined, spool_dirs
from ingest.core.errors import ConfigError, EventpipeError
from ingest.core.producer import EventProducer
from ingest.core.settings import Settings


class ReplayFailed(EventpipeError):
    """A quarantined frame could not be sent again; it stays quarantined."""


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``spool`` and its subcommands (each takes the ``common`` flags)."""
    parser = sub.add_parser("spool", help="the collectors' spools and quarantined frames")
    ssub = parser.add_subparsers(dest="spool_command", required=True)
    ls = ssub.add_parser(
        "list", parents=[common], help="quarantined frames and spools holding data"
    )
    ls.add_argument("--json", action="store_true", help="print JSON lines")
    ls.set_defaults(func=list_command)
    rp = ssub.add_parser("replay", parents=[common], help="send quarantined frames to Kafka again")
    rp.add_argument("ids", nargs="*", help="quarantined frame ids (see `spool list`)")
    rp.add_argument("--all", action="store_true", help="every quarantined frame")
    rp.set_defaults(func=replay_command)


async def list_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Print the quarantined frames, then every spool directory that holds data."""
    root = settings.state_dir / "spool"
    quarantined = Quarantine(root).entries()
    spools = spool_dirs(root)
    if args.json:
        for q in quarantined:
            print(json.dumps({"kind": "quarantined", **asdict(q)}))
        for s in spools:
            print(json.dumps({"kind": "spool", **asdict(s)}))
        return 0
    table = Table("id", "topic", "records", "bytes", "reason", "when", "error")
    for q in quarantined:
        table.add_row(q.id, q.topic, str(q.records), str(q.bytes), q.reason, q.when, q.error[:60])
    console.print(table)
    console.print(f"{len(quarantined)} quarantined frame(s) in {root / 'quarantine'}")
    if spools:
        waiting = Table("spool", "segments", "batches", "bytes", "owner")
        for s in spools:
            owner = "live worker" if s.live else "none (adopted by the next collector start)"
            waiting.add_row(s.directory, str(s.segments), str(s.frames), str(s.bytes), owner)
        console.print(waiting)
    return 0


async def replay_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Send the chosen quarantined frames; stop at the first the broker refuses."""
    if not (args.ids or args.all):
        raise ConfigError("nothing chosen to replay", hint="give ids (see `spool list`) or --all")
    quarantine = Quarantine(settings.state_dir / "spool")
    entries = quarantine.entries()
    chosen: list[Quarantined] = entries
    if not args.all:
        by_id = {e.id: e for e in entries}
        unknown = [i for i in args.ids if i not in by_id]
        if unknown:
            raise ConfigError(
                f"no quarantined frame {unknown[0]}", hint="see `eventpipe spool list`"
            )
        chosen = [by_id[i] for i in args.ids]
    if not settings.kafka_bootstrap:  # only Kafka is needed: a stack's if none is given
        settings = settings.resolve_stack()
    replayed = 0
    async with EventProducer(settings) as producer:
        for entry in chosen:
            try:
                frame = quarantine.frame(entry)
            except (OSError, ValueError) as exc:
                raise ReplayFailed(
                    f"replayed {replayed} of {len(chosen)}: {entry.id} cannot be decoded ({exc})",
                    hint="it stays quarantined; inspect or delete its file",
                ) from exc
            try:
                async with asyncio.timeout(max(settings.produce_timeout_s * 5, 10)):
                    await producer.send_batch(frame.topic, frame.messages)
            except Exception as exc:
                error = " ".join((str(exc) or type(exc).__name__).split())
                raise ReplayFailed(
                    f"replayed {replayed} of {len(chosen)}: {entry.id} refused "
                    f"(quarantined as {entry.reason}): {error}",
                    hint="it stays quarantined; fix the cause and replay again",
                ) from exc
            quarantine.remove(entry)
            replayed += 1
    console.print(f"{replayed} frame(s) replayed", highlight=False)
    return 0
