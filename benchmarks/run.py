"""The load benchmark suite: ``python -m benchmarks.run [--quick]`` (``make bench [QUICK=1]``).

Starts an embedded PostgreSQL and broker, runs collectors, loaders and the
bare baseline server as subprocesses, and measures every figure against a
baseline taken in the same run on the same machine. Writes
``benchmarks/results/latest.json``, a dated copy, and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer
from rich.console import Console
from rich.table import Table

from benchmarks import (
    collector_bench,
    erase_bench,
    loader_bench,
    partitions_bench,
    rollups_bench,
    wrk,
)
from benchmarks.common import RESULTS, CpuMeter, Stack, embedded_stack, machine, scrape, stalls
from consumers.rows import STOREFRONT
from consumers.values import pg_times
from ingest.core import logs
from ingest.core.db import Database
from ingest.core.processes import free_port, spawn, stop_process
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials, ensure_shop
from ingest.core.topics import ensure_topics
from ingest.loadgen.dialects import DIALECTS
from ingest.loadgen.traffic import LoadConfig, Mix, Result, Target, run_load
from ingest.loadgen.verify import CountedIds, Verifier
from ingest.partitions import PartitionManager

console = Console()
BEACONS = Mix(behavior=1.0, storefront=0.0, webhook=0.0)
# The native endpoint each protocol is compared with: the one of the stream it lands in
# (Segment's messages are storefront events; Snowplow's and PostHog's behavior events).
BASELINES = {"segment": "native_storefront", "snowplow": "native", "posthog": "native"}


@contextlib.asynccontextmanager
async def process(
    name: str, argv: list[str], env: dict[str, str], logdir: Path, health: str | None
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A subprocess, up once ``health`` answers, stopped (SIGTERM) on exit."""
    proc = spawn(argv, log_path=logdir / f"{name}.log", env={**os.environ, **env})
    try:
        if health:
            await _wait_http(health, proc, logdir / f"{name}.log")
        yield proc
    finally:
        await stop_process(proc)


