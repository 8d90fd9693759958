"""``eventpipe bench``: load a deployment, show live progress, summarise, optionally verify."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ingest.core.errors import ConfigError
from ingest.core.settings import Settings, StackInfo
from ingest.loadgen.traffic import LoadConfig, Mix, Target, is_loopback, percentile, run_load
from ingest.loadgen.verify import Verifier


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``bench``."""
    p = sub.add_parser(
        "bench",
        parents=[common],
        help="load generator: realistic traffic at a rate or at maximum throughput",
    )
    p.add_argument("--url", help="collector base URL (default: the stack's)")
    p.add_argument("--write-key", help="shop write key (default: the stack's demo shop)")
    p.add_argument("--webhook-secret", help="shop webhook secret (default: the stack's)")
    p.add_argument("--shop-domain", help="shop domain for webhooks (default: the stack's)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="open loop: requests per second")
    mode.add_argument(
        "--max", action="store_true", help="closed-loop ramp to maximum throughput (default)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections (16)")
    p.add_argument("--batch-size", type=int, default=20, help="events per beacon (default 20)")
    p.add_argument(
        "--mix",
        default="behavior=0.7,storefront=0.2,webhook=0.1",
        help="share of request kinds (default behavior=0.7,storefront=0.2,webhook=0.1)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="RNG seed: the same seed sends the same events and ids (default: random, reported)",
    )
    p.add_argument("--processes", type=int, default=1, help="generator processes (default 1)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="wait until every accepted event id is a row; report lag, missing, duplicates",
    )
    p.add_argument(
        "--verify-timeout", type=float, default=60.0, help="seconds to wait after the load (60)"
    )
    p.add_argument("--out", type=Path, help="JSON result file (default bench-<UTC time>.json)")
    p.add_argument(
        "--allow-remote", action="store_true", help="allow a URL that is not this machine"
    )
    p.set_defaults(func=bench_command)


def _target(settings: Settings, args: argparse.Namespace) -> tuple[Target, StackInfo | None]:
    info = StackInfo.load(settings.state_dir)
    url = args.url or (info.collector_url if info else None)
    key = args.write_key or (info.write_key if info else None)
    if not url or not key:
        raise ConfigError(
            f"no collector URL / write key given and no running stack in {settings.state_dir}",
            hint="pass --url and --write-key, or --state-dir of an `eventpipe up` stack",
        )
    if not is_loopback(url) and not args.allow_remote:
        raise ConfigError(
            f"{url} is not on this machine", hint="pass --allow-remote to load a remote target"
        )
    target = Target(
        url,
        key,
        args.webhook_secret or (info.webhook_secret if info else None),
        args.shop_domain or (info.shop_domain if info else None),
    )
    return target, info


class _Progress:
    """Live figures over the last two seconds and since the start."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.requests = 0
        self.accepted = 0
        self.status: Counter[str] = Counter()
        self.window: list[tuple[float, int, int, list[float]]] = []
        self.verifier: Verifier | None = None

    def __call__(self, delta: dict[str, Any]) -> None:
        now = time.monotonic()
        self.requests += delta["requests"]
        self.accepted += delta["accepted"]
        self.status.update(delta["status"])
        self.window.append((now, delta["requests"], delta["accepted"], delta["lat"]))
        self.window = [w for w in self.window if w[0] > now - 2.0]
        if self.verifier is not None:
            for table, ids in delta["ids"].items():
                self.verifier.expect(table, ids)

    def render(self) -> Table:
        span = max(0.5, min(2.0, time.monotonic() - self.started))
        lats = [x for w in self.window for x in w[3]]
        table = Table(title="eventpipe bench", show_header=True)
        for col in ("elapsed", "req/s", "events/s", "p50 ms", "p99 ms", "status", "unverified"):
            table.add_column(col, justify="right")
        table.add_row(
            f"{time.monotonic() - self.started:.0f}/{self.config.duration_s:.0f} s",
            f"{sum(w[1] for w in self.window) / span:,.0f}",
            f"{sum(w[2] for w in self.window) / span:,.0f}",
            f"{percentile(lats, 50):.1f}",
            f"{percentile(lats, 99):.1f}",
            " ".join(f"{k}:{v}" for k, v in sorted(self.status.items())) or "-",
            str(self.verifier.outstanding) if self.verifier else "-",
        )
        return table


def summary_table(result: dict[str, Any]) -> Table:
    """The end-of-run table."""
    table = Table(title="eventpipe bench: summary", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    lat = result["latency_ms"]
    rows = [
        (
            "mode",
            result["mode"]
            + (f" @ {result['target_rate']:g} req/s" if result["target_rate"] else ""),
        ),
        (
            "requests (ok / errors)",
            f"{result['requests']:,} ({result['ok_requests']:,} / {result['errors']:,})",
        ),
        ("status", " ".join(f"{k}:{v}" for k, v in result["status"].items())),
        ("requests/s", f"{result['requests_per_s']:,.0f}"),
        ("events accepted/s", f"{result['events_per_s']:,.0f}"),
        (
            "latency p50 / p90 / p99 / max ms",
            f"{lat['p50']} / {lat['p90']} / {lat['p99']} / {lat['max']}",
        ),
    ]
    if result["max_requests_per_s"]:
        rows.append(("max requests/s (best ramp step)", f"{result['max_requests_per_s']:,.0f}"))
    rows.append(("generator CPU %", f"{result['generator_cpu_percent']}"))
    if "verify" in result:
        v = result["verify"]
        rows += [
            ("verified rows / expected", f"{v['seen']:,} / {v['expected']:,}"),
            ("missing / duplicated ids", f"{v['missing']} / {v['duplicates']}"),
            ("lag p50 / p99 / max s", f"{v['lag_p50_s']} / {v['lag_p99_s']} / {v['lag_max_s']}"),
        ]
    for name, value in rows:
        table.add_row(name, value)
    return table


async def bench_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Run the load, print progress and the summary, write the JSON result."""
    target, info = _target(settings, args)
    try:
        mix = Mix.parse(args.mix)
    except ValueError as exc:
        raise ConfigError(f"--mix: {exc}") from exc
    if mix.webhook > 0 and not (target.webhook_secret and target.shop_domain):
        raise ConfigError(
            "webhooks in the mix need --webhook-secret and --shop-domain",
            hint="or set webhook=0 in --mix",
        )
    config = LoadConfig(
        rate=args.rate,
        duration_s=args.duration,
        connections=args.connections,
        batch_size=args.batch_size,
        mix=mix,
        seed=args.seed if args.seed is not None else random.randrange(1 << 31),
        processes=max(1, args.processes),
    )
    progress = _Progress(config)
    dsn = settings.postgres_dsn or (info.postgres_dsn if info else None)
    if args.verify and not dsn:
        raise ConfigError("--verify needs the PostgreSQL DSN", hint="pass --postgres-dsn")
    async with contextlib.AsyncExitStack() as stack:
        verifier: Verifier | None = None
        stop = asyncio.Event()
        if args.verify and dsn:
            verifier = await stack.enter_async_context(Verifier(dsn, datetime.now(UTC)))
            progress.verifier = verifier
            poller = asyncio.create_task(verifier.poll(stop))
        with Live(progress.render(), console=console, refresh_per_second=4) as live:

            async def refresh() -> None:
                while True:
                    await asyncio.sleep(0.25)
                    live.update(progress.render())

            refresher = asyncio.create_task(refresh())
            try:
                result = await run_load(target, config, progress)
            finally:
                refresher.cancel()
                stop.set()
            summary = result.summary()
            if verifier is not None:
                await poller
                reconciliation = await verifier.finish(args.verify_timeout)
                summary["verify"] = reconciliation.summary()
            live.update(progress.render())
    summary["target"] = target.url
    out = args.out or Path(f"bench-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json")
    out.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    console.print()
    console.print(summary_table(summary))
    if summary["generator_saturated"]:
        console.print(
            f"[bold yellow]warning:[/] the generator is the bottleneck (CPU "
            f"{summary['generator_cpu_percent']}%, behind schedule "
            f"{summary['behind_schedule_percent']}%): add --processes",
            highlight=False,
        )
    console.print(f"result written to {out}", highlight=False)
    failed = summary["ok_requests"] == 0
    if "verify" in summary:
        failed = failed or summary["verify"]["missing"] > 0 or summary["verify"]["duplicates"] > 0
    return 1 if failed else 0
