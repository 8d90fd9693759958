"""``eventpipe bench``: reproducible traffic, signed webhooks, statistics, a short verified run."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import orjson
import pytest

from consumers.loader import Loader
from consumers.rows import SPECS
from ingest.cli import build_parser
from ingest.collector import webhooks
from ingest.collector.models import BehaviorEvent, StorefrontEvent
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.loadgen.traffic import (
    LoadConfig,
    Mix,
    Stats,
    Target,
    Traffic,
    is_loopback,
    percentile,
    run_load,
)
from ingest.loadgen.verify import Verifier
from ingest.partitions import PartitionManager

CLOCK = datetime.now(UTC)
TARGET = Target("http://127.0.0.1:1", "wk_test", "secret", "bench.myshopify.com")


def _ids(seed: int, n: int = 50) -> list[str]:
    # Webhook ids are made of their signed payload, its times included: one clock.
    traffic = Traffic(TARGET, seed=seed, clock=lambda: CLOCK)
    return [i for _ in range(n) for i in traffic.next().ids]


def test_traffic_is_reproducible_with_a_seed() -> None:
    assert _ids(7) == _ids(7)
    assert _ids(7) != _ids(8)


def test_traffic_is_valid_and_mixed() -> None:
    traffic = Traffic(TARGET, batch_size=20, seed=1)
    requests = [traffic.next() for _ in range(300)]
    kinds = {r.kind for r in requests}
    assert kinds == {"behavior", "storefront", "webhook"}
    types = set()
    for r in requests:
        if r.kind == "behavior":
            events = orjson.loads(r.body)["events"]
            assert len(events) == 20
            types |= {BehaviorEvent.model_validate(e).event_type for e in events}
        elif r.kind == "storefront":
            for e in orjson.loads(r.body)["events"]:
                StorefrontEvent.model_validate(e)
    assert {"page_view", "click", "scroll", "rage_click", "form_abandon"} <= types


def test_webhooks_are_signed_and_ids_match_the_collector() -> None:
    traffic = Traffic(TARGET, mix=Mix(0, 0, 1), seed=3)
    for _ in range(20):
        r = traffic.next()
        assert webhooks.verify("secret", r.body, r.headers["X-Shopify-Hmac-Sha256"])
        fields = webhooks.storefront_fields(
            r.headers["X-Shopify-Topic"],
            r.headers["X-Shopify-Webhook-Id"],
            TARGET.shop_domain or "",
            orjson.loads(r.body),
            None,
        )
        assert r.ids == (str(fields["event_id"]),)


def test_mix_parsing() -> None:
    assert Mix.parse("behavior=1") == Mix(1, 0, 0)
    with pytest.raises(ValueError):
        Mix.parse("pets=1")
    with pytest.raises(ValueError):
        Mix.parse("behavior=0")


def test_percentiles_and_merge() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([], 99) == 0
    a, b = Stats(requests=2, latencies_ms=[1, 2]), Stats(requests=1, latencies_ms=[3])
    a.status["200"] = 2
    b.status["503"] = 1
    a.merge(b)
    assert a.requests == 3 and a.latencies_ms == [1, 2, 3]
    assert a.status == {"200": 2, "503": 1}


def test_loopback_only_by_default() -> None:
    assert is_loopback("http://127.0.0.1:8780") and is_loopback("http://localhost/")
    assert not is_loopback("https://collector.example.com")
    args = build_parser().parse_args(["bench", "--rate", "5", "--duration", "1"])
    assert args.rate == 5 and args.func.__name__ == "bench_command"


async def test_fixed_rate_run_is_verified(
    settings: Settings, collector: str, shop: ShopCredentials, db: Database
) -> None:
    """2 s at 20 requests/s through the collector and a loader: every id once."""
    target = Target(collector, shop.write_key, shop.webhook_secret, shop.domain)
    await PartitionManager(db).maintain()
    loaders = [Loader(settings, SPECS[s], db, PartitionManager(db)) for s in SPECS]
    await asyncio.gather(*(loader.start() for loader in loaders))
    try:
        config = LoadConfig(rate=20, duration_s=2, connections=4, batch_size=10, seed=5)
        result = await run_load(target, config)
        summary = result.summary()
        assert summary["requests"] == 40 and summary["errors"] == 0, summary["status"]
        assert summary["latency_ms"]["p50"] > 0
        async with Verifier(settings.dsn, result.started_at) as verifier:
            for table, ids in result.accepted_ids.items():
                verifier.expect(table, ids)
            assert verifier.result.expected == summary["events_accepted"] > 0
            reconciliation = await verifier.finish(30)
        assert reconciliation.missing == 0 and reconciliation.duplicates == 0
        assert reconciliation.seen == reconciliation.expected
    finally:
        await asyncio.gather(*(loader.stop() for loader in loaders))
