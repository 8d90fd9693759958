"""``eventpipe up``: the whole pipeline on one machine, on embedded defaults.

Starts PostgreSQL and the broker (unless DSN / bootstrap are configured),
migrates, creates topics and a demo shop, writes ``<state-dir>/stack.json``,
then supervises a collector and a loader process (restarted with backoff
when they exit, never given up on) and runs partition maintenance on a timer. Stops
everything, in order, on SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import structlog
from rich.console import Console

from ingest.core import records
from ingest.core.db import Database, queries
from ingest.core.errors import MaintenanceLocked, StartupError
from ingest.core.logs import redact
from ingest.core.migrate import migrate
from ingest.core.processes import ensure_port_free, ensure_writable_dir, free_port
from ingest.core.settings import Settings, StackInfo, private_dir
from ingest.core.shops import ensure_shop
from ingest.core.supervisor import Child, Supervisor
from ingest.core.topics import cluster_id, ensure_topics
from ingest.partitions import PartitionManager
from ingest.rollups import refresh as refresh_rollups
from ingest.stack.broker import EmbeddedBroker
from ingest.stack.postgres import EmbeddedPostgres

log = structlog.get_logger(__name__)

DEMO_SHOP = "demo.myshopify.com"


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold ``<state-dir>/up.lock``: one ``up`` per state directory."""
    fd = os.open(state_dir / "up.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    with open(fd, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StartupError(
                f"another `eventpipe up` is running on {state_dir}",
                hint="stop it first, join it with --state-dir, or use another --state-dir",
            ) from exc
        yield


def demo_curl(info: StackInfo) -> str:
    """A ready-to-paste curl that sends one beacon, as navigator.sendBeacon would."""
    body = (
        '{"events":[{"event_type":"page_view","session_id":"demo-session",'
        f'"page_url":"https://{info.shop_domain}/"}}]}}'
    )
    url = f"{info.collector_url}/v1/behavior?k={info.write_key}"
    return (
        f"curl -sS -X POST {shlex.quote(url)} -H 'Content-Type: text/plain' -d {shlex.quote(body)}"
    )


