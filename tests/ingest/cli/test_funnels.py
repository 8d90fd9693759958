"""``eventpipe funnels define|list|drop`` against a database of its own: the steps stored
as given, the refresh fills conversion_funnels, bad input is one line and exit 2."""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from ingest.cli.main import main
from ingest.core.db import Database
from ingest.core.migrate import migrate
from ingest.core.shops import ensure_shop
from ingest.partitions import PartitionManager, month_start


async def test_funnels_cli_defines_lists_and_drops(
    scratch_database: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn: str = await scratch_database("eventpipe_funnels_cli")
    await migrate(dsn)
    saved = structlog.get_config()
    domain = f"cli-{uuid.uuid4().hex[:8]}.myshopify.com"
    now = datetime.now(UTC)
    async with Database(dsn, max_size=2) as db:
        shop = (await ensure_shop(db, domain)).shop_id
        await PartitionManager(db).ensure_months("behavior_events", {month_start(now)})
        await db.pool.executemany(
            "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, "
            'element_path, "timestamp", page_url, received_at) '
            "VALUES ($1, $2, 'sess-1', $3, 'form#signup', $4, 'https://s/[x]', $4)",
            [
                (uuid.uuid4(), shop, kind, now + timedelta(seconds=i))
                for i, kind in enumerate(("form_start", "form_submit"))
            ],
        )

    async def cli(*argv: str) -> int:
        return await asyncio.to_thread(functools.partial(main, [*argv, "--postgres-dsn", dsn]))

    try:
        capsys.readouterr()  # the migration's log
        steps = ["start: event=form_start; url=https://s/*", "done [ok]: event=form_submit"]
        argv = ["funnels", "define", domain, "signup"]
        assert await cli(*argv, *(a for s in steps for a in ("--step", s))) == 0
        assert "defined with 2 step(s)" in capsys.readouterr().out
        assert await cli("rollups", "refresh", "--table", "conversion_funnels") == 0
        capsys.readouterr()
        assert await cli("funnels", "list", domain, "--json") == 0
        (listed,) = json.loads(capsys.readouterr().out)
        assert listed["name"] == "signup" and listed["sessions"] == 1
        assert [s["name"] for s in listed["steps"]] == ["start", "done [ok]"]
        assert listed["steps"][0] == {
            "name": "start",
            "event_type": "form_start",
            "page_url": "https://s/*",
        }
        assert await cli("funnels", "list", domain) == 0
        out = capsys.readouterr().out
        assert "2. done [ok]: event=form_submit" in out

        assert await cli("funnels", "drop", domain, "signup") == 0
        assert "2 row(s) deleted" in capsys.readouterr().out
        assert await cli("funnels", "list", domain) == 0
        assert "has no funnels" in capsys.readouterr().out

        for bad, message in (
            (["funnels", "define", domain, "x"], "a funnel needs steps"),
            (["funnels", "define", domain, "x", "--step", "colour=red"], "unknown key 'colour'"),
            (["funnels", "define", "nope.example", "x", "--step", "event=a"], "no shop"),
            (["funnels", "drop", domain, "signup"], "has no funnel 'signup'"),
            (["funnels", "list", "nope.example"], "no shop 'nope.example'"),
        ):
            assert await cli(*bad) == 2, bad
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1, err
    finally:
        structlog.configure(**saved)
