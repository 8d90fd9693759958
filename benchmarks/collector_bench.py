"""The collector's maximum throughput under wrk, per protocol, beside a bare handler.

Used by ``benchmarks.run`` (sections ``collector`` and ``scaling``). Every
protocol is driven with the same visits (``ingest.loadgen.dialects``): native
20-event beacons (behavior), native 20-event storefront batches, and Segment,
Snowplow tp2 and PostHog batches of 20. Each body is sent once first and must
be accepted whole (a benchmark of refusals would measure nothing).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import wrk
from ingest.loadgen.dialects import DIALECTS
from ingest.loadgen.traffic import Mix, Request, Target, Traffic

EVENTS_PER_REQUEST = 20
# The bodies a run rotates: enough that no cache of a few bodies flatters it.
BODIES = 300


def bodies(target: Target, seed: int, count: int = BODIES) -> dict[str, list[Request]]:
    """``count`` requests per protocol, each of 20 events, the same visits in each."""
    beacons = Traffic(target, Mix(behavior=1.0, storefront=0.0, webhook=0.0), seed=seed)
    native = [beacons.next() for _ in range(count)]
    # Traffic makes batch_size // 4 storefront events per request.
    shop = Traffic(target, Mix(behavior=0.0, storefront=1.0, webhook=0.0), 4 * 20, seed=seed)
    out = {"native": native, "native_storefront": [shop.next() for _ in range(count)]}
    for name, convert in DIALECTS.items():
        out[name] = [convert(r, target.write_key) for r in native]
    return out


async def check_accepted(url: str, requests: list[Request]) -> None:
    """Send the first body of a set once; it must be answered 2xx with all events taken."""
    request = requests[0]
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + request.path, data=request.body, headers=request.headers) as resp,
    ):
        text = await resp.text()
        if resp.status >= 300:
            raise RuntimeError(f"{request.path}: {resp.status} {text[:500]}")
        if '"rejected"' in text and '"rejected":[]' not in text.replace(" ", ""):
            raise RuntimeError(f"{request.path}: some events refused: {text[:500]}")


async def measure(
    url: str,
    requests: list[Request],
    folder: Path,
    servers: dict[str, int],
    seconds: float,
    connections: int = 16,
) -> dict[str, Any]:
    """One wrk run of ``requests`` against ``url``; its summary.

    ``servers`` names the processes whose CPU is measured: the server (and its
    workers), whose CPU per request and whether wrk used less the summary tells,
    and the broker beside it.
    """
    script = wrk.write_script(folder / f"load-{uuid.uuid4().hex[:8]}.lua", requests)
    result = await asyncio.to_thread(
        wrk.run, url, script, seconds=seconds, connections=connections, servers=servers
    )
    return result.summary(EVENTS_PER_REQUEST)
