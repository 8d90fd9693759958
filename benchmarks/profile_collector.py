"""Where the collector's time goes under wrk: ``python -m benchmarks.profile_collector``.

Starts an embedded stack and one collector, drives it with wrk (the same
20-event bodies as the benchmark; ``--protocol`` picks which), samples it with
py-spy (``--gil``: the time the collector's Python holds the interpreter, which
is what bounds a single process), and writes the share of samples per stage of
a request to ``benchmarks/results/profile-<protocol>.json``, and py-spy's
collapsed stacks beside it. A sample is counted in the first stage its stack
reaches from the leaf (its innermost frame that belongs to one).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from benchmarks import collector_bench, wrk
from benchmarks.common import RESULTS, embedded_stack, machine
from benchmarks.run import process
from ingest.core.db import Database
from ingest.core.processes import free_port
from ingest.core.settings import Settings
from ingest.core.shops import ensure_shop
from ingest.core.topics import ensure_topics
from ingest.loadgen.traffic import Target

# (stage, substrings of a frame "function (file:line)"), matched leaf first.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("validation (pydantic)", ("pydantic", "validate_python", "model_validate")),
    ("JSON decode / encode (orjson, msgspec)", ("orjson", "msgspec", "loads (", "dumps (")),
    ("enrichment", ("collector/enrich.py",)),
    ("records / Kafka encoding", ("core/records.py", "aiokafka/record", "aiokafka/codec")),
    ("producing (aiokafka client)", ("aiokafka/",)),
    ("delivery / spool", ("collector/delivery.py", "collector/spool.py", "core/producer.py")),
    (
        "protocol handlers",
        ("collector/segment.py", "collector/snowplow.py", "collector/posthog.py"),
    ),
    # msgspec's decoding is C, no frame of its own: its time shows in native.py's lines.
    ("native fast path (native.py: msgspec validation, the splice)", ("collector/native.py",)),
    ("collector handler (app.py)", ("collector/app.py", "collector/ratelimit.py", "core/shops.py")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("logging (structlog)", ("structlog",)),
    ("HTTP (aiohttp parsing, responses)", ("aiohttp/",)),
    ("event loop (asyncio, selectors, sockets)", ("asyncio/", "selectors.py", "uvloop")),
]


def stage_of(stack: str) -> str:
    """The stage a collapsed stack ``a;b;c`` belongs to (its innermost known frame)."""
    for frame in reversed(stack.split(";")):
        for name, needles in STAGES:
            if any(n in frame for n in needles):
                return name
    return "other"


def breakdown(collapsed: Path) -> dict[str, Any]:
    """Share of samples per stage, and the top leaf functions."""
    stages: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        stages[stage_of(stack)] += n
        leaves[stack.split(";")[-1]] += n
    return {
        "samples": total,
        "stages_percent": {k: round(100 * v / total, 1) for k, v in stages.most_common()},
        "top_leaves_percent": {k: round(100 * v / total, 1) for k, v in leaves.most_common(25)},
    }


async def main(protocol: str, seconds: float) -> Path:
    """Profile one collector under wrk; write the breakdown; its path."""
    if missing := await asyncio.to_thread(wrk.ensure_wrk):
        raise SystemExit(missing)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory(prefix="eventpipe-profile-") as tmp:
        folder = Path(tmp)
        async with embedded_stack() as stack:
            tag = uuid.uuid4().hex[:6]
            settings = Settings(
                state_dir=folder / "state",
                postgres_dsn=stack.dsn,
                kafka_bootstrap=stack.bootstrap,
                kafka_log_id=stack.log_id,
                topic_behavior=f"prof.behavior.{tag}",
                topic_storefront=f"prof.storefront.{tag}",
                collector_port=free_port(),
                rate_limit_per_s=0.0,
                log_level="warning",
            )
            await ensure_topics(
                settings.bootstrap,
                [settings.topic_behavior, settings.topic_storefront],
                partitions=3,
            )
            async with Database(stack.dsn, max_size=1) as db:
                shop = await ensure_shop(db, f"prof-{tag}.myshopify.com")
            target = Target("", shop.write_key, shop.webhook_secret, shop.domain)
            requests = collector_bench.bodies(target, 1)[protocol]
            url = f"http://127.0.0.1:{settings.collector_port}"
            argv = [sys.executable, "-m", "ingest.cli", "collector"]
            async with process("collector", argv, settings.to_env(), folder, f"{url}/healthz") as p:
                await collector_bench.check_accepted(url, requests)
                script = wrk.write_script(folder / "load.lua", requests)
                out = RESULTS / f"profile-{protocol}.collapsed.txt"
                RESULTS.mkdir(parents=True, exist_ok=True)
                spy_argv = [pyspy, "record", "--pid", str(p.pid), "--gil", "--rate", "250"]
                spy_argv += ["--duration", str(int(seconds)), "--format", "raw", "-o", str(out)]
                spy = subprocess.Popen(  # noqa: ASYNC220 - started, then waited for in a thread
                    spy_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                load = await asyncio.to_thread(
                    wrk.run, url, script, seconds=seconds, servers={"collector": p.pid}
                )
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(spy.wait, 30)
    result = {
        "machine": machine(),
        "protocol": protocol,
        "load": load.summary(collector_bench.EVENTS_PER_REQUEST),
        **breakdown(out),
    }
    path = RESULTS / f"profile-{protocol}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--protocol",
        default="native",
        choices=["native", "native_storefront", "segment", "snowplow", "posthog"],
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    asyncio.run(main(args.protocol, args.seconds))
