"""``eventpipe rollups refresh|status`` against a database of its own (rollup_state is
global): status is a monitoring check, bad input one line and exit 2."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import pytest
import structlog

from ingest.cli.main import main
from ingest.core.migrate import migrate


async def test_rollups_cli_refreshes_and_status_is_a_check(
    scratch_database: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dsn: str = await scratch_database("eventpipe_rollups_cli")
    await migrate(dsn)
    saved = structlog.get_config()

    async def cli(*argv: str) -> int:
        return await asyncio.to_thread(functools.partial(main, [*argv, "--postgres-dsn", dsn]))

    try:
        capsys.readouterr()  # the migration's log
        # Never refreshed: lagging, exit 1.
        assert await cli("rollups", "status", "--json") == 1
        out = json.loads(capsys.readouterr().out)
        assert not out["healthy"] and all(r["lag_s"] is None for r in out["rollups"])

        assert await cli("rollups", "refresh", "--dry-run") == 0
        assert "would recompute" in capsys.readouterr().out
        assert await cli("rollups", "status") == 1  # a dry run refreshes nothing
        capsys.readouterr()

        assert await cli("rollups", "refresh", "--table", "daily_friction_summary", "--json") == 0
        done = json.loads(capsys.readouterr().out)
        assert [r["rollup"] for r in done] == ["daily_friction_summary"]
        assert await cli("rollups", "refresh", "--full") == 0
        capsys.readouterr()
        assert await cli("rollups", "status", "--json") == 0
        out = json.loads(capsys.readouterr().out)
        assert out["healthy"] and all(r["last_full_at"] for r in out["rollups"])

        # Older than the maximum lag: exit 1.
        monkeypatch.setenv("EVENTPIPE_ROLLUP_MAX_LAG_S", "0.05")
        await asyncio.sleep(0.2)
        assert await cli("rollups", "status") == 1
        assert "late" in capsys.readouterr().out

        assert await cli("rollups", "refresh", "--table", "nope") == 2
        err = capsys.readouterr().err
        assert "no rollup named 'nope'" in err and len(err.strip().splitlines()) == 1
    finally:
        structlog.configure(**saved)
