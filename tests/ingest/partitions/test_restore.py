"""``partitions restore`` on real PostgreSQL: a crafted archive is refused, a restore is recorded.

The manifest of an archive is the archive's own claim: whoever can write the
archive location can write a manifest whose count and sha256 match any data.
So the rows themselves are checked against the month the restore fills.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ingest.core.db import Database
from ingest.core.errors import PartitionError
from ingest.core.migrate import migrate
from ingest.partitions import PartitionManager

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
APRIL = "behavior_events_p2026_04"


@pytest.fixture
async def fresh(scratch_database: Any) -> AsyncIterator[Database]:
    """A migrated database of this test's own, with only the behavior_events policy."""
    dsn = await scratch_database()
    await migrate(dsn)
    async with Database(dsn, max_size=4) as database:
        await database.pool.execute("DELETE FROM partition_policies WHERE table_name = 'events'")
        yield database


async def _archived_april(db: Database, location: Path) -> Path:
    """April 2026 with three rows, archived (and dropped) by a maintain run; its manifest."""
    manager = PartitionManager(db)
    await manager.create(await manager.policy("behavior_events"), date(2026, 4, 1))
    for day in (2, 3, 4):
        await db.pool.execute(
            "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, page_url, "
            "\"timestamp\", received_at) VALUES ($1, $2, 's1', 'click', 'https://x/', $3, $3)",
            uuid.uuid4(),
            uuid.uuid4(),
            datetime(2026, 4, day, 3, tzinfo=UTC),
        )
    await db.pool.execute(
        "UPDATE partition_policies SET retention_mode = 'archive', archive_location = $1 "
        "WHERE table_name = 'behavior_events'",
        str(location),
    )
    await manager.maintain(NOW)
    manifest = location / "behavior_events" / f"{APRIL}.manifest.json"
    assert manifest.exists()
    return manifest


def _rewrite(manifest_file: Path, lines: list[bytes], **changes: Any) -> None:
    """Write ``lines`` as the archive's COPY text and a manifest that matches them."""
    data = b"".join(lines)
    manifest = json.loads(manifest_file.read_text())
    with gzip.open(manifest_file.with_name(manifest["data_file"]), "wb") as f:
        f.write(data)
    manifest.update(row_count=len(lines), sha256=hashlib.sha256(data).hexdigest(), **changes)
    manifest_file.write_text(json.dumps(manifest))


def _lines(manifest_file: Path) -> tuple[list[str], list[bytes]]:
    manifest = json.loads(manifest_file.read_text())
    with gzip.open(manifest_file.with_name(manifest["data_file"]), "rb") as f:
        return manifest["columns"], f.read().splitlines(keepends=True)


def _moved(columns: list[str], line: bytes, timestamp: str) -> bytes:
    """A copy of the COPY text ``line`` with a new event id and ``timestamp``."""
    fields = line.rstrip(b"\n").split(b"\t")
    fields[columns.index("event_id")] = str(uuid.uuid4()).encode()
    fields[columns.index("timestamp")] = timestamp.encode()
    return b"\t".join(fields) + b"\n"


async def _rows(db: Database) -> int:
    return int(await db.pool.fetchval("SELECT count(*) FROM behavior_events"))