async def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import aiohttp

    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: process exited: {log.read_text()[-2000:]}")  # noqa: ASYNC240
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as resp:
                    if resp.status < 500:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within 30 s")


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a collector (its busiest worker's, with ``--workers``),
    from the kernel's high-water mark (``VmHWM``), read once while it runs.

    Not sampled from a thread: a sampler in the generator's process took the GIL for
    psutil's /proc reads every 100 ms, delaying the open-loop sends it runs beside and
    doubling the half-rate p99 it was measured with (7 -> 14 ms on a quiet machine)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    # one worker's: with --workers the parent only supervises
    workers = [p for p in procs if "collector" in " ".join(p.cmdline())] or procs
    peak = 0
    for proc in workers:
        with contextlib.suppress(psutil.Error, OSError, ValueError):
            status = Path(f"/proc/{proc.pid}/status").read_text()
            line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
            peak = max(peak, int(line.split()[1]))  # kB
    return peak / 1024


class Suite:
    """Shared state of one run of the suite."""

    def __init__(self, stack: Stack, quick: bool, tmp: Path) -> None:
        self.stack = stack
        self.quick = quick
        self.tmp = tmp
        self.load_s = 6.0 if quick else 12.0
        self.connections = 16
        self.mode = "quick" if quick else "full"
        self.results: dict[str, Any] = {}
        self._seed = 0
        self.runs: dict[str, Result] = {}

    def settings(self, **update: Any) -> Settings:
        """Settings of one section: its own topics, group and state directory."""
        tag = uuid.uuid4().hex[:6]
        state = self.tmp / f"state-{tag}"
        state.mkdir()
        values: dict[str, Any] = {
            "state_dir": state,
            "postgres_dsn": self.stack.dsn,
            "kafka_bootstrap": self.stack.bootstrap,
            "kafka_log_id": self.stack.log_id,
            "topic_behavior": f"bench.behavior.{tag}",
            "topic_storefront": f"bench.storefront.{tag}",
            "consumer_group": f"bench-{tag}",
            "collector_port": free_port(),
            "rate_limit_per_s": 0.0,  # one shop sends everything: no per-key limit
            "loader_metrics_port": 0,
            "kafka_session_timeout_ms": 6000,
            "log_level": "warning",
        }
        values.update(update)
        return Settings(**values)

    def seed(self) -> int:
        """A new seed per load: the same seed would send the same event ids again."""
        self._seed += 1
        return self._seed

    async def shop(self) -> ShopCredentials:
        """A fresh shop (its rows can be counted alone)."""
        async with Database(self.stack.dsn, max_size=1) as db:
            return await ensure_shop(db, f"bench-{uuid.uuid4().hex[:8]}.myshopify.com")

    @contextlib.asynccontextmanager
    async def collector(self, settings: Settings, workers: int = 1) -> AsyncIterator[str]:
        """A collector subprocess; yields its URL."""
        await ensure_topics(
            settings.bootstrap, [settings.topic_behavior, settings.topic_storefront], partitions=3
        )
        url = f"http://127.0.0.1:{settings.collector_port}"
        argv = [sys.executable, "-m", "ingest.cli", "collector", "--workers", str(workers)]
        async with process(
            f"collector-{workers}w-{settings.collector_port}",
            argv,
            settings.to_env(),
            self.tmp,
            f"{url}/healthz",
        ) as proc:
            self._collector_pid = proc.pid
            yield url

    def load(self, name: str, target: Target, **config: Any) -> Any:
        """Run a load and keep it for the plots."""
        cfg = LoadConfig(
            duration_s=self.load_s, connections=self.connections, seed=self.seed(), **config
        )

        async def go() -> Result:
            result = await run_load(target, cfg)
            self.runs[name] = result
            return result

        return go()

    async def collector_section(self) -> None:
        console.rule("1. collector vs bare aiohttp handler, under wrk, per protocol")
        missing = await asyncio.to_thread(wrk.ensure_wrk)
        if missing:
            console.print(f"[yellow]{missing}: the Python generator measures the maximum[/]")
            await self._collector_section_python(missing)
            return
        seconds = 5.0 if self.quick else 10.0
        settings = self.settings()
        shop = await self.shop()
        target = Target("", shop.write_key, shop.webhook_secret, shop.domain)
        sets = collector_bench.bodies(target, self.seed())
        port = free_port()
        bare = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "benchmarks.bare_server", str(port)]
        async with process("bare", argv, {}, self.tmp, f"{bare}/healthz") as proc:
            bare_run = await collector_bench.measure(
                bare, sets["native"], self.tmp, {"bare": proc.pid}, seconds
            )
        protocols: dict[str, Any] = {}
        broker_pid = self.stack.pids.get("broker")
        async with self.collector(settings) as url:
            servers = {"collector": self._collector_pid}
            if broker_pid:
                servers["broker"] = broker_pid
            for requests in sets.values():
                await collector_bench.check_accepted(url, requests)
            protocols["native"] = await collector_bench.measure(
                url, sets["native"], self.tmp, servers, seconds
            )
            # Latency at half the maximum (open loop, from the intended send time),
            # before the other protocols' loads fill the embedded broker's log,
            # which it keeps in memory (the broker's growth is not the collector's).
            max_rps = protocols["native"]["requests_per_s"]
            target = Target(url, shop.write_key, shop.webhook_secret, shop.domain)
            scraped = await scrape(url)
            half = await self.load("collector_half", target, mix=BEACONS, rate=max_rps / 2)
            half_stalls = stalls(scraped, await scrape(url))
            protocols["native_storefront"] = await collector_bench.measure(
                url, sets["native_storefront"], self.tmp, servers, seconds
            )
            for name in DIALECTS:
                # Each protocol between two runs of its native endpoint, compared with
                # their mean: the broker keeps its log in memory and slows as it
                # grows, so a baseline taken minutes earlier would flatter neither.
                base = BASELINES[name]
                before = await collector_bench.measure(url, sets[base], self.tmp, servers, seconds)
                figures = await collector_bench.measure(url, sets[name], self.tmp, servers, seconds)
                after = await collector_bench.measure(url, sets[base], self.tmp, servers, seconds)
                baseline = (before["events_per_s"] + after["events_per_s"]) / 2
                figures["baseline"] = base
                figures["baseline_events_per_s"] = [
                    before["events_per_s"],
                    after["events_per_s"],
                ]
                figures["events_vs_native"] = round(figures["events_per_s"] / baseline, 3)
                protocols[name] = figures
            rss_mb = peak_rss_mb(self._collector_pid)
        native, h = protocols["native"], half.summary()
        self._bodies, self._wrk_s = sets, seconds
        protocols["native_storefront"]["events_vs_native"] = round(
            protocols["native_storefront"]["events_per_s"] / native["events_per_s"], 3
        )
        self.results["collector"] = {
            "generator": "wrk",
            "mode": self.mode,
            "seconds_per_run": seconds,
            "bodies_per_protocol": len(sets["native"]),
            "bare": bare_run,
            "bare_requests_per_s": bare_run["requests_per_s"],
            # a baseline whose generator used more CPU than the server measured wrk
            "bare_baseline_valid": bare_run["generator_below_server"],
            "requests_per_s": native["requests_per_s"],
            "events_per_s": native["events_per_s"],
            "ratio_vs_bare": round(native["requests_per_s"] / bare_run["requests_per_s"], 3),
            "protocols": protocols,
            "half_rate_requests_per_s": round(max_rps / 2, 1),
            "p50_ms": h["latency_ms"]["p50"],
            "p99_ms": h["latency_ms"]["p99"],
            "half_rate_errors": h["errors"],
            "half_rate_generator_saturated": h["generator_saturated"],
            # what stopped the collector's loop during the half-rate run: a p99 above
            # the loop's own worst lag is queueing or the generator, not a stall
            "half_rate_stalls": half_stalls,
            "rss_mb": round(rss_mb, 1),
        }

    async def _collector_section_python(self, why: str) -> None:
        """The collector figures from the Python generator, when wrk cannot be had
        (marked: its maximum is the generator's as much as the server's)."""
        port = free_port()
        bare = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "benchmarks.bare_server", str(port)]
        async with process("bare", argv, {}, self.tmp, f"{bare}/healthz"):
            bare_run = await self.load("bare_max", Target(bare, "x"), mix=BEACONS)
        settings = self.settings()
        shop = await self.shop()
        async with self.collector(settings) as url:
            target = Target(url, shop.write_key, shop.webhook_secret, shop.domain)
            max_run = await self.load("collector_max", target, mix=BEACONS)
            max_rps = max_run.summary()["max_requests_per_s"]
            half = await self.load("collector_half", target, mix=BEACONS, rate=max_rps / 2)
            rss_mb = peak_rss_mb(self._collector_pid)
        b, m, h = bare_run.summary(), max_run.summary(), half.summary()
        self.results["collector"] = {
            "generator": f"python (no wrk: {why})",
            "mode": self.mode,
            "bare_requests_per_s": b["max_requests_per_s"],
            "bare_baseline_valid": not b["generator_saturated"],
            "requests_per_s": m["max_requests_per_s"],
            "events_per_s": m["max_events_per_s"],
            "ratio_vs_bare": round(m["max_requests_per_s"] / b["max_requests_per_s"], 3),
            "protocols": {},
            "half_rate_requests_per_s": round(max_rps / 2, 1),
            "p50_ms": h["latency_ms"]["p50"],
            "p99_ms": h["latency_ms"]["p99"],
            "half_rate_errors": h["errors"],
            "half_rate_generator_saturated": h["generator_saturated"],
            "rss_mb": round(rss_mb, 1),
        }

    async def loader_section(self) -> None:
        console.rule("2. loader vs raw asyncpg binary COPY")
        rows, repeat = (30_000, 1) if self.quick else (150_000, 5)
        # In a fresh process, as a real loader runs (see loader_bench).
        argv = [sys.executable, "-m", "benchmarks.loader_bench", "--rows", str(rows)]
        argv += ["--repeat", str(repeat), "--stack", json.dumps(dataclasses.asdict(self.stack))]
        child = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
        out, _ = await child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"loader benchmark failed (exit {child.returncode})")
        self.results["loader"] = json.loads(out.splitlines()[-1])

    async def _await_ready(self, target: Target, verifier_dsn: str) -> int:
        """Warm-up requests that must become rows (the loaders have joined); their events."""
        warm = await run_load(target, LoadConfig(rate=5, duration_s=0.4, connections=1, seed=99))
        async with Verifier(verifier_dsn, warm.started_at) as verifier:
            for table, ids in warm.accepted_ids.items():
                verifier.expect(table, ids)
            await verifier.finish(60)
            return verifier.result.expected

    async def _verified(self, name: str, target: Target, **config: Any) -> tuple[Result, Any]:
        """A load with the verifier polling during it; (result, reconciliation)."""
        async with Verifier(self.stack.dsn, datetime.now(UTC)) as verifier:
            stop = asyncio.Event()
            poller = asyncio.create_task(verifier.poll(stop))
            cfg = LoadConfig(
                duration_s=self.load_s, connections=self.connections, seed=self.seed(), **config
            )

            def feed(delta: dict[str, Any]) -> None:
                for table, ids in delta["ids"].items():
                    verifier.expect(table, ids)

            result = await run_load(target, cfg, feed)
            stop.set()
            await poller
            self.runs[name] = result
            return result, await verifier.finish(120)

    async def e2e_section(self) -> None:
        console.rule("3. end to end: collector + loaders + PostgreSQL")
        settings = self.settings()
        shop = await self.shop()
        argv = [sys.executable, "-m", "ingest.cli", "loader", "--stream", "all"]
        async with (
            self.collector(settings) as url,
            process("loader-e2e", argv, settings.to_env(), self.tmp, None) as loader,
        ):
            self._loader_pid = loader.pid
            target = Target(url, shop.write_key, shop.webhook_secret, shop.domain)
            warm = await self._await_ready(target, self.stack.dsn)
            wrk_run = await asyncio.to_thread(wrk.ensure_wrk) is None
            if wrk_run:
                max_figures = await self._e2e_wrk(url, target)
                max_rec = max_figures.pop("reconciliation")
                sustained = max_figures["events_per_s"]
                m = {"events_accepted": max_figures["accepted_events"], "errors": 0}
                m["generator_saturated"] = not max_figures["generator_below_servers"]
            else:
                max_run, max_rec = await self._verified("e2e_max", target)
                m = max_run.summary()
                sustained = m["events_accepted"] / (max_run.seconds + max_rec.wait_s)
                max_figures = {"generator": "python"}
            rate = sustained / 2 / 20  # 20-event beacons
            half_run, half_rec = await self._verified("e2e_half", target, rate=rate)
        async with Database(self.stack.dsn, max_size=1) as db:
            rows = await db.pool.fetchval(
                "SELECT (SELECT count(*) FROM behavior_events WHERE shop_id = $1) + "
                "(SELECT count(*) FROM events WHERE shop_id = $1)",
                shop.shop_id,
            )
        h = half_run.summary()
        # with wrk, the stored ids of requests in flight when it stopped count too
        expected = max_rec.expected + half_rec.expected + max_figures.get("tail_ids_stored", 0)
        self.results["e2e"] = {
            **max_figures,
            "events_per_s": round(sustained, 1),
            "max_run_accepted_events": m["events_accepted"],
            "max_run_drain_s": round(max_rec.wait_s, 2),
            "half_rate_events_per_s": h["events_per_s"],
            "lag_p50_s": half_rec.summary()["lag_p50_s"],
            "lag_p99_s": half_rec.summary()["lag_p99_s"],
            "lag_max_s": half_rec.summary()["lag_max_s"],
            # wrk's run reads its rows only after the drain (_e2e_wrk): no lag of its own
            "max_run_lag_p99_s": None if wrk_run else max_rec.summary()["lag_p99_s"],
            "missing": max_rec.missing + half_rec.missing,
            "duplicates": max_rec.duplicates + half_rec.duplicates,
            "accepted_ids": expected,
            "rows_of_shop": rows,
            "warmup_events": warm,
            # every row of this shop is an accepted id, and every accepted id a row
            "count_exact": rows == expected + warm and max_rec.missing + half_rec.missing == 0,
            "errors": m["errors"] + h["errors"],
            "generator_saturated": m["generator_saturated"] or h["generator_saturated"],
        }

    async def _e2e_wrk(self, url: str, target: Target) -> dict[str, Any]:
        """The end-to-end maximum: wrk sends the benchmark's beacons with unique ids
        (so the loaders' deduplication is not what is measured) for the load time;
        then every id must become one row.

        The requests wrk had in flight when it stopped (at most one per connection,
        among its last) may or may not have been taken: the ids of the last
        ``2 * connections`` requests (and of the first request() call, which wrk
        never sends) are counted apart, not waited for.
        """
        requests = collector_bench.bodies(target, self.seed())["native"]
        script = wrk.write_script(self.tmp / "e2e.lua", requests, unique=True)
        servers = {"collector": self._collector_pid, "loader": self._loader_pid}
        if self.stack.pids.get("broker"):
            servers["broker"] = self.stack.pids["broker"]  # type: ignore[assignment]
        started = datetime.now(UTC)
        # Every process's CPU over load and drain (PostgreSQL with its backends; "python"
        # is this suite's, the verifier's polls): where the two cores went.
        pipeline = CpuMeter({**servers, "postgres": self.stack.pids.get("postgres")})
        pipeline.start()
        load = await asyncio.to_thread(
            wrk.run, url, script, seconds=self.load_s * 2, servers=servers
        )
        ended = time.monotonic()
        tail = 2 * self.connections
        made = load.requests_made
        # wrk calls request() once before its first send and never sends that one
        # (a server recording the counters sees 2..N): counter 1 is counted apart too.
        last = made - tail
        # The drain is timed by counting the certain ids' rows in PostgreSQL; the ids
        # are worked out and reconciled one by one only once it is over: reading a
        # million rows into this process took seconds of the two cores the loaders
        # drained on, inside the window it timed.
        async with CountedIds(self.stack.dsn, started, 2, last) as counted:
            drained = await counted.until(wrk.id_count(requests, 2, last), 120)
        drain_s = time.monotonic() - ended
        pipeline_cpu = pipeline.stop()
        certain = [i for n in range(2, last + 1) for i in wrk.unique_ids(requests, n)]
        apart = [1, *range(max(2, last + 1), made + 1)]
        uncertain = [i for n in apart for i in wrk.unique_ids(requests, n)]
        async with Verifier(self.stack.dsn, started) as verifier:
            verifier.expect("behavior_events", certain)
            rec = await verifier.finish(5 if drained else 60)
        rec.wait_s = drain_s
        async with Database(self.stack.dsn, max_size=1) as db:
            tail_rows = await db.pool.fetchval(
                "SELECT count(*) FROM behavior_events WHERE event_id = ANY($1::uuid[])",
                uncertain,
            )
        figures = load.summary(collector_bench.EVENTS_PER_REQUEST)
        accepted = (load.requests - load.non_2xx) * collector_bench.EVENTS_PER_REQUEST
        return {
            "generator": "wrk",
            "load_s": round(load.seconds, 1),
            "drain_s": round(drain_s, 2),  # from the load's end to the last certain id's row
            "drained": drained,  # every certain id's row counted within the timeout
            "accepted_events": accepted,
            # sustained: everything accepted, loaded, in load + drain time
            "events_per_s": round(accepted / (load.seconds + rec.wait_s), 1),
            "collector_requests_per_s": figures["requests_per_s"],
            "non_2xx": load.non_2xx,
            "socket_errors": load.socket_errors,
            "requests_made": made,
            "ids_reconciled": len(certain),
            "tail_ids": len(uncertain),
            "tail_ids_stored": tail_rows,
            # which requests (the script's counters) the missing ids were sent in
            "missing_request_counters": sorted({int(i[:8], 16) for i in rec.missing_sample}),
            "cpu_s": figures["server_cpu_s"],
            "cpu_s_load_and_drain": pipeline_cpu,
            "generator_cpu_s": figures["generator_cpu_s"],
            "generator_below_servers": figures["generator_below_server"],
            "reconciliation": rec,
        }

    async def scaling_section(self) -> None:
        console.rule("4. scaling: 2 collector workers, 2 loader processes")
        settings = self.settings()
        shop = await self.shop()
        figures: dict[str, Any] = {}
        if getattr(self, "_bodies", None):  # wrk, with the collector section's bodies
            native = self._bodies["native"]
            port = free_port()
            bare = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "benchmarks.bare_server", str(port), "--reuse-port"]
            async with contextlib.AsyncExitStack() as stack:
                procs = [
                    await stack.enter_async_context(
                        process(f"bare-{i}", argv, {}, self.tmp, f"{bare}/healthz")
                    )
                    for i in range(2)
                ]
                servers = {"bare": procs[0].pid, "bare-2": procs[1].pid}
                bare_2 = await collector_bench.measure(bare, native, self.tmp, servers, self._wrk_s)
            async with self.collector(settings, workers=2) as url:
                collector_2 = await collector_bench.measure(
                    url, native, self.tmp, {"collector": self._collector_pid}, self._wrk_s
                )
            figures = {
                "generator": "wrk",
                "bare_2_workers_requests_per_s": bare_2["requests_per_s"],
                "bare_2_vs_1": round(
                    bare_2["requests_per_s"] / self.results["collector"]["bare_requests_per_s"], 3
                ),
                "collector_2_workers_vs_bare_2": round(
                    collector_2["requests_per_s"] / bare_2["requests_per_s"], 3
                ),
                "collector_2_workers": collector_2,
                "bare_2_workers": bare_2,
            }
            two = collector_2["requests_per_s"]
        else:
            async with self.collector(settings, workers=2) as url:
                target = Target(url, shop.write_key, shop.webhook_secret, shop.domain)
                run = await self.load("collector_2w_max", target, mix=BEACONS)
            two = run.summary()["max_requests_per_s"]
            figures["generator"] = "python"
        one = self.results["collector"]["requests_per_s"]
        rows = 30_000 if self.quick else 100_000
        loader = {p: await self._loader_processes(rows, p) for p in (1, 2)}
        self.results["scaling"] = {
            **figures,
            "collector_1_worker_requests_per_s": one,
            "collector_2_workers_requests_per_s": two,
            "collector_2_vs_1": round(two / one, 3),
            "loader_rows": rows,
            "loader_1_process_rows_per_s": loader[1],
            "loader_2_processes_rows_per_s": loader[2],
            "loader_2_vs_1": round(loader[2] / loader[1], 3),
        }

    async def _prefilled(self, rows: int) -> tuple[Settings, str]:
        """Settings whose storefront topic holds ``rows`` records of a fresh shop."""
        if getattr(self, "_prefill", None) and self._prefill[2] == rows:
            return self._prefill[0], self._prefill[1]
        settings = self.settings()
        await ensure_topics(settings.bootstrap, [settings.topic_storefront], partitions=3)
        shop = await self.shop()
        await loader_bench.prefill(
            settings, loader_bench.storefront_records(str(shop.shop_id), rows)
        )
        self._prefill = (settings, str(shop.shop_id), rows)
        return settings, str(shop.shop_id)

    async def _loader_processes(self, rows: int, processes: int) -> float:
        """Rows/s of ``loader --processes N`` on the pre-filled topic (first row to last)."""
        base, _ = await self._prefilled(rows)
        settings = base.model_copy(update={"consumer_group": f"bench-{uuid.uuid4().hex[:6]}"})
        argv = [sys.executable, "-m", "ingest.cli", "loader", "--stream", "storefront"]
        argv += ["--processes", str(processes)]
        async with Database(self.stack.dsn, max_size=1) as db:
            await db.pool.execute("TRUNCATE events")
            async with process(f"loader-{processes}p", argv, settings.to_env(), self.tmp, None):
                first: float | None = None
                deadline = time.monotonic() + 120
                count = 0
                while time.monotonic() < deadline:
                    count = await db.pool.fetchval("SELECT count(*) FROM events")
                    if count and first is None:
                        first = time.monotonic()
                    if count >= rows:
                        break
                    await asyncio.sleep(0.05)
                assert first is not None and count >= rows, f"loaded {count} of {rows}"
                # the first poll that saw rows saw one batch already: count it as loaded then
                return round(rows / max(1e-3, time.monotonic() - first), 1)

    async def naive_section(self) -> None:
        console.rule("6. naive loader: one INSERT per event, committed per batch")
        rows = 20_000 if self.quick else 60_000
        settings, _ = await self._prefilled(rows)
        async with Database(self.stack.dsn, max_size=4) as db:
            await PartitionManager(db).maintain()
            naive_s = await naive_loader(settings, db, rows)
            cpu = CpuMeter(self.stack.pids)
            loader_s = await loader_bench.loader_run(settings, db, rows, cpu)
        self.results["naive"] = {
            "rows": rows,
            "naive_rows_per_s": round(rows / naive_s),
            "loader_rows_per_s": round(rows / loader_s),
            "loader_vs_naive": round(naive_s / loader_s, 2),
        }

    async def partitions_section(self) -> None:
        console.rule("5. partition maintenance")
        self.results["partitions"] = await partitions_bench.main(
            self.stack.dsn, 5 if self.quick else 20
        )

    async def rollups_section(self) -> None:
        console.rule("7. rollup refresh: incremental after one new hour vs full")
        self.results["rollups"] = await rollups_bench.main(self.stack.dsn, self.quick)

    async def erase_section(self) -> None:
        console.rule("6. erasure of a visitor while a writer inserts")
        rows = 10_000 if self.quick else 100_000
        self.results["erase"] = await erase_bench.main(self.stack.dsn, rows, rows)


