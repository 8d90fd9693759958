"""The record contract (``ingest.core.streams``) and what is written apart from it agree.

What derives from the contract can't disagree with it; these check what
can't be derived: the migrated tables, the collector's pydantic models, the
loaders' msgspec structs, and the records the collector writes.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from consumers.rows import SPECS
from ingest.collector import native
from ingest.collector.enrich import Received, behavior_record, storefront_record
from ingest.collector.models import BATCH_MODELS, STREAM_MODELS, BehaviorEvent, StorefrontEvent
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import Shop
from ingest.core.streams import CONTEXT, DATABASE_COLUMNS, SERVER_FIELDS, STREAMS, Stream

ALL = pytest.mark.parametrize("stream", list(STREAMS.values()), ids=list(STREAMS))


@ALL
async def test_the_migrated_table_has_the_contracts_columns(db: Database, stream: Stream) -> None:
    rows = await db.pool.fetch(
        "SELECT column_name, data_type, is_nullable = 'YES' AS nullable"
        " FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = $1"
        " ORDER BY ordinal_position",
        stream.table,
    )
    migrated = [(r["column_name"], r["data_type"], r["nullable"]) for r in rows]
    filled = [(name, t, n) for name, t, n in migrated if name in DATABASE_COLUMNS]
    assert filled == [("load_xid", "bigint", True)]
    assert [c for c in migrated if c not in filled] == [
        (c.name, c.sql_type, c.nullable) for c in stream.columns
    ]


@ALL
async def test_the_table_is_partitioned_by_the_time_column(db: Database, stream: Stream) -> None:
    key = await db.pool.fetchval(
        "SELECT pg_get_partkeydef(c.oid) FROM pg_class c"
        " WHERE c.oid = to_regclass(quote_ident($1))",
        stream.table,
    )
    assert key in (f"RANGE ({stream.time_column})", f'RANGE ("{stream.time_column}")')


def test_every_stream_has_its_models_and_its_loader() -> None:
    assert list(STREAM_MODELS) == list(BATCH_MODELS) == list(SPECS) == list(STREAMS)


@ALL
def test_the_collectors_model_takes_the_client_fields(stream: Stream) -> None:
    model = STREAM_MODELS[stream.name]
    assert sorted(model.model_fields) == sorted(stream.client_fields)
    assert not set(model.model_fields) & set(SERVER_FIELDS)
    # Those every event must carry, the client may leave out only what the collector fills.
    required = {c.name for c in stream.columns if c.required}
    optional = {name for name, f in model.model_fields.items() if not f.is_required()}
    assert optional & required <= {"event_id", stream.time_column}


@ALL
def test_the_collectors_fast_struct_is_its_model(stream: Stream) -> None:
    """The native routes' msgspec struct (``native``) takes the model's fields, the same
    required, in the same order."""
    model = STREAM_MODELS[stream.name]
    fields = msgspec.structs.fields(native.STRUCTS[stream.name])
    assert [f.name for f in fields] == list(model.model_fields)
    assert {f.name for f in fields if f.required} == {
        name for name, f in model.model_fields.items() if f.is_required()
    }


@ALL
def test_the_fast_struct_reads_the_record_fields(stream: Stream) -> None:
    spec = SPECS[stream.name]
    expected = [*stream.column_names, *([CONTEXT] if stream.keeps_sessions else [])]
    required = {c.name for c in stream.columns if c.required}
    for struct in {spec.event, spec.copy_event or spec.event}:  # the rows' and COPY data's
        fields = msgspec.structs.fields(struct)
        assert [f.name for f in fields] == expected
        assert {f.name for f in fields if f.required} == required
    assert (spec.table, spec.time_column, spec.columns) == (
        stream.table,
        stream.time_column,
        stream.column_names,
    )


@ALL
def test_each_stream_has_its_topic_setting(stream: Stream) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.topic_for(stream.name) == Settings.model_fields[stream.topic_setting].default
    assert settings.topic_for(stream.name) == getattr(settings, f"topic_{stream.name}")


def test_the_collector_writes_the_record_fields() -> None:
    at = datetime.now(UTC)
    received = Received(at, timedelta(0), at, {}, {})
    shop = Shop(uuid.uuid4(), "shop.example", None)
    sent = at + timedelta(days=1)  # clamped: the client's time kept in the extra column
    behavior = BehaviorEvent(event_type="click", session_id="s", page_url="/", timestamp=sent)
    storefront = StorefrontEvent(event_type="view", anon_id="a", session_id="s", ts=sent)
    for name, record in (
        ("behavior", behavior_record(behavior, shop, received)),
        ("storefront", storefront_record(storefront, shop, received)),
    ):
        stream = STREAMS[name]
        assert sorted(record) == sorted(stream.record_fields)
        assert record[stream.time_column] == at
        assert record[stream.extra_column] == {stream.original_time_key: sent.isoformat()}