@pytest.mark.parametrize("partition_exists", [False, True])
async def test_an_archive_holding_a_row_of_another_month_is_refused(
    fresh: Database, tmp_path: Path, partition_exists: bool
) -> None:
    manifest_file = await _archived_april(fresh, tmp_path)
    columns, lines = _lines(manifest_file)
    # A valid manifest (count and sha256 match), but one row is of May.
    _rewrite(manifest_file, [*lines, _moved(columns, lines[0], "2026-05-20 10:00:00+00")])
    manager = PartitionManager(fresh)
    if partition_exists:  # an empty April attached again: its bound is PostgreSQL's
        await manager.create(await manager.policy("behavior_events"), date(2026, 4, 1))
    with pytest.raises(PartitionError, match=r"outside 2026-04") as caught:
        await manager.restore(manifest_file)
    assert "\n" not in str(caught.value)
    assert await _rows(fresh) == 0
    exists = await fresh.pool.fetchval("SELECT to_regclass($1) IS NOT NULL", APRIL)
    assert exists is partition_exists
    assert await fresh.pool.fetchval("SELECT count(*) FROM partition_restores") == 0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"table": "shops", "partition": "shops_p2026_04"}, "no partition policy"),
        ({"columns": ["event_id", "shop_id", "timestamp"]}, "columns"),
        ({"partition": "behavior_events_p2026_06"}, "partition"),
        ({"range_to": "2026-09-01T00:00:00+00:00"}, "range"),
        ({"column": "received_at"}, "column"),
        ({"range_from": "someday"}, "range"),
        ({"data_file": "../../elsewhere.copy.gz"}, "data file"),
    ],
)
async def test_a_manifest_that_does_not_describe_its_month_is_refused(
    fresh: Database, tmp_path: Path, changes: dict[str, Any], match: str
) -> None:
    manifest_file = await _archived_april(fresh, tmp_path)
    _, lines = _lines(manifest_file)
    _rewrite(manifest_file, lines, **changes)
    with pytest.raises(PartitionError, match=match) as caught:
        await PartitionManager(fresh).restore(manifest_file)
    assert "\n" not in str(caught.value)
    assert await _rows(fresh) == 0


async def test_a_restore_is_recorded(fresh: Database, tmp_path: Path) -> None:
    manifest_file = await _archived_april(fresh, tmp_path)
    manifest = json.loads(manifest_file.read_text())
    restored = await PartitionManager(fresh).restore(manifest_file)
    assert restored.rows == 3 and await _rows(fresh) == 3
    row = await fresh.pool.fetchrow(
        "SELECT table_name, partition_name, month, file, sha256, row_count, restored_by, "
        "session_user_name, restored_at, current_user AS me FROM partition_restores"
    )
    assert row is not None
    assert (row["table_name"], row["partition_name"], row["month"]) == (
        "behavior_events",
        APRIL,
        date(2026, 4, 1),
    )
    assert row["file"] == str(manifest_file.with_name(manifest["data_file"]).resolve())
    assert (row["sha256"], row["row_count"]) == (manifest["sha256"], 3)
    assert row["restored_by"] == row["me"] == row["session_user_name"]
    assert abs((datetime.now(UTC) - row["restored_at"]).total_seconds()) < 60
    # The record is append-only: its facts are the server's, not the inserter's.
    await fresh.pool.execute(
        "INSERT INTO partition_restores (table_name, partition_name, month, file, sha256, "
        "row_count, restored_by, session_user_name, restored_at) "
        "VALUES ('t', 'p', '2026-01-01', 'f', 's', 1, 'someone_else', 'someone_else', "
        "'2001-01-01')"
    )
    forged = await fresh.pool.fetchrow(
        "SELECT restored_by, restored_at FROM partition_restores WHERE table_name = 't'"
    )
    assert forged is not None and forged["restored_by"] != "someone_else"
    assert forged["restored_at"].year != 2001