async def naive_loader(settings: Settings, db: Database, rows: int) -> float:
    """Seconds for what a user might write: INSERT per event, commit per batch."""
    await db.pool.execute("TRUNCATE events")
    consumer = AIOKafkaConsumer(
        settings.topic_storefront,
        bootstrap_servers=settings.bootstrap,
        group_id=f"naive-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    columns = STOREFRONT.columns
    sql = (
        f"INSERT INTO events ({', '.join(columns)}) "
        f"VALUES ({', '.join(f'${i + 1}' for i in range(len(columns)))}) ON CONFLICT DO NOTHING"
    )
    loaded, started = 0, None
    try:
        # The rows' times, as STOREFRONT makes them.
        async with db.pool.acquire() as conn, pg_times(conn):
            deadline = time.monotonic() + 300
            while loaded < rows and time.monotonic() < deadline:
                got = await consumer.getmany(timeout_ms=200, max_records=settings.batch_max_rows)
                batch = [row for rs in got.values() for r in rs for row in STOREFRONT.rows(r.value)]
                if not batch:
                    continue
                started = started or time.perf_counter()
                async with conn.transaction():
                    await conn.executemany(sql, batch)
                await consumer.commit()
                loaded += len(batch)
        assert started is not None
        return time.perf_counter() - started
    finally:
        await consumer.stop()


def print_summary(results: dict[str, Any]) -> None:
    """The headline table (a quick run's figures are shown without their targets: too
    short to hold them to one)."""
    quick = results["mode"] == "quick"
    table = Table(title=f"eventpipe load benchmarks ({results['mode']})")
    for col in ("figure", "value", "baseline", "ratio", "target"):
        table.add_column(col, justify="right" if col != "figure" else "left")
    c, lo, e = results["collector"], results["loader"], results["e2e"]
    s, n, p = results["scaling"], results["naive"], results["partitions"]
    behavior = lo.get("behavior") or {}
    rows: list[tuple[Any, ...]] = [
        (
            f"collector req/s, native beacons ({c.get('generator', 'python')})",
            c["requests_per_s"],
            c["bare_requests_per_s"],
            c["ratio_vs_bare"],
            ">= 0.35",
        ),
        ("collector events/s", c["events_per_s"], "", "", ""),
    ]
    for name, figures in (c.get("protocols") or {}).items():
        if name == "native":
            continue
        base = BASELINES.get(name, "native").replace("_", " ")
        rows.append(
            (
                f"  {name} events/s (vs {base})",
                figures["events_per_s"],
                "",
                figures["events_vs_native"],
                ">= 0.85" if name in ("segment", "snowplow", "posthog") else "",
            )
        )
    rows += [
        (
            "collector p50 / p99 ms at half max",
            f"{c['p50_ms']} / {c['p99_ms']}",
            "",
            "",
            "p99 < 10",
        ),
        ("collector RSS MB", c["rss_mb"], "", "", "< 150"),
        (
            "loader rows/s vs raw COPY (events)",
            lo["loader_rows_per_s"],
            lo["copy_rows_per_s"],
            lo["ratio_vs_copy"],
            ">= 0.9",
        ),
    ]
    if behavior:
        rows.append(
            (
                "loader rows/s vs COPY + sessions (behavior)",
                behavior["loader_rows_per_s"],
                behavior["copy_rows_per_s"],
                behavior["ratio_vs_copy"],
                ">= 0.9",
            )
        )
    rows += [
        (
            f"e2e sustained events/s ({e.get('generator', 'python')})",
            e["events_per_s"],
            "",
            "",
            ">= 40000",
        ),
        ("e2e lag p50 / p99 s at half", f"{e['lag_p50_s']} / {e['lag_p99_s']}", "", "", "p99 < 2"),
        ("e2e missing / duplicates", f"{e['missing']} / {e['duplicates']}", "", "", "0 / 0"),
        (
            "collector 2 workers req/s",
            s["collector_2_workers_requests_per_s"],
            s["collector_1_worker_requests_per_s"],
            s["collector_2_vs_1"],
            "",
        ),
        (
            "loader 2 processes rows/s",
            s["loader_2_processes_rows_per_s"],
            s["loader_1_process_rows_per_s"],
            s["loader_2_vs_1"],
            "",
        ),
        (
            "partitions no-op maintain s (36)",
            p["noop_maintain_s"],
            p["select1_roundtrip_s"],
            p["noop_vs_select1"],
            "",
        ),
        ("writer worst stall s (create+drop)", p["writer_max_gap_s"], "", "", ""),
        (
            "real loader rows/s vs naive INSERT",
            n["loader_rows_per_s"],
            n["naive_rows_per_s"],
            n["loader_vs_naive"],
            "",
        ),
    ]
    for row in rows:
        shown = (*row[:4], "(quick: none)" if quick and row[4] else row[4])
        table.add_row(*(str(x) for x in shown))
    console.print(table)


SECTIONS = ("collector", "loader", "e2e", "scaling", "naive", "partitions", "erase", "rollups")


async def main(quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    """Run every section (or ``only`` those); write the results and plots."""
    logs.configure("warning")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="eventpipe-suite-") as tmp:
        async with embedded_stack() as stack:
            suite = Suite(stack, quick, Path(tmp))
            for name in only or SECTIONS:
                await getattr(suite, f"{name}_section")()
                # which mode each figure came from, kept with it
                if isinstance(suite.results.get(name), dict):
                    suite.results[name].setdefault("mode", suite.mode)
    results: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "machine": machine(),
        **suite.results,
        "series": {name: run.summary()["series"] for name, run in suite.runs.items()},
        "suite_seconds": round(time.monotonic() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=str) + "\n"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    if only:  # a partial run never replaces latest.json or the plots
        path = RESULTS / f"{stamp}-{results['mode']}-{'+'.join(only)}.json"
        path.write_text(text)
        shown = {k: v for k, v in results.items() if k in only}
        console.print_json(json.dumps(shown, default=str))
        console.print(f"results: {path}")
        return results
    (RESULTS / "latest.json").write_text(text)
    (RESULTS / f"{stamp}-{results['mode']}.json").write_text(text)
    from benchmarks.plots import plot

    for path in plot(results, RESULTS):
        console.print(f"plot: {path}")
    print_summary(results)
    console.print(f"results: {RESULTS / 'latest.json'} ({results['suite_seconds']} s)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="the < 3 minute version")
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable); results go to a file of their own",
    )
    args = parser.parse_args()
    asyncio.run(main(args.quick, args.only))
