"""Each protocol's handler alone: CPU per request without HTTP, the event loop or Kafka.

    python -m benchmarks.handler_bench [--dsn postgresql://...] [--requests 3000]
                                       [--protocols native,segment,...] [--profile NAME]

What the wrk figures of ``benchmarks.run`` cannot show: how much of a request's
time is the protocol's own (parsing, mapping, validation, enrichment, record
encoding) once the parts every protocol shares (aiohttp's parser, the loop, the
produce) are taken out. Each handler is called in process on the same bodies as
the wrk runs (``collector_bench.bodies``: 300 of 20 events a protocol), on
requests built once with their body already read, and its delivery is a sink
that counts records (the real Delivery is measured under wrk, and a broker's
acknowledgement is no CPU of the handler's). A ``bare`` handler that reads the
body and answers 204 gives what the harness itself costs. ``--profile NAME``
prints cProfile's 30 most expensive functions of that protocol.

Without ``--dsn`` it starts an embedded PostgreSQL (the shop's write key is
looked up once, then cached as in the collector). Writes
``benchmarks/results/handlers.json``; the protocols run in turn, twice,
and the lower CPU time of the two rounds is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from benchmarks import collector_bench
from benchmarks.common import machine, scratch_database, write_result
from ingest.collector import app as collector
from ingest.collector import posthog, segment, snowplow
from ingest.core import logs
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopDirectory, ensure_shop
from ingest.loadgen.traffic import Request, Target

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Sink:
    """The delivery of this benchmark: counts the records a handler hands over."""

    def __init__(self) -> None:
        self.records = 0

    async def deliver(self, stream: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
        """Count ``messages``; acknowledged at once."""
        self.records += len(messages)


async def bare(request: web.Request) -> web.StreamResponse:
    """The harness alone: read the body, answer 204."""
    await request.read()
    return web.Response(status=204)


HANDLERS: dict[str, Handler] = {
    "bare": bare,
    "native": collector.post_behavior,
    "native_storefront": collector.post_storefront,
    "segment": segment._handler(None, batched=True),
    "snowplow": snowplow.post_tp2,
    "posthog": posthog.capture,
}


def _requests(app: web.Application, bodies: list[Request]) -> list[web.Request]:
    """The requests of ``bodies``, built once, each body already read (aiohttp keeps a
    read body on the request, and the handlers only read it)."""
    built = []
    for body in bodies:
        headers = {**body.headers, "Content-Length": str(len(body.body))}
        request = make_mocked_request("POST", body.path, headers=headers, app=app)
        request._read_bytes = body.body
        built.append(request)
    return built


async def _round(handler: Handler, requests: list[web.Request], count: int) -> float:
    """CPU seconds of ``count`` calls of ``handler``, cycling through ``requests``."""
    started = time.process_time()
    for i in range(count):
        response = await handler(requests[i % len(requests)])
        if response.status >= 300:
            raise RuntimeError(f"refused: {response.status} {getattr(response, 'body', b'')!r}")
    return time.process_time() - started


async def bench(dsn: str, names: list[str], count: int, profile: str | None) -> dict[str, Any]:
    """CPU µs per request and per event of each handler in ``names``."""
    settings = Settings(
        postgres_dsn=dsn,
        kafka_bootstrap="127.0.0.1:9",  # never reached: the delivery is a sink
        rate_limit_per_s=1e9,
        rate_limit_burst=10**9,
        rate_limit_client_per_s=1e9,
        rate_limit_client_burst=10**9,
    )
    async with Database(dsn, max_size=2) as db:
        shop = await ensure_shop(db, "handler-bench.myshopify.com")
        sink = Sink()
        app = collector.create_app(settings, sink, ShopDirectory(db, 3600))  # type: ignore[arg-type]
        sets = collector_bench.bodies(Target("http://127.0.0.1", shop.write_key), seed=1)
        requests = {
            name: _requests(app, sets["native" if name == "bare" else name]) for name in names
        }
        for name in names:  # warm: caches filled, the shop looked up
            await _round(HANDLERS[name], requests[name], 50)
        best: dict[str, float] = {}
        for _ in range(2):
            for name in names:
                seconds = await _round(HANDLERS[name], requests[name], count)
                best[name] = min(best.get(name, seconds), seconds)
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await _round(HANDLERS[profile], requests[profile], count)
            profiler.disable()
            stats = pstats.Stats(profiler).sort_stats("tottime")
            stats.print_stats(30)
            stats.print_callees("_taken|_shop|shop_for|_accept_fast_batch|post_batch")
    events = collector_bench.EVENTS_PER_REQUEST
    out: dict[str, Any] = {}
    for name in names:
        body_bytes = sum(len(r.body) for r in sets["native" if name == "bare" else name])
        out[name] = {
            "cpu_us_per_request": round(best[name] / count * 1e6, 1),
            "cpu_us_per_event": round(best[name] / count / events * 1e6, 2),
            "mean_body_bytes": round(body_bytes / len(sets["native"])),
        }
    for name, base in (
        ("segment", "native_storefront"),
        ("snowplow", "native"),
        ("posthog", "native"),
    ):
        if name in out and base in out:
            out[name]["vs_native"] = round(
                out[name]["cpu_us_per_request"] / out[base]["cpu_us_per_request"], 2
            )
            out[name]["baseline"] = base
    return out


async def main(dsn: str | None, names: list[str], count: int, profile: str | None) -> Path:
    """Bench in a scratch database (an embedded server's unless ``dsn``), write the result."""
    with tempfile.TemporaryDirectory() as tmp:
        async with scratch_database(dsn, Path(tmp)) as scratch:
            handlers = await bench(scratch, names, count, profile)
    # A partial or profiled run has a file of its own: handlers.json is every handler's.
    partial = profile is not None or set(names) != set(HANDLERS)
    return write_result(
        "handlers-partial" if partial else "handlers",
        {"machine": machine(), "requests_per_round": count, "handlers": handlers},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", help="an existing server (default: embedded PostgreSQL)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per round")
    parser.add_argument("--protocols", default=",".join(HANDLERS), help="comma-separated")
    parser.add_argument("--profile", choices=list(HANDLERS), help="cProfile this protocol")
    args = parser.parse_args()
    logs.configure("warning")
    names = [n for n in args.protocols.split(",") if n]
    path = asyncio.run(main(args.dsn, names, args.requests, args.profile))
    print(json.dumps(json.loads(path.read_text())["handlers"], indent=2))
    print(f"results: {path}")
