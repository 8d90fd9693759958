"""schemathesis against the collector's own OpenAPI document: no 5xx, and answers as documented."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from ingest.collector.openapi import document
from ingest.core.shops import ShopCredentials

schemathesis = pytest.importorskip("schemathesis")


async def test_every_documented_operation(collector: str, shop: ShopCredentials) -> None:
    schema = schemathesis.openapi.from_dict(document())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len([(p, m) for p, ops in document()["paths"].items() for m in ops])

    def fuzz_one(operation: Any) -> None:
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: object) -> None:
            for name in ("k", "writeKey"):  # the native routes' key, the Segment API's
                if case.query is not None and name in case.query:  # type: ignore[attr-defined]
                    case.query[name] = shop.write_key  # type: ignore[attr-defined]
            if case.headers is not None and "X-Write-Key" in case.headers:  # type: ignore[attr-defined]
                case.headers["X-Write-Key"] = shop.write_key  # type: ignore[attr-defined]
            response = case.call(base_url=collector, timeout=15)  # type: ignore[attr-defined]
            assert response.status_code < 500, (case, response.status_code)
            documented = operation.responses  # every status we answer is documented
            assert str(response.status_code) in {
                str(code) for code in documented.status_codes
            } or response.status_code in (405,), (operation.label, response.status_code)

        check()

    def fuzz() -> None:
        for operation in operations:
            fuzz_one(operation)

    await asyncio.to_thread(fuzz)