async def _wait_http(url: str, supervisor: Supervisor, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            supervisor.check_running()
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return
            if loop.time() > deadline:
                raise StartupError(f"the collector did not answer {url} within {timeout:.0f} s")
            await asyncio.sleep(0.1)


async def _wait_loaders(
    db: Database, log_id: str, topics: list[str], partitions: int, supervisor: Supervisor
) -> None:
    """Wait until the loaders own every Kafka partition (they record it in PostgreSQL)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while await queries.fetchval(db.pool, "claimed_partitions", log_id, topics) < partitions * len(
        topics
    ):
        supervisor.check_running()
        if loop.time() > deadline:
            raise StartupError("the loaders did not join their consumer group within 60 s")
        await asyncio.sleep(0.2)


async def _keep_broker(broker: EmbeddedBroker, settings: Settings) -> None:
    """Restart the embedded broker on its port if it dies, and recreate the topics.

    Its log was in memory: events accepted but not yet loaded when it died are
    lost (see the README); loaders notice the new log and start over on it.
    """
    while True:
        await asyncio.sleep(0.5)
        if broker.running:
            continue
        log.error("the embedded broker died; restarting it (its unloaded events are lost)")
        try:
            await broker.start()
            await ensure_topics(
                broker.bootstrap,
                [settings.topic_behavior, settings.topic_storefront],
                partitions=settings.topic_partitions,
                max_message_bytes=records.topic_max_message_bytes(settings.max_record_bytes),
            )
        except Exception as exc:  # try again on the next tick
            log.error("broker restart failed", error=str(exc))


async def _maintenance(manager: PartitionManager, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            report = await manager.maintain()
            if report.actions:
                log.info("partition maintenance", actions=len(report.actions))
        except MaintenanceLocked:
            log.info("partition maintenance skipped: another run holds the lock")
        except Exception as exc:  # keep the timer alive; the next run retries
            log.error("partition maintenance failed", error=str(exc))


async def _rollups(db: Database, settings: Settings) -> None:
    """Refresh the analysis tables every ``rollup_interval_s`` (incremental: cheap)."""
    while True:
        await asyncio.sleep(settings.rollup_interval_s)
        try:
            await refresh_rollups(db)
        except Exception as exc:  # keep the timer alive; the next run retries
            log.error("rollup refresh failed", error=str(exc))


async def run_up(settings: Settings, stop: asyncio.Event, console: Console) -> int:
    """Run the stack until ``stop`` is set; returns the exit code.

    Everything ``up`` and its children (PostgreSQL, the broker, collector, loader)
    create is private to the user: the umask is 077 while it runs, on top of the
    explicit 0600/0700 modes of stack.json, logs, spool and archives.
    """
    umask = os.umask(0o077)
    try:
        return await _run_up(settings, stop, console)
    finally:
        os.umask(umask)


async def _run_up(settings: Settings, stop: asyncio.Event, console: Console) -> int:
    state = ensure_writable_dir(private_dir(settings.state_dir), "state directory")
    with state_lock(state):
        ensure_port_free(
            settings.collector_host,
            settings.collector_port,
            "collector",
            "--port or EVENTPIPE_COLLECTOR_PORT",
        )
        async with contextlib.AsyncExitStack() as stack:
            if settings.postgres_dsn:
                dsn = settings.postgres_dsn
            else:
                previous = StackInfo.load(state)
                pg = EmbeddedPostgres(
                    state,
                    port=settings.postgres_port,
                    password=previous.embedded_postgres_password if previous else None,
                )
                await stack.enter_async_context(pg)
                dsn = pg.dsn
            if settings.kafka_bootstrap:
                bootstrap = settings.kafka_bootstrap
            else:
                broker = EmbeddedBroker(
                    state, port=settings.broker_port, binary=settings.broker_bin
                )
                await stack.enter_async_context(broker)
                bootstrap = broker.bootstrap
            await migrate(dsn)
            await ensure_topics(
                bootstrap,
                [settings.topic_behavior, settings.topic_storefront],
                partitions=settings.topic_partitions,
                replication=settings.topic_replication,
                max_message_bytes=records.topic_max_message_bytes(settings.max_record_bytes),
            )
            db = await stack.enter_async_context(Database(dsn, max_size=2))
            shop = await ensure_shop(db, DEMO_SHOP)
            manager = PartitionManager.from_settings(db, settings)
            await manager.maintain()
            info = StackInfo(
                collector_url=f"http://{settings.collector_host}:{settings.collector_port}",
                postgres_dsn=dsn,
                kafka_bootstrap=bootstrap,
                write_key=shop.write_key,
                webhook_secret=shop.webhook_secret,
                shop_id=str(shop.shop_id),
                shop_domain=shop.domain,
                postgres_embedded=not settings.postgres_dsn,
            )
            stack_file = info.save(state)
            env = {
                **os.environ,
                "EVENTPIPE_STATE_DIR": str(state),
                "EVENTPIPE_POSTGRES_DSN": dsn,
                "EVENTPIPE_KAFKA_BOOTSTRAP": bootstrap,
                "EVENTPIPE_COLLECTOR_HOST": settings.collector_host,
                "EVENTPIPE_COLLECTOR_PORT": str(settings.collector_port),
            }
            env.setdefault("EVENTPIPE_LOADER_METRICS_PORT", str(free_port()))
            if not settings.kafka_bootstrap:  # Tansu joins a group in half the session timeout
                env.setdefault("EVENTPIPE_KAFKA_SESSION_TIMEOUT_MS", "6000")
            cli = [sys.executable, "-m", "ingest.cli"]
            supervisor = Supervisor(
                [
                    Child("collector", [*cli, "collector"]),
                    Child("loader", [*cli, "loader", "--stream", "all"]),
                ],
                env,
            )
            await stack.enter_async_context(supervisor)
            await _wait_http(f"{info.collector_url}/healthz", supervisor)
            topics = [settings.topic_behavior, settings.topic_storefront]
            log_id = settings.kafka_log_id or await cluster_id(bootstrap)
            await _wait_loaders(db, log_id, topics, settings.topic_partitions, supervisor)
            timer = asyncio.create_task(_maintenance(manager, settings.maintenance_interval_s))
            stack.callback(timer.cancel)
            rollups = asyncio.create_task(_rollups(db, settings))
            stack.callback(rollups.cancel)
            if not settings.kafka_bootstrap:
                keeper = asyncio.create_task(_keep_broker(broker, settings))
                stack.callback(keeper.cancel)
            console.print(
                f"\n[bold green]eventpipe is up[/]  (state in {state}, facts in {stack_file})\n"
                f"  collector   {info.collector_url}\n"
                f"  postgres    {redact(dsn)}\n"
                f"  kafka       {bootstrap}\n"
                f"  shop        {info.shop_domain}  write key [bold]{info.write_key}[/]\n\n"
                "Send a beacon:\n",
                highlight=False,
            )
            console.print(demo_curl(info), soft_wrap=True, highlight=False, markup=False)
            console.print("\nCtrl-C stops everything.\n", highlight=False)
            # A child that keeps exiting is restarted with growing delays (see
            # Supervisor), never a reason to stop PostgreSQL and the rest.
            await supervisor.wait(stop)
            console.print("stopping ...", highlight=False)
    console.print("stopped.", highlight=False)
    return 0