async def test_a_restore_applies_erasures_and_uninstalled_shops_purges(
    fresh: Database, tmp_path: Path
) -> None:
    """April is archived; then a visitor of shop A is erased (by session and by user id)
    and shops B (delete) and C (anonymise) are uninstalled and purged. Restoring April
    puts back A's other visitors only, none of B's rows, C's anonymised; recorded."""
    from ingest.core.settings import Settings
    from ingest.privacy import Erasure, erase

    shops = {
        r["domain"][0]: r["id"]
        for r in await fresh.pool.fetch(
            "INSERT INTO shops (domain, webhook_secret, settings) VALUES "
            "('a.myshopify.com', 's', '{}'), ('b.myshopify.com', 's', '{}'), "
            "('c.myshopify.com', 's', '{\"uninstalled_data\": \"anonymize\"}') "
            "RETURNING id, domain"
        )
    }
    manager = PartitionManager(fresh, batch_rows=2)
    await manager.create(await manager.policy("behavior_events"), date(2026, 4, 1))
    rows = [
        ("a", "erase-me", {}),
        ("a", "erase-me", {}),
        ("a", "erase-me", {}),
        ("a", "other", {"user_id": "u-erase"}),
        ("a", "other", {"user_id": "u-keep"}),
        ("a", "keep-me", {}),
        ("a", "keep-me", {}),
        ("b", "erase-me", {}),  # another shop's session of the same name: not erased
        ("b", "b-1", {}),
        ("c", "c-1", {}),
        ("c", "c-1", {}),
    ]
    for day, (shop, session, metadata) in enumerate(rows, start=1):
        await fresh.pool.execute(
            "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, page_url, "
            '"timestamp", received_at, element_text, metadata) '
            "VALUES ($1, $2, $3, 'click', 'https://x/?q=1', $4, $4, 'text', $5)",
            uuid.uuid4(),
            shops[shop],
            session,
            datetime(2026, 4, day, 3, tzinfo=UTC),
            json.dumps(metadata),
        )
    await fresh.pool.execute(
        "UPDATE partition_policies SET retention_mode = 'archive', archive_location = $1 "
        "WHERE table_name = 'behavior_events'",
        str(tmp_path),
    )
    await manager.maintain(NOW)
    manifest_file = tmp_path / "behavior_events" / f"{APRIL}.manifest.json"
    assert json.loads(manifest_file.read_text())["row_count"] == len(rows)

    settings = Settings(state_dir=tmp_path, postgres_dsn=fresh.dsn)
    report = await erase(
        fresh,
        settings,
        Erasure("a.myshopify.com", session_ids=["erase-me"], user_ids=["u-erase"]),
        dry_run=False,
    )
    assert report.rows["behavior_events"] == 0  # April is archived: nothing to erase now
    await fresh.pool.execute(
        "UPDATE shops SET uninstalled_at = $1 WHERE domain IN ('b.myshopify.com', "
        "'c.myshopify.com')",
        NOW - timedelta(days=40),
    )
    await manager.maintain(NOW)
    assert (
        await fresh.pool.fetchval("SELECT count(*) FROM shop_purges WHERE finished_at IS NOT NULL")
        == 2
    )

    restored = await manager.restore(manifest_file)
    assert restored.rows == len(rows)
    # A's 3 rows of session erase-me and 1 of user u-erase; B's 2 deleted, C's 2 anonymised.
    assert restored.privacy == {"erased": 4, "uninstalled": 4}
    got = await fresh.pool.fetch(
        "SELECT shop_id, session_id, metadata, element_text, page_url FROM behavior_events"
    )
    by_shop = {s: [r for r in got if r["shop_id"] == i] for s, i in shops.items()}
    assert sorted(r["session_id"] for r in by_shop["a"]) == ["keep-me", "keep-me", "other"]
    assert [json.loads(r["metadata"]) for r in by_shop["a"] if r["session_id"] == "other"] == [
        {"user_id": "u-keep"}
    ]
    assert by_shop["b"] == []
    assert len(by_shop["c"]) == 2
    assert {r["session_id"] for r in by_shop["c"]} == {
        await fresh.pool.fetchval("SELECT eventpipe_pseudonym($1, 'c-1')", shops["c"])
    }
    assert {(r["element_text"], r["page_url"]) for r in by_shop["c"]} == {(None, "https://x/")}
    recorded = await fresh.pool.fetchval(
        "SELECT privacy_rows FROM partition_restores WHERE partition_name = $1", APRIL
    )
    assert json.loads(recorded) == restored.privacy
