"""What every benchmark shares: an embedded stack, machine facts, result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
from prometheus_client.parser import text_string_to_metric_families

from ingest.core.migrate import migrate
from ingest.stack.broker import EmbeddedBroker
from ingest.stack.postgres import EmbeddedPostgres

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Stack:
    """Embedded PostgreSQL (or a given DSN) and broker for one benchmark run."""

    dsn: str
    bootstrap: str
    log_id: str
    pids: dict[str, int | None]


class CpuMeter:
    """CPU seconds used by this process, the broker and PostgreSQL between start and stop."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {"python": os.getpid(), **pids}
        self._start: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pid in self.pids.items():
            if pid is None:
                continue
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                procs = [proc, *proc.children(recursive=True)] if name == "postgres" else [proc]
                out[name] = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
        return out

    def start(self) -> None:
        """Take the first sample."""
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        """CPU seconds per process since ``start``."""
        end = self._sample()
        return {k: round(end[k] - self._start.get(k, 0.0), 3) for k in end}


@contextlib.asynccontextmanager
async def embedded_stack(dsn: str | None = None) -> AsyncIterator[Stack]:
    """Start what isn't given, in a temporary directory, and migrate."""
    with tempfile.TemporaryDirectory(prefix="eventpipe-bench-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            pg_pid: int | None = None
            if dsn is None:
                pg = await stack.enter_async_context(EmbeddedPostgres(Path(tmp)))
                dsn, pg_pid = pg.dsn, pg.pid
            broker = await stack.enter_async_context(EmbeddedBroker(Path(tmp) / "broker"))
            await migrate(dsn)
            yield Stack(
                dsn, broker.bootstrap, broker.log_id, {"postgres": pg_pid, "broker": broker.pid}
            )


def machine() -> dict[str, Any]:
    """A description of the machine the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    """The median, 0 when empty."""
    return statistics.median(values) if values else 0.0


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


@contextlib.asynccontextmanager
async def scratch_database(dsn: str | None, tmp: Path) -> AsyncIterator[str]:
    """A migrated database of its own on the server at ``dsn`` (an embedded PostgreSQL
    in ``tmp``, fsync off, when None), dropped afterwards; yields its DSN."""
    async with contextlib.AsyncExitStack() as stack:
        if dsn is None:
            pg = EmbeddedPostgres(tmp, settings={"fsync": "off", "synchronous_commit": "off"})
            await stack.enter_async_context(pg)
            dsn = pg.dsn
        base = dsn.rsplit("/", 1)[0]
        name = f"eventpipe_bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(base + "/postgres")
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            await migrate(f"{base}/{name}")
            yield f"{base}/{name}"
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A process's ``/metrics``: every sample by (name, sorted labels)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as answer:
        text = await answer.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _over(
    before: dict[Any, float], after: dict[Any, float], name: str, **labels: str
) -> dict[str, Any]:
    """A histogram's observations between two scrapes: how many, and how many above
    each bound from 10 ms."""

    def delta(suffix: str, **more: str) -> float:
        key = (f"{name}{suffix}", tuple(sorted({**labels, **more}.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    count = delta("_count")
    return {
        "count": int(count),
        "sum_ms": round(delta("_sum") * 1000, 1),
        **{
            f"over_{bound}_ms": int(count - delta("_bucket", le=str(bound / 1000)))
            for bound in (10, 25, 50, 100)
        },
    }


def stalls(before: dict[Any, float], after: dict[Any, float]) -> dict[str, Any]:
    """What stopped a process's event loop between two scrapes (``scrape``): its loop-lag
    probes (every 50 ms) and its garbage collections by generation; and, for a
    collector, how long the broker took to acknowledge its behavior batches."""
    return {
        "loop_lag": _over(before, after, "eventpipe_event_loop_lag_seconds"),
        "produce_behavior": _over(
            before, after, "eventpipe_produce_latency_seconds", stream="behavior"
        ),
        "gc": {
            g: _over(before, after, "eventpipe_gc_pause_seconds", generation=g)
            for g in ("0", "1", "2")
        },
    }
